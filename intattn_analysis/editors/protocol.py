"""The editor protocol: what one editing method declares, and the job it is handed.

A method is one module under :mod:`intattn_analysis.editors.methods` (or a module of its
user's, through ``ia.register_editor``) that registers an :class:`Editor` in
:data:`EDITORS`; its defaults are data files beside it. The editor says

* who it is in tables (``label``) and whether the experiments comparing the family give
  it a row (``compared``);
* which hyperparameter dataclass it reads (``hparams_type``), where its defaults per
  model live (``defaults_folder``, read by :func:`intattn_analysis.hparams_for`) and the
  rule for a model without one (``generic``);
* which matrices it may write for given hparams (``writes``), so that
  :func:`intattn_analysis.edit` can snapshot them before anything is written and restore
  them if anything fails;
* what it needs: second moments (``moments``: the matrices whose corpus second moment it
  reads), targets (``targets``: the kind of optimised target it starts from, so that
  methods of one kind can share them on a batch) and carried state (``carries_state``:
  what one edit of a sequence hands to the next, such as AlphaEdit's keys edited so far);
* and ``apply``: a function of an :class:`EditJob` that computes the deltas and writes
  them through :meth:`EditJob.write` (methods whose later steps read the model as the
  earlier steps left it, such as MEMIT's layer loop, ROME's facts one after another and
  fine-tuning, must write as they go).

:func:`intattn_analysis.edit` does the rest for every method alike: checks the facts,
resolves the hparams, computes or checks the moments, templates and targets, snapshots,
calls ``apply``, settles the deltas and returns an
:class:`~intattn_analysis.editors.result.EditResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor

from ..facts import Fact
from ..hparams import METHOD_DEFAULTS, register_defaults
from ..loading import ModelHandle
from ..targets import TARGET_SITES
from .result import EditError, EditResult

__all__ = ["EDITORS", "Editor", "EditJob", "editor", "register", "unregister"]

Key = tuple[str, int]



@dataclass
class EditJob:
    """Everything one edit works with; an editor's ``apply`` reads it and writes through
    :meth:`write`.

    Attributes:
        model: the model being edited.
        facts: the checked facts of the batch.
        hparams: the resolved hyperparameters (the editor's dataclass).
        alphas: the attention share per edited layer (closed-form family), else empty.
        templates: the context prefixes (``"{}"`` first) the targets and keys use.
        targets: the batch's targets when the editor starts from shared ones, else None.
        moments: ``{(module, layer): E[k kᵀ]}`` for every matrix in ``editor.moments``.
        state: what the previous edit of a sequence carried (None for the first).
        progress: show progress bars.
        result: the :class:`EditResult` being filled in.
    """

    model: ModelHandle
    facts: list[Fact]
    hparams: Any
    alphas: dict[int, float]
    templates: list[str]
    targets: Any
    moments: Mapping[Key, Tensor]
    state: Any
    progress: bool
    result: EditResult
    z_batch_size: int = 16
    scratch: dict = field(default_factory=dict)

    def write(self, key: Key, delta: Tensor) -> Tensor:
        """Add ``delta`` (``[d_out, d_in]``) to a declared matrix; returns what was added."""
        return self.result._write(key, delta)

    def changed_in_place(self, key: Key) -> None:
        """Tell the result that the method changed a declared matrix itself."""
        self.result._changed_in_place(key)


@dataclass(frozen=True)
class Editor:
    """One editing method (see the module notes).

    Attributes:
        name: the registry key (``ia.edit(method=name)``).
        hparams_type: its hyperparameter dataclass (with ``replace``, ``to_json``,
            ``from_dict``).
        apply: computes and writes the deltas for an :class:`EditJob`.
        writes: ``(model, hparams) -> [(module, layer)]``: every matrix it may write.
        moments: ``(model, hparams) -> [(module, layer)]``: the second moments it reads
            (``None``: none).
        targets: the site of the targets it optimises (a name of
            :data:`intattn_analysis.targets.TARGET_SITES`, declared with
            :func:`~intattn_analysis.targets.register_target_site`), or ``None``. Targets
            of a shared site are computed once for the batch before anything is written,
            so they can be passed in and shared by the methods compared on a batch; ROME
            sets its own fact after fact.
        uses_templates: whether it reads context prefixes.
        reads_alpha: whether IntAttn-Edit's balance factor applies to it.
        carries_state: whether one edit of a sequence hands state to the next.
        prepare: ``(model, hparams, alpha_given) -> (hparams, alphas)``: method-specific
            checks and resolution before any work (default: no alphas).
        description: one line for tables.
        reference: the published algorithm and reference code it follows.
        variant: ``(model, hparams) -> dict``: what else decides its deltas on this model
            besides the hyperparameters (a code path the architecture selects), for the
            keys of stored results; ``None`` (or an empty dict): nothing.
        label: its name in tables (``"MEMIT"``); default :attr:`name`.
        compared: whether the experiments that compare the family give it a row (the
            ``editors`` experiment's main table, batch scaling, sequential editing);
            ``False`` for ablations.
        generic: ``n_layers -> (hparams, rule)``: the settings for a model without a
            defaults file, from its depth, and one line naming the rule (``None``: such a
            model needs ``hparams=``).
        defaults_folder: where its ``<model>.json`` defaults files live; default the
            package's ``data/hparams/<name>`` (:func:`intattn_analysis.hparams.defaults_dir`).
    """

    name: str
    hparams_type: type
    apply: Callable[[EditJob], None]
    writes: Callable[[ModelHandle, Any], Sequence[Key]]
    moments: Callable[[ModelHandle, Any], Sequence[Key]] | None = None
    targets: str | None = None
    uses_templates: bool = True
    reads_alpha: bool = False
    carries_state: bool = False
    prepare: Callable[[ModelHandle, Any, bool], tuple[Any, dict[int, float]]] | None = None
    description: str = ""
    reference: str = ""
    variant: Callable[[ModelHandle, Any], dict] | None = None
    label: str = ""
    compared: bool = True
    generic: Callable[[int], tuple[Any, str]] | None = None
    defaults_folder: str | Path | None = None

    @property
    def display(self) -> str:
        """Its name in tables: :attr:`label`, else :attr:`name`."""
        return self.label or self.name

    def variant_of(self, model: ModelHandle, hparams: Any) -> dict:
        """:attr:`variant` on ``model`` (empty where it has none)."""
        return dict(self.variant(model, hparams)) if self.variant is not None else {}

    def __post_init__(self) -> None:
        if self.targets is not None and self.targets not in TARGET_SITES:
            raise ValueError(f"targets must be a registered target site ({sorted(TARGET_SITES)}) or None, "
                             f"got {self.targets!r}; declare a new one with register_target_site")


#: Every registered method, by name.
EDITORS: dict[str, Editor] = {}


def register(editor_: Editor) -> Editor:
    """Add an editor to :data:`EDITORS`, with where its defaults come from
    (:func:`intattn_analysis.hparams.register_defaults`); a second editor of one name is
    an error. ``ia.register_editor`` is this function: a method defined outside the
    package is registered the same way and then runs through ``ia.edit``,
    ``ia.edit_sequence`` and the experiments like the package's own."""
    if not isinstance(editor_, Editor):
        raise TypeError(f"register takes an Editor, got {type(editor_).__name__}")
    if editor_.name in EDITORS and EDITORS[editor_.name] is not editor_:
        raise ValueError(f"an editor named {editor_.name!r} is already registered; choose another name "
                         "or unregister_editor it first")
    labels = {e.display: e.name for e in EDITORS.values() if e.name != editor_.name}
    if editor_.display in labels:
        raise ValueError(f"the label {editor_.display!r} is already the label of {labels[editor_.display]!r}; "
                         "give the editor another label")
    register_defaults(editor_.name, editor_.hparams_type, folder=editor_.defaults_folder, generic=editor_.generic)
    EDITORS[editor_.name] = editor_
    return editor_


def unregister(name: str) -> Editor:
    """Remove a registered editor (and its defaults' declaration); returns it."""
    if name not in EDITORS:
        raise EditError(f"no editor named {name!r} is registered; known: {sorted(EDITORS)}")
    METHOD_DEFAULTS.pop(name, None)
    return EDITORS.pop(name)


def editor(method: str | Editor) -> Editor:
    """The registered editor of a name (or the editor itself)."""
    if isinstance(method, Editor):
        return method
    if method not in EDITORS:
        raise EditError(f"unknown method {method!r}; known methods: {sorted(EDITORS)}")
    return EDITORS[method]
