"""Editing: one protocol, several methods, exact restores.

* :mod:`.protocol`: :class:`Editor` (what a method declares) and :data:`EDITORS`;
* :mod:`.api`: :func:`edit` and :func:`edit_sequence`, the same for every method;
* :mod:`.result`: :class:`EditResult` (undo, save) and :func:`apply_deltas`;
* :mod:`.solvers`: least squares, rank one, null-space projection;
* :mod:`.keys`: keys averaged over the context prefixes, the post-norm conversion;
* :mod:`.methods`: the methods (``memit``, ``intattn``, ``attn``, ``alphaedit``, ``pmet``,
  ``rome``, ``ft-l``, ``ft-m``).
"""

from . import methods  # noqa: F401  (registers the methods)
from .api import EditSequence, edit, edit_sequence, resolve_hparams
from .protocol import EDITORS, EditJob, Editor, editor, register, unregister
from .result import EditError, EditResult, apply_deltas
from .solvers import null_space_projector, rank_one_update, solve_projected, solve_update

#: Public names of :func:`register` and :func:`unregister` (``ia.register_editor``).
register_editor = register
unregister_editor = unregister

#: The registered methods by name (the same dictionary as :data:`EDITORS`).
METHODS = EDITORS

__all__ = [
    "EDITORS",
    "METHODS",
    "EditError",
    "EditJob",
    "EditResult",
    "EditSequence",
    "Editor",
    "apply_deltas",
    "edit",
    "edit_sequence",
    "editor",
    "null_space_projector",
    "rank_one_update",
    "register",
    "register_editor",
    "resolve_hparams",
    "solve_projected",
    "solve_update",
    "unregister",
    "unregister_editor",
]
