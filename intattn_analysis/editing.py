"""The editing entry points under their earlier module name.

The editing engine lives in :mod:`intattn_analysis.editors` (one protocol, one module per
method); this module re-exports its public names so that code written against
``intattn_analysis.editing`` keeps working.
"""

from .editors import (  # noqa: F401
    EDITORS,
    METHODS,
    EditError,
    EditResult,
    EditSequence,
    Editor,
    apply_deltas,
    edit,
    edit_sequence,
    solve_update,
)

__all__ = ["EDITORS", "METHODS", "EditError", "EditResult", "EditSequence", "Editor", "apply_deltas",
           "edit", "edit_sequence", "solve_update"]
