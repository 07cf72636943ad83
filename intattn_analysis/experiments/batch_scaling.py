"""Experiment ``batch-scaling``: how each editor degrades as more facts are written at once.

For each batch size ``b`` of :attr:`ScalingScale.sizes` the first editable test facts
are cut into consecutive batches of ``b`` (enough batches to cover ``n_facts`` facts, at
least one), and every method of :data:`ROWS` writes each batch, is evaluated on it and
is restored (the ``editors`` experiment's units, :func:`.editors.run_methods`, with the
batch size among the labels). The facts are the same at every size up to ``n_facts``
(the first ``n_facts`` editable records; a larger batch starts with them), so a method
at size ``b`` is paired with itself at the smallest size on the same facts
(:func:`summarise`'s ``scaling`` table), and each method with MEMIT at the same size.

The methods (:data:`ROWS`): every row of the main table that writes its batch at once,
so every compared editor, including those registered with ``ia.register_editor``, but
the fine-tuning baselines (:data:`LEFT_OUT`):

* ``ROME``: its batch written fact after fact, each rank-one update on the model as the
  earlier ones left it (as published; at size 1 this is ROME's single-edit protocol);
* ``MEMIT``, ``PMET`` and ``AlphaEdit``, with the model's defaults;
* ``IntAttn-Edit, train alpha`` and ``IntAttn-Edit+NS, train alpha``: IntAttn-Edit
  (without and with AlphaEdit's null-space projection) at the alpha of estimator (e) of
  the ``alpha-estimators`` experiment: the per-layer alpha chosen on *train* records,
  the one estimator selected without test records
  (:func:`intattn_analysis.experiments.estimators.train_alpha`). It is read from that
  experiment's store under the same root, and computed there first where missing.

Targets are shared wherever they can be: ``z*`` does not depend on the batch, so MEMIT,
AlphaEdit and both IntAttn-Edit rows read each fact's from the on-disk target cache at
every size. Every (size, batch, method) is a stored unit; a killed run resumes.

Scales: ``ci``: sizes 1 and 3 on 3 ZsRE test facts with ROME, MEMIT, AlphaEdit and
IntAttn-Edit, Edit Succ. and the other KnowEdit metrics only, second moments from 20,000
tokens; ``paper``: sizes 1, 10, 100 and 500 on (at least) the first 100 facts, and a
second, disjoint batch of 500 that replicates the comparison at 500 (:func:`summarise`'s
``replication`` table), every method, the editors experiment's metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from ..answers import GenerationSettings
from ..facts import Fact
from ..hparams import hparams_for
from ..intervals import holm_within, paired_against, paired_contrasts, tidy_intervals
from ..loading import ModelHandle
from ..reporting import GENERATION_SCORES, MAIN_METRICS, VERDICT_METRICS
from ..batching import editable_batches
from . import estimators
from .common import dataset_facts, dataset_label, edit_moments, metric_columns, resolve_scale
from .editors import ALONE_ROWS, METHODS, RegistryView, method_settings, run_methods
from .settings import with_settings
from .store import ResultStore, check_unique
from .units import with_protocol

__all__ = ["CONTRASTS", "LEFT_OUT", "NAME", "ROWS", "SCALES", "TRAIN_ALPHA", "ScalingRows", "ScalingScale", "run", "run_sizes", "settings_for", "summarise", "tables",
           "train_alpha"]

NAME = "batch-scaling"

#: The rows of the editors experiment that take the train alpha here, under these names
#: (the traced alpha of the editors experiment is not chosen on train records).
TRAIN_ALPHA: dict[str, str] = {"IntAttn-Edit": "IntAttn-Edit, train alpha",
                               "IntAttn-Edit+NS": "IntAttn-Edit+NS, train alpha"}
TRAIN_ALPHA_ROWS = tuple(TRAIN_ALPHA.values())


#: Rows of the main table left out of the scaling grids (batch scaling, sequential editing,
#: outdated knowledge): the fine-tuning baselines, which at their defaults leave the
#: answers as they were (FT-L: 21.3% Edit Succ. on 100 ZsRE test edits against 20.9%
#: unedited), so that hours of their units would measure no edit. Name them in a scale's
#: ``methods`` to run them.
LEFT_OUT: tuple[str, ...] = ("FT-L", "FT-M")


class ScalingRows(RegistryView):
    """``{row name: row of the editors experiment}``: every row of the main table
    (:data:`.editors.METHODS`, so every compared editor, the ones registered with
    ``ia.register_editor`` included) that writes its batch at once, the IntAttn-Edit rows
    at the train alpha (:data:`TRAIN_ALPHA`). Rows that edit each fact alone have no
    batch size and are left out, as are the rows of :data:`LEFT_OUT`."""

    def _rows(self) -> dict[str, str]:
        return {TRAIN_ALPHA.get(row, row): row for row in METHODS if row not in (*ALONE_ROWS, *LEFT_OUT)}


#: The rows of batch scaling (:class:`ScalingRows`), as registered now.
ROWS: Mapping[str, str] = ScalingRows()
#: ``(setting, baseline)`` pairs compared directly beside every row's MEMIT pairing: does
#: the attention share add to the null-space projection, and what does the projection add
#: to IntAttn-Edit at the same alpha.
CONTRASTS: tuple[tuple[str, str], ...] = (
    ("IntAttn-Edit+NS, train alpha", "AlphaEdit"),
    ("IntAttn-Edit+NS, train alpha", "IntAttn-Edit, train alpha"),
)


@dataclass(frozen=True)
class ScalingScale:
    """How much of the experiment to run."""

    sizes: tuple[int, ...]
    n_facts: int  # facts evaluated at every size below it (ceil(n_facts / size) batches)
    methods: tuple[str, ...] | None = None  # None: every row of ROWS as registered when run
    mom2_n_tokens: int | None = None  # None: each method's default
    fluency_tokens: int = 50
    metrics: tuple[str, ...] = ("knowedit", "residue", "fluency")
    protocol: str = "teacher-forced"
    generation: GenerationSettings = GenerationSettings()
    # (size, batches): at these sizes, at least this many disjoint batches, so that a
    # comparison at a size larger than n_facts is replicated on other facts
    replicates: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"sizes must be integers >= 1, got {self.sizes}")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be increasing and distinct, got {self.sizes}")
        for size, count in self.replicates:
            if size not in self.sizes or not isinstance(count, int) or count < 1:
                raise ValueError(f"replicates: ({size}, {count}) must name one of the sizes {self.sizes} and a "
                                 "number of batches >= 1")
        unknown = [m for m in self.methods or () if m not in ROWS]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; rows: {list(ROWS)}")

    @property
    def rows(self) -> tuple[str, ...]:
        """The rows run: ``methods``, or every row of :data:`ROWS` as registered now."""
        return tuple(self.methods) if self.methods is not None else tuple(ROWS)

    def n_batches(self, size: int) -> int:
        """The batches of ``size``: enough to cover ``n_facts``, and at least its
        :attr:`replicates` count."""
        return max(1, math.ceil(self.n_facts / size), dict(self.replicates).get(size, 1))


SCALES: dict[str, ScalingScale] = {
    "ci": ScalingScale(sizes=(1, 3), n_facts=3, methods=("ROME", "MEMIT", "AlphaEdit", "IntAttn-Edit, train alpha"),
                       mom2_n_tokens=20_000, fluency_tokens=20, metrics=("knowedit",)),
    "paper": ScalingScale(sizes=(1, 10, 100, 500), n_facts=100, replicates=((500, 2),)),
}


def settings_for(model: ModelHandle, names: Sequence[str], mom2_n_tokens: int | None, scale_name: str, root,
                 progress: bool = True) -> dict[str, tuple[str, Any]]:
    """``{row name: (method, hparams)}`` for the rows ``names`` (names of :data:`ROWS` or
    of the editors experiment's rows), with ``mom2_n_tokens`` (``None``: each method's
    own); the train-alpha rows at estimator (e)'s alpha, read from (or computed into) the
    ``alpha-estimators`` store under ``root`` at the scale of the same name."""
    unknown = [m for m in names if m not in ROWS and m not in METHODS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; rows: {sorted(set(ROWS) | set(METHODS))}")
    base_names = [ROWS.get(m, m) for m in names]
    base = method_settings(model, list(dict.fromkeys(base_names)), mom2_n_tokens)
    settings = {name: base[ROWS.get(name, name)] for name in names}
    if any(name in TRAIN_ALPHA_ROWS for name in settings):
        alpha = train_alpha(model, scale_name, root, progress)
        for name in TRAIN_ALPHA_ROWS:
            if name in settings:
                method, hp = settings[name]
                settings[name] = (method, hp.replace(alpha=alpha))
    return settings


def train_alpha(model: ModelHandle, scale_name: str, root, progress: bool = True) -> dict[int, float]:
    """Estimator (e)'s per-layer alpha for ``model``: the ``alpha-estimators``
    experiment's train selection at its scale ``scale_name``, from its store under
    ``root`` (units already there are read, not recomputed)."""
    scale = estimators.SCALES[scale_name]
    hp = hparams_for(model)
    if scale.test.mom2_n_tokens is not None:
        hp = hp.replace(mom2_n_tokens=scale.test.mom2_n_tokens)
    moments = edit_moments(model, hp, progress=progress)
    alpha, _ = estimators.train_alpha(model, hp, ResultStore(root, estimators.NAME), scale, moments, progress)
    return alpha


def run(model: ModelHandle, dataset: str, scale: str | ScalingScale, root, *,
        shard: tuple[int, int] | None = None, protocol: str | None = None,
        generation: GenerationSettings | None = None, progress: bool = True) -> ResultStore:
    """Run (or resume) every size's units of this shard; returns the store. A
    :class:`ScalingScale` passed directly takes the train alpha of the ``ci`` scale.
    ``protocol`` and ``generation`` override the scale's evaluation protocol."""
    scale_name = scale if isinstance(scale, str) else "ci"
    scale = resolve_scale(scale, SCALES, protocol, generation)
    store = ResultStore(root, NAME)
    facts = dataset_facts(dataset)  # read before any work: a bad file fails here
    settings = settings_for(model, scale.rows, scale.mom2_n_tokens, scale_name, root, progress)
    run_sizes(model, facts, scale, settings, store, dataset=dataset_label(dataset), shard=shard,
              progress=progress)
    return store


def run_sizes(model: ModelHandle, facts: Sequence[Fact], scale: ScalingScale,
              settings: Mapping[str, tuple[str, Any]], store: ResultStore, *, dataset: str,
              shard: tuple[int, int] | None = None, moments: Mapping | None = None,
              progress: bool = True) -> int:
    """Each size of ``scale``: the first editable ``facts`` in consecutive batches of that
    size (:func:`intattn_analysis.editable_batches`), every named (method, hparams)
    evaluated on each batch (:func:`.editors.run_methods`, ``batch_size`` among the
    labels). Returns the number of units computed."""
    computed = 0
    for size in scale.sizes:
        batches, _ = editable_batches(facts, size, scale.n_batches(size))
        computed += run_methods(model, batches, settings, store, dataset=dataset, metrics=scale.metrics,
                                fluency_tokens=scale.fluency_tokens, shard=shard, moments=moments, alone=(),
                                labels={"batch_size": size}, label_prefix=f"s{size:04d}-", protocol=scale.protocol,
                                generation=scale.generation, progress=progress)
    return computed


def summarise(store: ResultStore, baseline: str = "MEMIT",
              contrasts: Sequence[tuple[str, str]] = CONTRASTS) -> dict[str, pd.DataFrame]:
    """The tables from whatever the store holds.

    Every table but ``seconds`` is split by evaluation ``protocol`` (teacher-forced rows
    of stores written before the generation protocol count as such).

    Returns:
        ``intervals``: per (model, dataset, protocol, batch size, setting, metric), the mean over
        the facts evaluated at *every* size (the first ``n_facts``, one population for
        the curve) with its 95% interval (percent for shares) and ``n_edits``;
        ``intervals_all``: the same over every fact evaluated at each size (size 500:
        all 500);
        ``paired``: each method minus ``baseline`` at the same batch size, on the same
        facts;
        ``contrasts``: the same for each ``(setting, baseline)`` of ``contrasts`` whose
        two rows the store holds;
        ``scaling``: each method at each batch size minus the same method at the smallest
        size, on the facts both evaluated (the first ``n_facts``): how much it loses as
        the batch grows;
        ``replication``: at each replicated size (more batches than it takes to cover the
        facts every size evaluated: disjoint batches of other facts, see
        :attr:`ScalingScale.replicates`), each method minus ``baseline`` within each
        batch, and over all of them (``batch`` ``"all"``); Holm over each (model, dataset,
        protocol)'s rows on the KnowEdit metrics, the other metrics another family;
        ``seconds``: mean seconds per batch (the edit alone, and with its teacher-forced
        evaluation).
    """
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    rows = with_protocol(rows)
    check_unique(rows, ["model", "dataset", "protocol", "batch_size", "setting", "batch", "position"])
    metrics = metric_columns(rows, MAIN_METRICS + GENERATION_SCORES)
    groups = ["model", "dataset", "protocol", "batch_size"]
    # the facts every size evaluated (the first n_facts): one population across sizes
    sizes = rows.groupby(["model", "dataset", "protocol"])["batch_size"].transform("nunique")
    seen = rows.groupby(["model", "dataset", "protocol", "fact_key"])["batch_size"].transform("nunique")
    common = rows[seen == sizes]
    intervals = tidy_intervals(common, [*groups, "setting"], metrics)
    intervals_all = tidy_intervals(rows, [*groups, "setting"], metrics)
    edited = rows[rows["setting"] != "pre-edit"]
    # one family of comparisons per (model, dataset, protocol): every size and editor on the
    # KnowEdit metrics (VERDICT_METRICS), the other metrics another
    family = ["model", "dataset", "protocol"]
    against = pd.DataFrame(paired_against(edited, metrics, baseline, groups=groups, on=["batch", "position"]))
    paired = holm_within(against, family, VERDICT_METRICS)
    contrasted = holm_within(pd.DataFrame(paired_contrasts(edited, metrics, contrasts, groups=groups,
                                                           on=["batch", "position"])), family,
                         VERDICT_METRICS)
    smallest = edited.groupby(["model", "dataset", "protocol"])["batch_size"].transform("min")
    by_size = edited.rename(columns={"setting": "row"}).assign(
        setting=edited["batch_size"].map(lambda s: f"size {s}"), baseline_size=smallest)
    scaling = []
    for _, group in by_size.groupby(["model", "dataset", "protocol"], sort=False):
        base = f"size {int(group['baseline_size'].iloc[0])}"
        for entry in paired_against(group, metrics, base, groups=["model", "dataset", "protocol", "row"],
                                    on=["fact_key"]):
            entry["batch_size"] = int(entry.pop("setting").split()[1])
            scaling.append(entry)
    scaling = pd.DataFrame(scaling)
    if not scaling.empty:
        scaling = scaling.rename(columns={"row": "setting", "baseline": "baseline_size"})
        scaling["baseline_size"] = scaling["baseline_size"].str.split().str[1].astype(int)
        first = ["model", "dataset", "protocol", "setting", "batch_size", "baseline_size"]
        scaling = scaling[first + [c for c in scaling.columns if c not in first]]
    replication = _replication(edited, common, against, metrics, baseline, groups)
    forced = edited[edited["protocol"] == "teacher-forced"]
    timed = ["model", "dataset", "batch_size"]
    seconds = (forced.groupby([*timed, "setting", "batch"], sort=False)[["edit_seconds", "seconds"]]
               .first().groupby([*timed, "setting"], sort=False).mean().reset_index())
    return {"intervals": intervals, "intervals_all": intervals_all, "paired": paired, "contrasts": contrasted,
            "scaling": scaling, "replication": replication, "seconds": seconds}


def _replication(edited: pd.DataFrame, common: pd.DataFrame, against: pd.DataFrame, metrics: Sequence[str],
                 baseline: str, groups: Sequence[str]) -> pd.DataFrame:
    """Each method against ``baseline`` per batch, and over every batch, at the sizes whose
    batches replicate one another: more batches than it takes to cover the facts every
    size evaluated (``common``), e.g. two disjoint batches of 500 beside 100 common facts.
    The pooled rows are those of ``against`` (the paired table before its Holm
    adjustment), not computed again."""
    population = common.groupby(["model", "dataset", "protocol"])["fact_key"].nunique()
    batches = edited.groupby(groups)["batch"].nunique()
    replicated = [key for key, count in batches.items()
                  if count > math.ceil(population.get(key[:3], 0) / key[3])]
    columns = [*groups, "batch", "setting", "baseline", "metric", "diff", "ci_low", "ci_high", "p_value",
               "p_holm", "n_edits"]
    if not replicated:
        return pd.DataFrame(columns=columns)
    keys = pd.MultiIndex.from_tuples(replicated, names=list(groups))
    rows = edited[pd.MultiIndex.from_frame(edited[list(groups)]).isin(keys)]
    per_batch = pd.DataFrame(paired_against(rows, metrics, baseline, groups=[*groups, "batch"],
                                            on=["batch", "position"]))
    if per_batch.empty:
        return pd.DataFrame(columns=columns)
    per_batch["batch"] = per_batch["batch"].astype(int).astype(str)
    pooled = against[pd.MultiIndex.from_frame(against[list(groups)]).isin(keys)].assign(batch="all")
    table = pd.concat([per_batch, pooled], ignore_index=True)
    return holm_within(table, ["model", "dataset", "protocol"], VERDICT_METRICS)[columns]


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root`` (what ``intattn run`` writes as CSVs), each row
    labelled with its settings id, and the table of those ids (:func:`.settings.with_settings`)."""
    store = ResultStore(root, NAME)
    return with_settings(summarise(store), store)
