"""Edit-and-evaluate runs: batches of facts, several methods, one results table.

The paper's tables come from one procedure, repeated per batch of edits: evaluate the
unedited model, compute the shared targets ``z*`` once, then for each method write the
batch, evaluate, and restore the weights. :func:`edit_batches` does exactly that and returns
one metrics row per (batch, method), ready for :func:`intattn_analysis.reporting.main_table`.
:func:`editable_batches` (from :mod:`intattn_analysis.batching`) cuts a benchmark into
batches, leaving out (and listing) the records that ask for no change. Notebook 03 and
``intattn evaluate`` both use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from . import reporting
from .batching import editable_batches
from .editors import editor
from .experiments.editors import method_cells
from .answers import GenerationSettings
from .experiments.runner import EvaluationMeasure, MemoryStore, run_cells
from .experiments.units import GENERATION_PART, part_protocol
from .facts import Fact
from .hparams import EditHparams, hparams_for
from .loading import ModelHandle, cache_root
from .targets import ZTargets

__all__ = ["BatchRun", "edit_batches", "editable_batches"]


@dataclass
class BatchRun:
    """What :func:`edit_batches` measured.

    Attributes:
        records: one row per (batch, method), ``"pre-edit"`` included: the labels and
            every summary metric (:func:`intattn_analysis.reporting.record`).
        timings: one row per (batch, method): seconds for targets, solve and the edit.
        targets: the shared ``z*`` of each batch (index = batch number).
        per_fact: the per-fact metrics of every evaluation, labelled like ``records``.
    """

    records: pd.DataFrame
    timings: pd.DataFrame
    targets: list[ZTargets] = field(default_factory=list)
    per_fact: pd.DataFrame | None = None

    def table(self, metrics: Sequence[str] = reporting.MAIN_METRICS) -> pd.DataFrame:
        """Mean, std and batch count per (model, dataset, method), and per protocol where
        the run measured the generation protocol."""
        by = ("model", "dataset", "protocol", "method") if "protocol" in self.records.columns else \
            ("model", "dataset", "method")
        return reporting.main_table(self.records, metrics=[m for m in metrics if m in self.records.columns], by=by)


def edit_batches(
    model: ModelHandle,
    batches: Sequence[Sequence[Fact]],
    methods: Sequence[str],
    hparams: EditHparams | Mapping[str, object] | None = None,
    *,
    moments: Mapping | None = None,
    dataset: str = "",
    metrics: Sequence[str] = ("knowedit", "counterfact", "residue", "fluency"),
    fluency_tokens: int = 50,
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
    targets_cache: str | Path | None | bool = True,
    progress: bool = True,
) -> BatchRun:
    """Evaluate, edit with each method, evaluate again and restore, batch by batch.

    ``hparams`` is one :class:`EditHparams` for ``memit``, ``intattn`` and ``attn`` (the
    methods that split one residual), a ``{method: hparams}`` mapping, or ``None``; a
    method it does not cover runs with its own defaults
    (:func:`intattn_analysis.hparams_for`).

    The units are the ``editors`` experiment's, run by the same runner
    (:func:`intattn_analysis.experiments.runner.run_cells`) into a store held in memory.
    The closed-form family's targets depend only on the unedited model, the facts, the
    last edited layer and the target settings, so the methods of a batch that agree on
    these share them (computed once per batch); ROME and fine-tuning work out their own.
    They are the expensive part (about 4 s per fact on a 2-core CPU with SmolLM2), so each
    fact's target is cached on disk (``targets_cache``: ``True`` for
    ``<cache root>/targets``, a folder, or ``False``/``None`` for no cache; see
    :func:`intattn_analysis.compute_z`). The weights are restored bit for bit after each
    method, so methods and batches do not see each other's edits. Every method name is
    checked before anything runs. If a batch fails, the exception carries the rows
    recorded before the failure as ``error.partial_run`` (a :class:`BatchRun`).

    ``protocol`` (``"teacher-forced"``, ``"generation"`` or ``"both"``) and
    ``generation`` are :func:`intattn_analysis.evaluate`'s; each batch is edited once and
    measured under each protocol. Under any protocol other than ``"teacher-forced"`` the
    records and per-fact rows carry a ``protocol`` column.
    """
    if targets_cache is True:
        targets_cache = cache_root() / "targets"
    elif targets_cache is False:
        targets_cache = None
    if not batches:
        raise ValueError("batches is empty; pass at least one batch of facts")
    if not methods:
        raise ValueError("methods is empty; name at least one of intattn_analysis.METHODS")
    for method in methods:
        editor(method)  # an unknown name is an EditError naming the known ones
    settings = {method: (method, _method_hparams(model, method, hparams)) for method in methods}
    generation = generation or GenerationSettings()
    cells = method_cells(model, [list(b) for b in batches], settings, dataset=dataset, metrics=tuple(metrics),
                         fluency_tokens=fluency_tokens, alone=(), protocol=protocol, generation=generation)
    measure = EvaluationMeasure(tuple(metrics), fluency_tokens, protocol, generation)
    outcomes: list = []
    try:
        run_cells(model, cells, measure, MemoryStore(), moments=moments,
                  targets_cache=targets_cache, outcomes=outcomes, desc=f"{model.name} {dataset}".strip(),
                  progress=progress)
    except BaseException as error:
        # what finished is not lost: it travels with the exception
        error.partial_run = _batch_run(outcomes, model.name, dataset, protocol)  # type: ignore[attr-defined]
        raise
    return _batch_run(outcomes, model.name, dataset, protocol)


def _batch_run(outcomes, model_name: str, dataset: str, protocol: str = "teacher-forced") -> BatchRun:
    """The tables of a :class:`BatchRun` from the runner's outcomes, in the order run."""
    records, timings, per_fact, targets_of = [], [], [], []
    for outcome in outcomes:
        setting = outcome.cell.setting
        labels = {"model": model_name, "dataset": dataset, "batch": outcome.cell.batch}
        if protocol != "teacher-forced":
            labels["protocol"] = part_protocol(outcome.part)
        method = setting.method if setting.edits else "pre-edit"
        records.append(reporting.record(outcome.evaluation, **labels, method=method))
        per_fact.append(outcome.evaluation.per_fact.assign(**labels, method=method))
        if not setting.edits or (protocol == "both" and outcome.part == GENERATION_PART):
            continue  # one timing row per edit
        targets = outcome.targets
        if targets is not None and not any(targets is known for known in targets_of):
            targets_of.append(targets)
        timings.append({**labels, "method": method,
                        "targets_s": targets.seconds if targets is not None else outcome.edit_timings["targets"],
                        **outcome.edit_timings})
    return BatchRun(records=pd.DataFrame(records), timings=pd.DataFrame(timings), targets=targets_of,
                    per_fact=pd.concat(per_fact, ignore_index=True) if per_fact else None)


#: The methods a single :class:`EditHparams` given to :func:`edit_batches` applies to.
SHARED_HPARAMS_METHODS = ("memit", "intattn", "attn")


def _method_hparams(model: ModelHandle, method: str, hparams):
    if isinstance(hparams, Mapping):
        return hparams[method] if method in hparams else hparams_for(model, method)
    if hparams is not None and method in SHARED_HPARAMS_METHODS:
        return hparams
    return hparams_for(model, method)
