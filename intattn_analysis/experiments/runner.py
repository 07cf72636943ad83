"""One way to run a unit of work: put the model in a state, measure it, restore, store.

A *unit* is (experiment, model state, facts, method, settings) -> stored rows. Every
experiment, ``intattn evaluate`` and notebook 03 declare their units and hand them to
this module, which does the rest the same way for all of them:

* it skips units the store already holds (a killed run resumes; shards split batches);
* it evaluates the unedited model once per batch, before anything is written, where
  the measurement needs it (Locality compares with the unedited model's predictions);
* it computes the second moments once for every setting of the run (one corpus pass per
  sample, cached on disk), and each batch's targets once for every method that agrees
  on them (:func:`intattn_analysis.editors.api.batch_targets`);
* it writes the batch with the setting's method, measures, restores the weights bit for
  bit, and stores each unit as soon as it is measured.

The pieces:

* :class:`Setting`: one way of editing (a row of a table), or the unedited model
  (:data:`PRE_EDIT`);
* :class:`Unit`: a stored result's key, file label and row columns;
* :class:`Cell`: one batch under one setting, with one unit per *part* measured on that
  model state (most experiments measure one part; ``outdated`` measures two);
* a *measure* (:class:`EvaluationMeasure`, or an experiment's own with the same three
  methods): what is measured on a model state;
* :func:`run_cells`: batches edited, measured and restored one setting at a time;
  :func:`run_sequence`: rounds of edits piling up on one model
  (:func:`intattn_analysis.edit_sequence`), a unit after each round;
* :class:`MemoryStore`: the store of a run whose rows are not written to disk.

Inside :func:`.planning.planning`, :func:`run_cells` and :func:`run_sequence` record the
units they are handed instead of computing them (``intattn status``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from tqdm.auto import tqdm

from ..editors import EditError, edit, edit_sequence, editor
from ..editors.api import batch_targets, resolve_hparams
from ..editors.moments import corpus_sample, moments_for
from ..facts import Fact
from ..loading import ModelHandle
from ..answers import GenerationSettings
from ..metrics import Evaluation, evaluate
from . import planning
from .units import fact_rows, generation_metrics, part_protocol, protocols_of

__all__ = ["PRE_EDIT", "Cell", "EvaluationMeasure", "MemoryStore", "Outcome", "SharedMoments", "Setting", "Unit",
           "run_cells", "run_sequence"]


# =========================================================================== what is run
@dataclass(frozen=True)
class Setting:
    """One way of editing: a row of a table.

    Attributes:
        name: the row name (``"MEMIT"``, ``"0.5"``, ``"pre-edit"``).
        method: the registered method that writes the batch; ``None`` for the unedited
            model.
        hparams: the method's hyperparameters (its dataclass).
        alone: edit each fact of the batch alone on the unedited model, measure it and
            restore before the next (the protocol of ROME's paper and of EasyEdit's single
            edits), instead of writing the whole batch.
    """

    name: str
    method: str | None = None
    hparams: Any = None
    alone: bool = False

    @property
    def edits(self) -> bool:
        """Whether the setting writes anything."""
        return self.method is not None


#: The unedited model.
PRE_EDIT = Setting("pre-edit")


@dataclass(frozen=True)
class Unit:
    """A stored result: its key (everything its rows depend on), the readable start of
    its file name, and the columns every one of its rows carries (``labels``)."""

    key: Mapping[str, Any]
    label: str
    labels: Mapping[str, Any]


@dataclass
class Cell:
    """One batch of facts under one setting: the model state the units measure.

    Attributes:
        batch: the batch number (cells of one batch share its pre-edit evaluation and its
            targets, and must be consecutive).
        facts: the batch.
        setting: how the batch is written.
        units: ``{part: unit}``: one stored unit per part measured on that state.
    """

    batch: int
    facts: Sequence[Fact]
    setting: Setting
    units: dict[str, Unit]


@dataclass
class Outcome:
    """What :func:`run_cells` computed for one unit: its rows, the evaluation behind them
    (where the measure keeps one), the targets the edit started from and the edit's
    timings (:attr:`intattn_analysis.EditResult.timings`)."""

    cell: Cell
    part: str
    rows: list[dict]
    evaluation: Evaluation | None = None
    targets: Any = None
    edit_timings: dict = field(default_factory=dict)


class Measure(Protocol):
    """What is measured on a model state (the unedited model or a batch written).

    Besides the three methods, a measure may set these attributes (read with defaults):

    * ``timed`` (default ``True``): whether its rows carry ``seconds``;
    * ``pre_rows`` (default ``False``): whether the unedited model's rows are its
      :meth:`pre` measurement itself, so that their ``seconds`` are that measurement's;
    * ``edit_in_seconds`` (default ``True``): whether an edited unit's ``seconds`` count
      the edit (with its targets) besides the measurement;
    * ``select(pre, positions)``: the unedited measurement of some facts of the batch,
      needed by settings that edit each fact alone.
    """

    def wants_pre(self, cells: Sequence[Cell], missing: Mapping[int, list[str]]) -> bool:
        """Whether the unedited model's measurement of the batch is needed, given the
        parts still missing (``missing[i]`` for ``cells[i]``)."""

    def pre(self, model: ModelHandle, facts: Sequence[Fact]) -> Any:
        """The unedited model's measurement of the batch (taken before any edit)."""

    def rows(self, model: ModelHandle, facts: Sequence[Fact], part: str, pre: Any,
             setting: Setting) -> tuple[list[dict], Evaluation | None]:
        """One part's rows on the model as it is now, and the evaluation behind them."""


@dataclass(frozen=True)
class EvaluationMeasure:
    """The per-fact metrics of :func:`intattn_analysis.evaluate` (:func:`.units.fact_rows`),
    edited settings against the unedited model's evaluation of the same batch; the
    pre-edit rows are that evaluation itself.

    Under ``protocol="both"`` or ``"generation"`` the cells carry a
    :data:`.units.GENERATION_PART` (:func:`.units.protocol_units`), measured under the
    generation protocol with ``generation``'s settings and the metric sets that have a
    generation form other than fluency (:func:`.units.generation_metrics`); the other
    part is the teacher-forced one."""

    metrics: tuple[str, ...] = ("knowedit", "residue", "fluency")
    fluency_tokens: int = 50
    protocol: str = "teacher-forced"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    pre_rows = True

    def wants_pre(self, cells, missing) -> bool:
        return True

    def _evaluate(self, model, facts, protocol: str, pre=None) -> Evaluation:
        metrics = generation_metrics(self.metrics) if protocol == "generation" else self.metrics
        return evaluate(model, list(facts), pre=pre, metrics=metrics, protocol=protocol, generation=self.generation,
                        fluency_tokens=self.fluency_tokens, progress=False)

    def pre(self, model, facts) -> dict[str, Evaluation]:
        return {protocol: self._evaluate(model, facts, protocol) for protocol in protocols_of(self.protocol)}

    def rows(self, model, facts, part, pre, setting):
        protocol = part_protocol(part)
        if not setting.edits:
            return fact_rows(pre[protocol]), pre[protocol]
        post = self._evaluate(model, facts, protocol, pre[protocol])
        return fact_rows(post), post

    def select(self, pre: Mapping[str, Evaluation], positions: Sequence[int]) -> dict[str, Evaluation]:
        """The unedited model's evaluation of some facts of the batch (for settings that
        edit each fact alone)."""
        return {protocol: evaluation.select(positions) for protocol, evaluation in pre.items()}


# =========================================================================== moments
class SharedMoments:
    """The second moments every setting of a run reads, computed once, when first asked
    for (one corpus pass per sample, :func:`intattn_analysis.editors.moments.moments_for`),
    or the ``moments`` given for all of them."""

    def __init__(self, model: ModelHandle, settings: Sequence[Setting], moments: Mapping | None = None,
                 progress: bool = True) -> None:
        self.model = model
        self.settings = [s for s in settings if s.edits]
        self.given = moments
        self.progress = progress
        self._by_sample: dict | None = None

    def for_hparams(self, hp) -> Mapping | None:
        """The moments an edit with ``hp`` reads (``None`` where it reads none)."""
        if self.given is not None:
            return self.given
        if self._by_sample is None:
            self._by_sample = self._compute()
        return self._by_sample.get(corpus_sample(hp))

    def _compute(self) -> dict:
        needed: dict[tuple, set] = {}
        example: dict[tuple, Any] = {}
        for setting in self.settings:
            spec = editor(setting.method)
            try:
                resolved, _ = resolve_hparams(self.model, spec, setting.hparams)  # the matrices written are known
            except EditError:
                continue  # its edit fails with this error when its turn comes, after the settings before it

            keys = spec.moments(self.model, resolved) if spec.moments is not None else []
            if keys:
                sample = corpus_sample(setting.hparams)
                needed.setdefault(sample, set()).update(keys)
                example.setdefault(sample, setting.hparams)
        return {sample: moments_for(self.model, keys, example[sample], progress=self.progress)
                for sample, keys in needed.items()}


# =========================================================================== batches
def run_cells(
    model: ModelHandle,
    cells: Sequence[Cell],
    measure: Measure,
    store,
    *,
    moments: Mapping | None = None,
    targets_cache=None,
    edit_seconds: bool = False,
    outcomes: list[Outcome] | None = None,
    desc: str = "",
    progress: bool = True,
) -> int:
    """Compute every unit of ``cells`` the store lacks; returns how many were computed.

    Cells are taken batch by batch (a batch's cells must be consecutive). For a batch
    with anything missing, the unedited model is measured first where ``measure`` needs
    it; then each setting writes the batch (targets shared within the batch, cached on
    disk under ``targets_cache``), its missing parts are measured and stored, and the
    weights are restored before the next. Every row of a timed measure carries
    ``seconds``: the wall time of the unit's measurement (for the unedited rows of a
    measure whose rows are its unedited measurement, that measurement; for an edited unit,
    with the edit and its targets where the measure counts them, in the cell's first
    part); with ``edit_seconds`` the rows of edited settings also carry the edit's own
    seconds (``edit_seconds``).
    ``moments`` serves every setting (default: :class:`SharedMoments`). ``outcomes``, if
    given, receives an :class:`Outcome` per computed unit as it is stored.
    """
    plan = planning.active()
    if plan is not None:  # list the units, compute nothing
        for cell in cells:
            for unit in cell.units.values():
                plan.record(store, unit.key, unit.label, unit.labels)
        return 0
    moments_of = SharedMoments(model, [c.setting for c in cells], moments, progress)
    computed = 0
    bar = tqdm(total=len(cells), desc=desc or model.name, disable=not progress)
    try:
        for _, group in itertools.groupby(cells, key=lambda c: c.batch):
            group = list(group)
            missing = {i: [p for p, u in c.units.items() if not store.has(u.key, u.label)]
                       for i, c in enumerate(group)}
            if not any(missing.values()):
                bar.update(len(group))
                continue
            facts = list(group[0].facts)
            pre, pre_seconds = None, 0.0
            if measure.wants_pre(group, missing):
                start = time.perf_counter()
                pre = measure.pre(model, facts)
                pre_seconds = time.perf_counter() - start
            shared: dict = {}
            for i, cell in enumerate(group):
                if missing[i]:
                    step = _run_cell(model, cell, missing[i], measure, store, facts, pre, pre_seconds, shared,
                                     moments_of, targets_cache, edit_seconds, progress)
                    computed += len(step)
                    if outcomes is not None:
                        outcomes.extend(step)
                bar.update()
    finally:
        bar.close()
    return computed


def _run_cell(model, cell, parts, measure, store, facts, pre, pre_seconds, shared, moments_of, targets_cache,
              edit_seconds, progress) -> list[Outcome]:
    """The missing ``parts`` of one cell, each stored as soon as it is measured."""
    setting = cell.setting
    if not setting.edits:
        done = []
        for part in parts:
            start = time.perf_counter()
            rows, evaluation = measure.rows(model, facts, part, pre, setting)
            seconds = time.perf_counter() - start + (pre_seconds if getattr(measure, "pre_rows", False) else 0.0)
            done.append(_store(store, cell, part, rows, evaluation, measure, seconds=seconds))
        return done
    if setting.alone:
        return _run_alone(model, cell, parts, measure, store, facts, pre, moments_of, edit_seconds, progress)
    start = time.perf_counter()
    targets = batch_targets(model, facts, setting.method, setting.hparams, shared, targets_cache)
    done = []
    with edit(model, facts, method=setting.method, hparams=setting.hparams,
              moments=moments_of.for_hparams(setting.hparams), targets=targets, progress=False) as result:
        edit_time = time.perf_counter() - start if getattr(measure, "edit_in_seconds", True) else 0.0
        for part in parts:
            begin = time.perf_counter()
            rows, evaluation = measure.rows(model, facts, part, pre, setting)
            extra = {"edit_seconds": result.timings.get("total", float("nan"))} if edit_seconds else {}
            done.append(_store(store, cell, part, rows, evaluation, measure,
                               seconds=edit_time + time.perf_counter() - begin, extra=extra, targets=targets,
                               timings=dict(result.timings)))
            edit_time = 0.0  # the edit is counted once, in the first part
    return done


def _run_alone(model, cell, parts, measure, store, facts, pre, moments_of, edit_seconds, progress) -> list[Outcome]:
    """Each fact of the batch edited alone on the unedited model, its parts measured
    against its own pre-edit values, and restored before the next."""
    setting = cell.setting
    if not hasattr(measure, "select"):
        raise TypeError(f"setting {setting.name!r} edits each fact alone, which needs a measure with "
                        f"select(pre, positions); {type(measure).__name__} has none")
    rows: dict[str, list[dict]] = {part: [] for part in parts}
    seconds = {part: 0.0 for part in parts}
    edit_total = 0.0
    for i, fact in enumerate(tqdm(facts, desc=f"{setting.method}, each fact alone", leave=False,
                                  disable=not progress)):
        start = time.perf_counter()
        with edit(model, [fact], method=setting.method, hparams=setting.hparams,
                  moments=moments_of.for_hparams(setting.hparams), progress=False) as result:
            edit_time = time.perf_counter() - start  # counted once, in the first part
            for part in parts:
                begin = time.perf_counter()
                fact_rows_, _ = measure.rows(model, [fact], part, measure.select(pre, [i]), setting)
                seconds[part] += edit_time + time.perf_counter() - begin
                edit_time = 0.0
                rows[part].append({**fact_rows_[0], "position": i})
        edit_total += result.timings.get("total", float("nan"))
    extra = {"edit_seconds": edit_total} if edit_seconds else {}
    return [_store(store, cell, part, rows[part], None, measure, seconds=seconds[part], extra=extra)
            for part in parts]


def _store(store, cell: Cell, part: str, rows: list[dict], evaluation, measure, *, seconds: float,
           extra: Mapping | None = None, targets=None, timings: Mapping | None = None) -> Outcome:
    unit = cell.units[part]
    timing = {"seconds": seconds} if getattr(measure, "timed", True) else {}
    stamped = [{**row, **timing, **(extra or {})} for row in rows]
    store.write_unit(unit.key, stamped, unit.label, dict(unit.labels))
    return Outcome(cell, part, stamped, evaluation, targets, dict(timings or {}))


# =========================================================================== sequences
def run_sequence(
    model: ModelHandle,
    rounds: Sequence[Sequence[Fact]],
    setting: Setting,
    units: Sequence[Unit | Mapping[str, Unit]],
    measure_round: Callable[..., list[dict]],
    store,
    *,
    moments: SharedMoments,
    before: Callable[[], None] | None = None,
) -> int:
    """Rounds of edits piling up on one model (:func:`intattn_analysis.edit_sequence`),
    with ``units[r]`` measured after round ``r`` (0-based) is applied; returns how many
    units were computed.

    ``units[r]`` is one unit, measured by ``measure_round(r)``, or ``{part: unit}``, each
    part measured by ``measure_round(r, part)`` (the protocols of
    :func:`.units.protocol_units`). Rounds already stored are applied again without being
    measured (the edits are deterministic), and the sequence stops after the last missing
    round. ``before`` is called once, on the unedited model, before the first round is
    applied (where a measurement needs the unedited model's values). Every edit is undone
    at the end, and if anything fails. Every row carries ``seconds`` (the round's edit,
    counted in its first part, and the part's measurement) and ``edit_seconds`` (the edit
    alone).
    """
    parted = [dict(u) if isinstance(u, Mapping) else {None: u} for u in units]
    plan = planning.active()
    if plan is not None:  # list the units, compute nothing
        for parts in parted:
            for unit in parts.values():
                plan.record(store, unit.key, unit.label, unit.labels)
        return 0
    missing = [[part for part, unit in parts.items() if not store.has(unit.key, unit.label)] for parts in parted]
    if not any(missing):
        return 0
    last = max(r for r, parts in enumerate(missing) if parts)
    if before is not None:
        before()
    computed = 0

    def after_each(r: int, sequence) -> None:
        nonlocal computed
        edit_time = sequence.edits[r].timings.get("total", float("nan"))
        counted = edit_time
        for part in missing[r]:
            start = time.perf_counter()
            rows = measure_round(r) if part is None else measure_round(r, part)
            seconds = counted + time.perf_counter() - start
            counted = 0.0
            unit = parted[r][part]
            store.write_unit(unit.key, [{**row, "seconds": seconds, "edit_seconds": edit_time} for row in rows],
                             unit.label, dict(unit.labels))
            computed += 1

    with edit_sequence(model, [list(r) for r in rounds[: last + 1]], method=setting.method,
                       hparams=setting.hparams, moments=moments.for_hparams(setting.hparams),
                       after_each=after_each, progress=False):
        pass
    return computed


# =========================================================================== in memory
class MemoryStore:
    """A store that keeps its units in memory, for runs whose rows are returned rather
    than written (``intattn evaluate``, notebook 03); the same methods as
    :class:`~intattn_analysis.experiments.store.ResultStore`."""

    def __init__(self, experiment: str = "memory") -> None:
        self.experiment = experiment
        self.units: dict[str, tuple[dict, list[dict]]] = {}

    def has(self, key: Mapping[str, Any], label: str = "") -> bool:
        return self.read_unit(key, label) is not None

    def read_unit(self, key: Mapping[str, Any], label: str = "") -> list[dict] | None:
        from .store import unit_id

        entry = self.units.get(unit_id(key, label))
        return None if entry is None else entry[1]

    def write_unit(self, key: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], label: str = "",
                   labels: Mapping[str, Any] | None = None) -> str:
        from .store import unit_id

        uid = unit_id(key, label)
        self.units[uid] = (dict(key), [{"unit": uid, "experiment": self.experiment, **(labels or {}), **row}
                                       for row in rows])
        return uid

    def rows(self):
        import pandas as pd

        return pd.DataFrame([row for _, rows in self.units.values() for row in rows])

    def __len__(self) -> int:
        return len(self.units)
