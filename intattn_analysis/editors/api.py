"""``ia.edit`` and ``ia.edit_sequence``: one entry point for every method of the family.

:func:`edit` does for every registered method (:data:`intattn_analysis.editors.EDITORS`)
what does not depend on the method: it checks the facts, resolves the hyperparameters
(the method's defaults file, then ``hparams=``, then keyword overrides), computes or
checks the second moments, context prefixes and targets the method needs, snapshots every
matrix the method declares, runs the method, and restores the snapshot if anything fails.

:func:`edit_sequence` applies batch after batch to the same model, as a model is edited
over time: each batch's targets are computed on the model as the earlier batches left it,
and what a method carries (AlphaEdit's keys edited so far) goes from one batch to the
next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from torch import Tensor
from tqdm.auto import tqdm

from ..facts import SUBJECT_SLOT, Fact
from ..hparams import hparams_for
from ..loading import ModelHandle
from ..targets import DEFAULT_Z_BATCH, TARGET_SITES, ZTargets, compute_z, context_templates, target_settings
from .moments import moments_for
from .protocol import EditJob, Editor, editor
from .result import EditError, EditResult, check_layers, snapshot

__all__ = ["EditSequence", "shares_targets", "batch_targets", "edit", "edit_sequence", "resolve_hparams"]

def shares_targets(spec: Editor) -> bool:
    """Whether ``spec``'s targets are computed once for a whole batch before anything is
    written, so that the methods compared on it can share them (its site's
    :attr:`~intattn_analysis.targets.TargetSite.shared`; ROME's are set fact after fact, on
    the model as the earlier facts left it)."""
    return spec.targets is not None and TARGET_SITES[spec.targets].shared


def _shared_sites() -> str:
    return ", ".join(name for name, site in TARGET_SITES.items() if site.shared)


# =========================================================================== inputs
def asks_another_answer(first: Fact, later: Fact) -> bool:
    """Whether ``later`` asks ``first``'s question (subject and prompt) for another new
    answer: two such facts cannot be written by one batch."""
    return ((first.subject, first.prompt) == (later.subject, later.prompt)
            and first.target_new.strip() != later.target_new.strip())


def check_facts(facts: Any) -> list[Fact]:
    """The batch as a list of :class:`Fact` s that an edit can write (clear errors
    otherwise: an empty batch, a fact whose new answer is its old one, two answers asked
    of one prompt)."""
    if isinstance(facts, Fact):
        facts = [facts]
    elif isinstance(facts, (str, bytes)) or not isinstance(facts, Iterable):
        raise EditError(f"facts must be a Fact or a list of Facts, got {type(facts).__name__}")
    facts = [Fact.from_dict(f) if isinstance(f, Mapping) else f for f in facts]
    if not facts:
        raise EditError("facts is empty; pass at least one Fact to edit")
    for i, fact in enumerate(facts):
        if not isinstance(fact, Fact):
            raise EditError(f"facts[{i}] is a {type(fact).__name__}, not a Fact")
        if not fact.changes_answer:
            raise EditError(
                f"facts[{i}] ({fact.text!r}): target_new {fact.target_new!r} equals target_true; "
                "an edit must change the answer"
            )
    # one batch cannot write two answers for one key: the least-squares solve would settle
    # on some compromise and one of the requests would be lost without a word
    seen: dict[tuple[str, str], int] = {}
    for i, fact in enumerate(facts):
        first = seen.setdefault((fact.subject, fact.prompt), i)
        if asks_another_answer(facts[first], fact):
            raise EditError(
                f"facts[{first}] and facts[{i}] ask {fact.text!r} for two answers "
                f"({facts[first].target_new!r} and {fact.target_new!r}); one batch can write "
                "only one. Keep one of them, or edit them in separate batches"
            )
    return facts


def resolve_hparams(
    model: ModelHandle, spec: Editor, hparams: Any = None, *, layers=None, alpha=None,
    **overrides: Any,
) -> tuple[Any, dict[int, float]]:
    """The hyperparameters an edit runs with, and its attention share per layer.

    ``hparams`` (default: the method's defaults for the model,
    :func:`intattn_analysis.hparams_for`) must be the method's dataclass; ``layers``,
    ``alpha`` and any other field given as a keyword replace the field (unknown names
    are an :class:`EditError` that lists the known ones).
    """
    try:
        hp = hparams if hparams is not None else hparams_for(model, spec.name)
    except ValueError as error:
        raise EditError(str(error)) from None
    if not isinstance(hp, spec.hparams_type):
        raise EditError(
            f"method {spec.name!r} reads {spec.hparams_type.__name__}, got hparams of type "
            f"{type(hp).__name__}; use ia.hparams_for(model, {spec.name!r}) as a start"
        )
    changes = dict(overrides)
    if layers is not None:
        if isinstance(layers, int):
            layers = [layers]
        changes["layers"] = tuple(check_layers(model, list(layers)))
    if alpha is not None:
        if not spec.reads_alpha and "alpha" not in spec.hparams_type.__dataclass_fields__:
            raise EditError(f"method {spec.name!r} has no alpha; it applies to method='intattn'")
        if not isinstance(alpha, Mapping):
            try:
                value = float(alpha)
            except (TypeError, ValueError):
                raise EditError(f"alpha must be a number in [0, 1] or {{layer: alpha}}, got {alpha!r}") from None
            if not 0.0 <= value <= 1.0:
                raise EditError(
                    f"alpha must lie in [0, 1] (0: MLP only as MEMIT, 1: attention only), got {alpha!r}"
                )
        changes["alpha"] = alpha
    if changes:
        try:
            hp = hp.replace(**changes)
        except TypeError as error:  # an unknown field
            raise EditError(f"method {spec.name!r}: {error}") from None
        except ValueError as error:
            raise EditError(str(error)) from None
    check_layers(model, list(hp.layers))
    if spec.prepare is not None:
        return spec.prepare(model, hp, alpha is not None)
    return hp, {}


def _moments(model, needed, hp, moments, progress: bool):
    """The second moments of every matrix in ``needed``: ``moments`` checked, or gathered
    from the corpus sample ``hp`` names (:func:`.moments.moments_for`) when it is ``None``."""
    if not needed:
        return {}
    if moments is None:
        moments = moments_for(model, needed, hp, progress=progress)
    missing = [k for k in needed if k not in moments]
    if missing:
        raise EditError(
            f"missing second moments for {missing}; moments must cover every matrix the method "
            f"reads: {sorted(needed, key=lambda k: (k[1], k[0]))}. Leave moments=None to compute "
            "them, or include these keys"
        )
    for key in needed:
        d_in = model.key_dim(*key)
        shape = tuple(moments[key].shape)
        if shape != (d_in, d_in):
            raise EditError(f"moments[{key}] has shape {shape}; expected ({d_in}, {d_in})")
    return moments


def batch_targets(model: ModelHandle, facts: Sequence[Fact], method: str | Editor, hparams,
                  shared: dict, cache_dir=None) -> ZTargets | None:
    """The targets ``method`` can take for a batch, computed once per batch for every
    method that agrees on them: ``shared`` (one dict per batch) holds them under their
    site, last layer, context prefixes and target settings. ``None`` for methods that set
    their own (ROME) or have none (fine-tuning). ``cache_dir`` caches the targets of a site
    that may be cached (residual targets; PMET's are not cached)."""
    spec = editor(method)
    if not shares_targets(spec):
        return None
    check_layers(model, list(hparams.layers))  # a layer the model lacks is named before any work
    key = (spec.targets, max(hparams.layers), hparams.n_context_templates, hparams.context_template_length,
           tuple(sorted(target_settings(hparams).items())))
    if key not in shared:
        shared[key] = compute_z(model, facts, hparams, progress=False, site=spec.targets,
                                cache_dir=cache_dir if TARGET_SITES[spec.targets].cached else None)
    return shared[key]


def check_targets(targets: ZTargets, facts: list[Fact], layer: int, templates,
                  site: str = "residual", model: ModelHandle | None = None, hparams=None) -> None:
    """Precomputed targets must belong to these facts, this layer, this site, these
    contexts, this model state and these target settings."""
    if not isinstance(targets, ZTargets):
        raise EditError(f"targets must come from compute_z (a ZTargets), got {type(targets).__name__}")
    if model is not None and targets.model_state and targets.model_state != model.state_id:
        raise EditError(
            f"targets were computed on the model in state {targets.model_state!r}, but it is now "
            f"{model.state_id!r} (an edit was applied or restored since); compute them again"
        )
    if hparams is not None and targets.settings:
        wanted = target_settings(hparams)
        differ = sorted(k for k in wanted if targets.settings.get(k, wanted[k]) != wanted[k])
        if differ:
            raise EditError(
                f"targets were computed with other target settings ({', '.join(differ)}: "
                f"{[targets.settings.get(k) for k in differ]} against {[wanted[k] for k in differ]}); "
                "compute them with the hparams of this edit"
            )
    if targets.site != site:
        raise EditError(f"targets were set for site {targets.site!r}; this method needs {site!r} "
                        f"targets (compute_z(..., site={site!r}))")
    keys = [d["fact"] for d in targets.diagnostics]
    if keys != [f.key for f in facts]:
        raise EditError(
            f"targets were computed for {len(keys)} other facts (or another order); "
            "compute them with compute_z on exactly these facts"
        )
    if targets.layer != layer:
        raise EditError(
            f"targets are set at layer {targets.layer} but the last edited layer is "
            f"{layer}; compute them with the same layers"
        )
    if list(targets.context_templates) != list(templates):
        raise EditError("targets were computed under other context templates; use the same hparams")


# =========================================================================== edit
def edit(
    model: ModelHandle,
    facts: Fact | Sequence[Fact],
    *,
    method: str | Editor = "intattn",
    hparams: Any = None,
    layers: Sequence[int] | None = None,
    alpha: float | Mapping[int, float] | None = None,
    moments: Mapping[tuple[str, int], Tensor] | None = None,
    targets: ZTargets | None = None,
    state: Any = None,
    templates: Sequence[str] | None = None,
    z_batch_size: int = DEFAULT_Z_BATCH,
    progress: bool = True,
    **overrides: Any,
) -> EditResult:
    """Write ``facts`` (their ``target_new``) into the model's weights, in place.

    Args:
        model: a loaded model.
        facts: the facts to write (one batch).
        method: a registered method (``"memit"``, ``"intattn"``, ``"attn"``,
            ``"alphaedit"``, ``"pmet"``, ``"rome"``, ``"ft-l"``, ``"ft-m"``; see
            :data:`intattn_analysis.editors.EDITORS`) or an :class:`Editor`.
        hparams: all settings, as the method's dataclass; default the method's defaults
            for the model (:func:`intattn_analysis.hparams_for`).
        layers: edited layers (overrides ``hparams.layers``).
        alpha: IntAttn-Edit's attention share: a number in [0, 1] or ``{layer: alpha}``
            (for example ``ia.balance(trace_result, layers)``).
        moments: ``{(module, layer): E[k kᵀ]}`` for every matrix whose second moment the
            method reads; default computed by
            :func:`intattn_analysis.covariance.second_moments` (cached on disk).
        targets: for methods that start from shared targets (the closed-form family's
            ``z*``, :func:`intattn_analysis.targets.compute_z` with the same hparams).
            They depend only on the model, the facts and the target settings, so methods
            compared on one batch can share them; default computed here.
        state: what the previous edit of a sequence carried (``EditResult.state``), for
            methods that carry state (AlphaEdit's keys edited so far).
        templates: the context prefixes; default generated by the model
            (:func:`intattn_analysis.targets.context_templates`).
        z_batch_size: facts whose targets are optimised together (memory only).
        progress: show progress bars.
        **overrides: any field of the method's hparams (``projection="null_space"``,
            ``lambda_mlp=500``, ``v_steps=10``, ``lr=1e-3``...).

    Returns:
        an :class:`EditResult`; the weights stay edited until it is restored (use it as a
        context manager to edit temporarily).
    """
    started = time.perf_counter()
    plan = _plan_edit(model, facts, method, hparams, layers, alpha, targets, state, overrides)
    spec, hp = plan.spec, plan.hparams
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    moments = _moments(model, plan.needed_moments(model), hp, moments, progress)
    timings["moments"] = time.perf_counter() - t0
    templates = _edit_templates(model, spec, hp, templates)
    targets = _edit_targets(model, plan, templates, targets, z_batch_size, progress, timings)

    result = EditResult(
        model=model, method=spec.name, layers=tuple(hp.layers), alphas=dict(plan.alphas), hparams=hp,
        timings=timings, z_diagnostics=list(targets.diagnostics) if targets is not None else [],
        context_templates=templates,
    )
    job = EditJob(model=model, facts=plan.facts, hparams=hp, alphas=dict(plan.alphas), templates=templates,
                  targets=targets, moments=moments, state=state, progress=progress, result=result,
                  z_batch_size=z_batch_size)
    applied = _apply_or_restore(spec, job, result, snapshot(model, plan.writes))
    # methods that optimise their targets as they go (ROME) count them under "targets"
    timings["solve"] = applied - (timings["targets"] if targets is None else 0.0)
    timings["total"] = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class _EditPlan:
    """What an edit runs with once its arguments are checked: the method, the facts,
    the resolved hyperparameters, the attention share per layer, and the matrices the
    method writes (snapshotted before it runs)."""

    spec: Editor
    facts: list[Fact]
    hparams: Any
    alphas: dict[int, float]
    writes: list

    def needed_moments(self, model: ModelHandle) -> list:
        """The ``(module, layer)`` second moments the method reads."""
        return list(self.spec.moments(model, self.hparams)) if self.spec.moments is not None else []


def _plan_edit(model: ModelHandle, facts, method, hparams, layers, alpha, targets, state,
               overrides: dict) -> _EditPlan:
    """Resolve the method, the facts and the hyperparameters of :func:`edit`, and check
    that ``targets=`` and ``state=`` suit the method."""
    spec = editor(method)
    facts = check_facts(facts)
    hp, alphas = resolve_hparams(model, spec, hparams, layers=layers, alpha=alpha, **overrides)
    writes = list(spec.writes(model, hp))
    if targets is not None and not shares_targets(spec):
        raise EditError(
            f"method {spec.name!r} computes its own targets "
            f"({spec.targets or 'it has none'}); pass targets= only to methods whose targets "
            f"are computed once for the batch ({_shared_sites()} targets)"
        )
    if state is not None and not spec.carries_state:
        raise EditError(f"method {spec.name!r} carries no state between edits; pass state=None")
    return _EditPlan(spec=spec, facts=facts, hparams=hp, alphas=alphas, writes=writes)


def _edit_templates(model: ModelHandle, spec: Editor, hp, templates) -> list[str]:
    """The context prefixes of an edit: ``templates``, or the model's own for a method
    that uses them; they must include the bare prompt."""
    if templates is None and spec.uses_templates:
        templates = context_templates(model, hp.n_context_templates, hp.context_template_length)
    templates = list(templates or [])
    if spec.uses_templates and SUBJECT_SLOT not in templates:
        raise EditError(f"templates must include the bare prompt {SUBJECT_SLOT!r} (the keys and targets "
                        f"are read there), got {templates}")
    return templates


def _edit_targets(model: ModelHandle, plan: _EditPlan, templates: list[str], targets: ZTargets | None,
                  z_batch_size: int, progress: bool, timings: dict[str, float]) -> ZTargets | None:
    """The shared targets of the batch, computed here or checked when given, with the
    seconds spent on them in ``timings["targets"]``; ``None`` for a method that sets its
    own targets or has none."""
    spec, hp = plan.spec, plan.hparams
    t0 = time.perf_counter()
    timings["targets"] = 0.0
    if shares_targets(spec):
        if targets is None:
            try:
                targets = compute_z(model, plan.facts, hp, templates=templates, batch_size=z_batch_size,
                                    progress=progress, site=spec.targets)
            except ValueError as error:  # a fact, a layer or a setting the targets cannot take
                raise EditError(str(error)) from None
        else:
            check_targets(targets, plan.facts, max(hp.layers), templates, spec.targets, model, hp)
        timings["targets"] = time.perf_counter() - t0
    return targets


def _apply_or_restore(spec: Editor, job: EditJob, result: EditResult, saved) -> float:
    """Run the method on ``job`` with the weights it writes saved in ``saved``, and
    return the seconds it took; if anything fails, the saved weights are put back
    before the exception propagates."""
    result._opened(saved)
    t0 = time.perf_counter()
    result._applying = True
    try:
        spec.apply(job)
        result._settle()
    except BaseException:
        result._applying = False
        result.restore()
        raise
    result._applying = False
    return time.perf_counter() - t0


# =========================================================================== sequences
@dataclass
class EditSequence:
    """The edits of :func:`edit_sequence`, oldest first; restoring undoes them all.

    Attributes:
        edits: one :class:`EditResult` per batch, as applied.
        method: the method's name.
    """

    edits: list[EditResult] = field(default_factory=list)
    method: str = ""

    @property
    def state(self) -> Any:
        """What the last edit carried (AlphaEdit's keys edited so far)."""
        return self.edits[-1].state if self.edits else None

    def restore(self) -> None:
        """Undo every edit of the sequence, newest first (bit for bit)."""
        for result in reversed(self.edits):
            result.restore()

    def __enter__(self) -> "EditSequence":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.restore()
        return False

    def __len__(self) -> int:
        return len(self.edits)

    def __iter__(self):
        return iter(self.edits)


def edit_sequence(
    model: ModelHandle,
    batches: Sequence[Sequence[Fact]],
    *,
    method: str | Editor = "intattn",
    hparams: Any = None,
    moments: Mapping[tuple[str, int], Tensor] | None = None,
    templates: Sequence[str] | None = None,
    after_each=None,
    progress: bool = True,
    **overrides: Any,
) -> EditSequence:
    """Apply ``batches`` one after another to the same model, as edits pile up over time.

    Each batch is an :func:`edit` of the model as the earlier batches left it: its
    targets are optimised on the edited model, and a method that carries state
    (AlphaEdit) hands it on. The second moments and the context prefixes are those of
    the model before the first batch, computed once (the reference implementations of
    MEMIT and AlphaEdit do the same: their ``C`` describes the knowledge to preserve,
    which is the unedited model's); pass ``moments=`` or ``templates=`` to choose others.

    ``after_each(i, sequence)`` is called after batch ``i`` (0-based) is applied, for
    example to evaluate every edit so far. If a batch fails, every batch of the sequence
    is restored before the exception propagates. Returns an :class:`EditSequence`, whose
    :meth:`~EditSequence.restore` undoes them all.
    """
    spec = editor(method)
    batches = [check_facts(batch) for batch in batches]
    if not batches:
        raise EditError("batches is empty; pass at least one batch of facts")
    hp, _ = resolve_hparams(model, spec, hparams, **overrides)
    needed = list(spec.moments(model, hp)) if spec.moments is not None else []
    moments = _moments(model, needed, hp, moments, progress)
    if templates is None and spec.uses_templates:
        templates = context_templates(model, hp.n_context_templates, hp.context_template_length)
    sequence = EditSequence(method=spec.name)
    try:
        for i, batch in enumerate(tqdm(batches, desc=f"{spec.name} sequence", disable=not progress)):
            result = edit(model, batch, method=spec, hparams=hp, moments=moments,
                          templates=templates, state=sequence.state if spec.carries_state else None,
                          progress=False)
            sequence.edits.append(result)
            if after_each is not None:
                after_each(i, sequence)
    except BaseException:
        sequence.restore()
        raise
    return sequence
