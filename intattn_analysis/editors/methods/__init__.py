"""The editing methods, one module each; importing this package imports every module in
it, and each module registers its editors in :data:`intattn_analysis.editors.EDITORS`
(so a new method is one new module here, plus its defaults files).

* :mod:`.closed_form`: ``memit``, ``intattn``, ``attn`` and ``alphaedit`` (one solver loop,
  with or without AlphaEdit's null-space projection);
* :mod:`.ft`: ``ft-l`` and ``ft-m``;
* :mod:`.pmet`: ``pmet``;
* :mod:`.rome`: ``rome``.
"""

from __future__ import annotations

import importlib
import pkgutil

#: The method modules, in the order they are imported (and their editors registered):
#: alphabetical, so that the registry's order does not depend on the file system.
MODULES: tuple[str, ...] = tuple(sorted(info.name for info in pkgutil.iter_modules(__path__)))

for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
del _module

__all__ = ["MODULES"]
