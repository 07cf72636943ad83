"""The editing methods, one module each; importing this package registers them all in
:data:`intattn_analysis.editors.EDITORS`.

* :mod:`.closed_form`: ``memit``, ``intattn``, ``attn`` and ``alphaedit`` (one solver loop,
  with or without AlphaEdit's null-space projection);
* :mod:`.pmet`: ``pmet``;
* :mod:`.rome`: ``rome``;
* :mod:`.ft`: ``ft-l`` and ``ft-m``.
"""

from . import closed_form, ft, pmet, rome  # noqa: F401  (registration)

__all__ = ["closed_form", "ft", "pmet", "rome"]
