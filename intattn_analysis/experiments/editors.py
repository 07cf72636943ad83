"""Experiment ``editors``: the main table, every editor on the same batches.

For each batch of test edits: evaluate the unedited model once, then for each method
write the batch with the method's defaults for the model
(:func:`intattn_analysis.hparams_for`), evaluate, and restore the weights bit for bit.
Methods whose targets are computed once for a batch share them where their target
settings agree (MEMIT, IntAttn-Edit and AlphaEdit share ``z*``; PMET has its own; ROME
and the fine-tuning baselines work fact by fact or by gradient steps). Each (batch,
method) and each batch's pre-edit evaluation is a stored unit
(:class:`~intattn_analysis.experiments.store.ResultStore`), so a killed run resumes and
shards split the batches.

The methods are :data:`METHODS`, one row per registered editor of the family (MEMIT,
IntAttn-Edit with the traced alpha, AlphaEdit, FT-L, FT-M, PMET, ROME, and any editor
registered with ``ia.register_editor``), and IntAttn-Edit with the null-space projection
(``IntAttn-Edit+NS``, a combination no published editor has). ROME has two rows: ``ROME`` writes the whole
batch fact after fact and is evaluated once at the end (later rank-one updates overwrite
earlier ones), ``ROME, each alone`` edits each fact alone on the unedited model, the
protocol of ROME's paper and of EasyEdit's single edits (:data:`ALONE_ROWS`). :func:`summarise` gives each metric's mean and
95% interval over facts, and each method's paired difference from MEMIT on the same
facts.

Scales: ``ci`` edits 1 batch of 3 ZsRE facts with every method (second moments from
20,000 tokens, short generations); ``paper`` edits 1 batch of 100 (the size of the
paper's batches), with the models' own settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from ..answers import GenerationSettings
from ..editors import EDITORS
from ..hparams import hparams_for
from ..intervals import holm_within, paired_against, tidy_intervals
from ..loading import ModelHandle
from ..reporting import GENERATION_SCORES, MAIN_METRICS, VERDICT_METRICS
from .common import dataset_batches, dataset_label, metric_columns, resolve_scale, targets_cache
from .runner import PRE_EDIT, Cell, EvaluationMeasure, Setting, Unit, run_cells
from .settings import with_settings
from .store import ResultStore, check_unique
from .units import batch_key, method_key, protocol_units, shard_batches, slug, with_protocol

__all__ = ["ALONE_ROWS", "METHODS", "NAME", "NULL_SPACE_ROWS", "SCALES", "VARIANT_ROWS", "EditorsScale", "FamilyRows",
           "method_key", "method_cells", "method_settings", "protocol_gaps", "protocol_tables",
           "relation_tables", "run", "run_methods", "summarise", "tables"]

NAME = "editors"

#: Rows beside the one of each editor: ``{row: the editor row it varies}``, each listed
#: right after that row.
VARIANT_ROWS: dict[str, str] = {"IntAttn-Edit+NS": "IntAttn-Edit", "ROME, each alone": "ROME"}
#: Rows that take AlphaEdit's null-space projection (with AlphaEdit's settings for the model).
NULL_SPACE_ROWS = ("IntAttn-Edit+NS",)
#: Rows whose facts are each edited alone on the unedited model, evaluated, and restored
#: before the next: the protocol of ROME's paper and of EasyEdit's single edits. Every
#: other row writes the whole batch (ROME fact after fact, as ``apply_rome_to_model``
#: does for a list of requests) and evaluates it afterwards.
ALONE_ROWS = ("ROME, each alone",)


class RegistryView(Mapping):
    """A read-only mapping recomputed from the editor registry on every access
    (subclasses give :meth:`_rows`), so that editors registered later are seen."""

    def _rows(self) -> dict[str, str]:
        raise NotImplementedError

    def __getitem__(self, row: str) -> str:
        return self._rows()[row]

    def __iter__(self):
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._rows()!r})"


class FamilyRows(RegistryView):
    """``{row name: method}``: the rows of the main table, read from the registry as it is
    now: one row per registered editor that is compared
    (:attr:`intattn_analysis.Editor.compared`), named by its label, in the order the
    editors were registered, each followed by its :data:`VARIANT_ROWS`. An editor
    registered with ``ia.register_editor`` gets its row without any change here."""

    def _rows(self) -> dict[str, str]:
        rows: dict[str, str] = {}
        for spec in EDITORS.values():
            if not spec.compared:
                continue
            rows[spec.display] = spec.name
            rows.update({variant: spec.name for variant, base in VARIANT_ROWS.items() if base == spec.display})
        return rows


#: ``{row name: method}``: the rows of the main table (:class:`FamilyRows`).
METHODS: Mapping[str, str] = FamilyRows()


@dataclass(frozen=True)
class EditorsScale:
    """How much of the comparison to run (``methods``: rows of :data:`METHODS`; ``None``
    for every row)."""

    batch_size: int
    n_batches: int
    mom2_n_tokens: int | None = None  # None: each method's default
    fluency_tokens: int = 50
    metrics: tuple[str, ...] = ("knowedit", "residue", "fluency")
    methods: tuple[str, ...] | None = None
    protocol: str = "teacher-forced"
    generation: GenerationSettings = GenerationSettings()

    @property
    def rows(self) -> tuple[str, ...]:
        """The rows run: ``methods``, or every row of :data:`METHODS` as registered now."""
        return tuple(self.methods) if self.methods is not None else tuple(METHODS)


SCALES: dict[str, EditorsScale] = {
    "ci": EditorsScale(batch_size=3, n_batches=1, mom2_n_tokens=20_000, fluency_tokens=20),
    "paper": EditorsScale(batch_size=100, n_batches=1),
}


def method_settings(model: ModelHandle, names: Sequence[str], mom2_n_tokens: int | None = None
                    ) -> dict[str, tuple[str, Any]]:
    """``{row name: (method, hparams)}``. ``IntAttn-Edit+NS`` takes IntAttn-Edit's
    defaults with AlphaEdit's projection settings for the model."""
    out = {}
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown row {name!r}; rows: {list(METHODS)}")
        method = METHODS[name]
        hp = hparams_for(model, method)
        if name in NULL_SPACE_ROWS:
            ns = hparams_for(model, "alphaedit")
            hp = hp.replace(projection="null_space", nullspace_threshold=ns.nullspace_threshold,
                            nullspace_l2=ns.nullspace_l2)
        if mom2_n_tokens is not None and hasattr(hp, "mom2_n_tokens"):
            hp = hp.replace(mom2_n_tokens=mom2_n_tokens)
        out[name] = (method, hp)
    return out


def method_cells(
    model: ModelHandle,
    batches: Sequence[Sequence],
    settings: Mapping[str, tuple[str, Any]],
    *,
    dataset: str,
    metrics: Sequence[str],
    fluency_tokens: int,
    shard: tuple[int, int] | None = None,
    alone: Sequence[str] = ALONE_ROWS,
    labels: Mapping[str, Any] | None = None,
    label_prefix: str = "",
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
    columns: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """The units of each batch of this shard: ``pre-edit`` (label ``b000-pre``), then each
    named (method, hparams) (``b000-<method>-<row>``). The rows named in ``alone`` edit
    each fact alone on the unedited model (:data:`ALONE_ROWS`). Rows carry ``model``,
    ``dataset``, ``batch``, ``setting`` (the row name, ``"pre-edit"`` for the unedited
    model), ``method`` and ``labels``. ``labels`` are another experiment's grouping (such
    as the batch size); they enter every unit's key too, and ``label_prefix`` starts every
    unit's file label. ``columns`` enter the rows only: facts the key already names in its
    own way (the model's dtype), so that the unit stays the one of every other experiment
    that runs it. Under ``protocol`` ``"generation"`` or ``"both"`` each cell also (or
    only) has a generation unit (:func:`.units.protocol_units`)."""
    generation = generation or GenerationSettings()
    extra = dict(labels or {})
    eval_key = {"metrics": list(metrics), "fluency_tokens": fluency_tokens, **extra}
    columns = {"model": model.name, "dataset": dataset, **extra, **dict(columns or {})}
    cells = []
    for b in shard_batches(len(batches), shard):
        facts = list(batches[b])
        bkey = batch_key(model, dataset, b, facts)
        pre = Unit({**bkey, "unit": "pre-edit", **eval_key}, f"{label_prefix}b{b:03d}-pre",
                   {**columns, "batch": b, "setting": "pre-edit", "method": None})
        cells.append(Cell(b, facts, PRE_EDIT, protocol_units(pre, protocol, generation, facts)))
        for name, (method, hp) in settings.items():
            each_alone = {"protocol": "each alone"} if name in alone else {}
            unit = Unit({**bkey, "unit": "edit", **method_key(model, method, hp), **each_alone, **eval_key},
                        f"{label_prefix}b{b:03d}-{method}-{slug(name)}",
                        {**columns, "batch": b, "setting": name, "method": method})
            cells.append(Cell(b, facts, Setting(name, method, hp, alone=name in alone),
                              protocol_units(unit, protocol, generation, facts)))
    return cells


def run_methods(
    model: ModelHandle,
    batches: Sequence[Sequence],
    settings: Mapping[str, tuple[str, Any]],
    store: ResultStore,
    *,
    dataset: str,
    metrics: Sequence[str] = ("knowedit", "residue", "fluency"),
    fluency_tokens: int = 50,
    shard: tuple[int, int] | None = None,
    moments: Mapping | None = None,
    alone: Sequence[str] = ALONE_ROWS,
    labels: Mapping[str, Any] | None = None,
    label_prefix: str = "",
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
    columns: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> int:
    """Evaluate each named (method, hparams) on each batch of this shard
    (:func:`method_cells`, :func:`.runner.run_cells`); returns the number of units
    computed. ``moments`` (``{(module, layer): E[k kᵀ]}``) serves every method; default:
    each method's own sample, computed once (cached on disk). Edited rows carry
    ``edit_seconds`` beside ``seconds``. ``protocol`` and ``generation`` choose the
    evaluation protocol (:func:`intattn_analysis.evaluate`); a batch whose teacher-forced
    units are stored is edited again only for its missing generation units (its targets
    come from the cache)."""
    metrics = tuple(metrics)
    generation = generation or GenerationSettings()
    cells = method_cells(model, batches, settings, dataset=dataset, metrics=metrics, fluency_tokens=fluency_tokens,
                         shard=shard, alone=alone, labels=labels, label_prefix=label_prefix, protocol=protocol,
                         generation=generation, columns=columns)
    return run_cells(model, cells, EvaluationMeasure(metrics, fluency_tokens, protocol, generation), store,
                     moments=moments,
                     targets_cache=targets_cache(), edit_seconds=True, desc=f"{model.name} {dataset} editors",
                     progress=progress)


def run(
    model: ModelHandle, dataset: str, scale: str | EditorsScale, root, *,
    shard: tuple[int, int] | None = None, protocol: str | None = None,
    generation: GenerationSettings | None = None, progress: bool = True,
) -> ResultStore:
    """Run (or resume) the comparison's units of this shard; returns the store.
    ``protocol`` and ``generation`` override the scale's evaluation protocol."""
    scale = resolve_scale(scale, SCALES, protocol, generation)
    store = ResultStore(root, NAME)
    batches = dataset_batches(dataset, scale.batch_size, scale.n_batches)
    settings = method_settings(model, scale.rows, scale.mom2_n_tokens)
    run_methods(model, batches, settings, store, dataset=dataset_label(dataset), metrics=scale.metrics,
                fluency_tokens=scale.fluency_tokens, shard=shard, protocol=scale.protocol,
                generation=scale.generation, progress=progress)
    return store


#: The columns of a paired table (:func:`intattn_analysis.intervals.paired_against`).
PAIRED_COLUMNS = ["model", "dataset", "protocol", "setting", "baseline", "metric", "diff", "ci_low", "ci_high",
                  "p_value", "n_edits"]


def summarise(store: ResultStore, baseline: str = "MEMIT") -> dict[str, pd.DataFrame]:
    """The main table from whatever the store holds, under each evaluation protocol it
    holds (``protocol``: ``teacher-forced`` or ``generation``).

    Returns:
        ``intervals``: one row per (model, dataset, protocol, setting, metric) with
        ``mean``, ``ci_low``, ``ci_high`` (percent for shares) and ``n_edits``;
        ``paired``: per (model, dataset, protocol, setting other than ``baseline``,
        metric), the mean per-fact difference from ``baseline`` on the same facts, its 95%
        interval, p-value and Holm-adjusted p-value (``p_holm``; one family per model,
        dataset and protocol: every editor on the four KnowEdit metrics of
        :data:`~intattn_analysis.reporting.VERDICT_METRICS`, the other metrics another);
        ``protocols``: per (model, dataset, setting, metric) measured under both
        protocols, the per-fact difference generation minus teacher-forced on the same
        facts (:func:`protocol_gaps`);
        ``seconds``: mean seconds per batch edit (the edit alone, then with its
        evaluation) per (model, dataset, setting), from the teacher-forced units.
    """
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    rows = with_protocol(rows)
    check_unique(rows, ["model", "dataset", "protocol", "setting", "batch", "position"])
    metrics = metric_columns(rows, MAIN_METRICS + GENERATION_SCORES)
    intervals = tidy_intervals(rows, ["model", "dataset", "protocol", "setting"], metrics)
    edited = rows[rows["setting"] != "pre-edit"]
    paired = paired_against(edited, metrics, baseline, groups=["model", "dataset", "protocol"],
                            on=["batch", "position"])
    forced = edited[edited["protocol"] == "teacher-forced"]
    seconds = (forced.groupby(["model", "dataset", "setting", "batch"], sort=False)[["edit_seconds", "seconds"]]
               .first().groupby(["model", "dataset", "setting"], sort=False).mean().reset_index())
    paired = holm_within(pd.DataFrame(paired, columns=PAIRED_COLUMNS), ["model", "dataset", "protocol"],
                         VERDICT_METRICS)
    return {"intervals": intervals, "paired": paired, "protocols": protocol_gaps(rows, metrics),
            "seconds": seconds}


def protocol_gaps(rows: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per (model, dataset, setting, metric) measured under both protocols: the mean
    per-fact difference generation minus teacher-forced on the same facts, its 95%
    interval and p-value (:func:`intattn_analysis.intervals.paired_against`, in percent
    points for shares). Empty where no setting has both."""
    rows = with_protocol(rows)
    if set(rows["protocol"]) != {"teacher-forced", "generation"}:
        return pd.DataFrame(columns=["model", "dataset", "setting", "metric", "diff", "ci_low", "ci_high",
                                     "p_value", "n_edits"])
    swapped = rows.rename(columns={"setting": "row", "protocol": "setting"})
    gaps = pd.DataFrame(paired_against(swapped, metrics, "teacher-forced", groups=["model", "dataset", "row"],
                                       on=["batch", "position"]))
    if gaps.empty:
        return gaps
    return (gaps.drop(columns=["setting", "baseline"]).rename(columns={"row": "setting"})
            [["model", "dataset", "setting", "metric", "diff", "ci_low", "ci_high", "p_value", "n_edits"]])


def _stored_datasets_facts(datasets, purpose: str) -> dict[str, list]:
    """``{dataset: its facts}`` for each stored dataset name that can be read by its name
    (:func:`.common.dataset_facts`); one that cannot (a file given by path elsewhere) is
    left out with a warning naming it and ``purpose``. The datasets' own notes were shown
    when the experiment ran and are not repeated."""
    import warnings

    from .common import dataset_facts

    out = {}
    for dataset in datasets:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[dataset] = dataset_facts(dataset)
        except (OSError, ValueError) as error:
            warnings.warn(f"no {purpose} for dataset {dataset!r}: {error}", stacklevel=3)
    return out


def relation_tables(store: ResultStore, baseline: str = "MEMIT") -> dict[str, pd.DataFrame]:
    """The main metrics (teacher-forced) split by relation (:func:`.relations.by_relation`), each dataset's
    facts read by its stored name (:func:`.common.dataset_facts`): ``relations`` (means
    with intervals) and ``relations_paired`` (each method minus ``baseline`` on the same
    facts of each relation). A dataset that cannot be read by its name (a file given by
    path elsewhere) is left out with a warning that names it."""
    from .relations import by_relation, relation_labels

    rows = store.rows()
    if not rows.empty:
        rows = with_protocol(rows)
        rows = rows[rows["protocol"] == "teacher-forced"]  # the relation split is of teacher-forced metrics
    readable = _stored_datasets_facts(rows["dataset"].unique() if not rows.empty else [], "relation table")
    labels: dict[str, str] = {}
    for facts in readable.values():
        labels.update(relation_labels(facts))
    rows = rows[rows["dataset"].isin(list(readable))]
    if rows.empty:
        return {}
    out = by_relation(rows, labels, metric_columns(rows, MAIN_METRICS), baseline=baseline)
    return {"relations": out["intervals"], "relations_paired": out["paired"]}


def protocol_tables(store: ResultStore, summary: Mapping[str, pd.DataFrame], baseline: str = "MEMIT",
                    examples: int = 3) -> dict[str, pd.DataFrame]:
    """Where the store holds both protocols: ``verdicts`` (each editor against
    ``baseline`` under each protocol, Holm-corrected, :func:`.protocols.verdicts`),
    ``rankings`` (by Edit Succ., :func:`.protocols.rankings`) and ``disagreements`` (up to
    ``examples`` edits per editor and direction on which the protocols disagree about Edit
    Succ., with the prompt, the target and the answer, :func:`.protocols.disagreements`;
    each dataset's facts read by its stored name, a dataset that cannot be read is left
    out with a warning that names it); nothing otherwise."""
    from .protocols import disagreements, rankings, verdicts

    if summary["protocols"].empty:
        return {}
    rows = store.rows()
    metrics = metric_columns(rows, VERDICT_METRICS)
    out = {"verdicts": verdicts(rows, metrics, baseline), "rankings": rankings(summary["intervals"])}
    both = set(zip(summary["protocols"]["model"], summary["protocols"]["dataset"]))
    rows = rows[[pair in both for pair in zip(rows["model"], rows["dataset"])]]
    readable = _stored_datasets_facts(rows["dataset"].unique(), "disagreement examples")
    facts_by_key = {fact.key: fact for facts in readable.values() for fact in facts}
    if readable:
        out["disagreements"] = disagreements(rows[rows["dataset"].isin(list(readable))], facts_by_key, n=examples)
    return out


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise`, :func:`protocol_tables` and :func:`relation_tables` of the store
    under ``root`` (what ``intattn run`` writes as CSVs)."""
    store = ResultStore(root, NAME)
    summary = summarise(store)
    return with_settings({**summary, **protocol_tables(store, summary), **relation_tables(store)}, store)
