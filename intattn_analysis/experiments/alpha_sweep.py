"""Experiment ``alpha-sweep``: the paper's Figure 4 with intervals over facts.

IntAttn-Edit is run with a fixed alpha at every edited layer, alpha in {0, 0.1, 0.2, 0.3,
0.5, 0.75, 1}, and with the traced per-layer alpha of the model's defaults (notebook 02),
on batches of test edits; every setting of a batch shares the batch's targets. Alpha 0 is
MEMIT. The paper's claim 2 is that a moderate alpha is best and that performance falls
off towards either module; :func:`summarise` gives, per (model, dataset, setting), each
metric's mean and 95% interval over facts, and each setting's paired difference from
alpha 0 on the same facts, with the best setting by a stated criterion marked.

Every table is split by evaluation ``protocol`` (rows stored before the generation
protocol count as teacher-forced); ``run(..., protocol="both")`` adds the generation
units beside the teacher-forced ones, on the same edits. :func:`claim_table` states, per
protocol, whether any alpha beats MEMIT on Edit Succ., Rephrase and Locality together
(the paper's claim 3), Holm-corrected over the sweep's comparisons.

Scales: ``ci`` edits 2 batches of 3 ZsRE facts with alpha 0, 0.5, 1 and the traced alpha
(second moments from 20,000 tokens); ``paper`` edits 3 batches of 100 with all seven
alphas and the traced alpha (second moments as in the model's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd

from ..answers import GenerationSettings
from ..hparams import hparams_for
from ..intervals import holm_within, paired_difference, scale_of, tidy_intervals
from ..loading import ModelHandle
from ..reporting import GENERATION_SCORES, MAIN_METRICS, VERDICT_METRICS
from .alpha_settings import run_alpha_settings
from .common import dataset_batches, dataset_label, edit_moments, metric_columns, resolve_scale, targets_cache
from .settings import with_settings
from .store import ResultStore, check_unique
from .units import with_protocol

__all__ = ["BEST_CRITERION", "NAME", "SCALES", "SweepScale", "best_range", "claim_table", "criterion_per_fact",
           "paired_table", "run", "settings", "summarise"]

NAME = "alpha-sweep"


@dataclass(frozen=True)
class SweepScale:
    """How much of the sweep to run."""

    batch_size: int
    n_batches: int
    alphas: tuple[float, ...]
    traced: bool = True
    mom2_n_tokens: int | None = None  # None: the model's default
    fluency_tokens: int = 50
    metrics: tuple[str, ...] = ("knowedit", "residue", "fluency")
    protocol: str = "teacher-forced"
    generation: GenerationSettings = GenerationSettings()


SCALES: dict[str, SweepScale] = {
    "ci": SweepScale(batch_size=3, n_batches=2, alphas=(0.0, 0.5, 1.0), mom2_n_tokens=20_000,
                     fluency_tokens=20),
    "paper": SweepScale(batch_size=100, n_batches=3, alphas=(0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)),
}

#: How the best setting is chosen: the mean of these metrics' means (reliability,
#: generalisation and locality weigh the same, as in KnowEdit's summary score).
BEST_CRITERION: tuple[str, ...] = ("Edit Succ.", "Rephrase", "Locality")


def settings(model: ModelHandle, scale: SweepScale) -> dict[str, float | Mapping[int, float]]:
    """``{name: alpha}``: each fixed alpha under its own name, and ``"traced"``."""
    named: dict[str, float | Mapping[int, float]] = {f"{a:g}": float(a) for a in scale.alphas}
    if scale.traced:
        traced = hparams_for(model).alpha
        if traced is None:
            raise ValueError(f"{model.name} has no traced alpha in its defaults; run notebook 02 "
                             "or set traced=False")
        named["traced"] = traced
    return named


def run(
    model: ModelHandle, dataset: str, scale: str | SweepScale, root, *,
    shard: tuple[int, int] | None = None, protocol: str | None = None,
    generation: GenerationSettings | None = None, progress: bool = True,
) -> ResultStore:
    """Run (or resume) the sweep's units of this shard; returns the store. ``protocol``
    and ``generation`` override the scale's evaluation protocol."""
    scale = resolve_scale(scale, SCALES, protocol, generation)
    store = ResultStore(root, NAME)
    hp = hparams_for(model)
    if scale.mom2_n_tokens is not None:
        hp = hp.replace(mom2_n_tokens=scale.mom2_n_tokens)
    batches = dataset_batches(dataset, scale.batch_size, scale.n_batches)
    named = settings(model, scale)
    moments = edit_moments(model, hp, progress=progress)
    run_alpha_settings(model, batches, named, hp, store, dataset=dataset_label(dataset),
                       moments=moments, metrics=scale.metrics, fluency_tokens=scale.fluency_tokens,
                       shard=shard, targets_cache=targets_cache(), protocol=scale.protocol,
                       generation=scale.generation, progress=progress)
    return store


def summarise(
    store: ResultStore, baseline: str = "0", criterion: Sequence[str] = BEST_CRITERION,
) -> dict[str, pd.DataFrame]:
    """The sweep's tables from whatever the store holds, under each evaluation protocol it
    holds (``protocol``: ``teacher-forced`` or ``generation``).

    Returns:
        ``intervals``: one row per (model, dataset, protocol, setting, alpha, metric) with
        ``mean``, ``ci_low``, ``ci_high`` (percent for shares) and ``n_edits``;
        ``paired``: per (model, dataset, protocol, setting other than the baseline,
        metric), the mean per-fact difference from ``baseline`` on the same facts, its
        interval, p-value and Holm-adjusted p-value (:func:`paired_table`), and ``best``
        marking the setting with the highest mean per-fact
        ``criterion`` (:func:`criterion_per_fact`), the baseline included: when alpha 0
        is best, no row is marked;
        ``range``: per protocol, the best fixed alpha and the range not worse than it
        (:func:`best_range`);
        ``claim``: per protocol, whether a setting beats the baseline on every
        ``criterion`` metric together (:func:`claim_table`);
        ``coverage``: edits stored per (model, dataset, protocol, setting).
    """
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    rows = with_protocol(rows)
    check_unique(rows, ["model", "dataset", "protocol", "setting", "batch", "position"])
    edited = rows[rows["setting"] != "pre-edit"]
    metrics = metric_columns(rows, MAIN_METRICS + GENERATION_SCORES)
    by = ["model", "dataset", "protocol", "setting", "alpha"]
    intervals = tidy_intervals(rows.assign(alpha=rows["alpha"].fillna("")), by, metrics)
    coverage = (edited.groupby(["model", "dataset", "protocol", "setting"], sort=False)
                .size().rename("n_edits").reset_index())
    paired = paired_table(edited, baseline, criterion, metrics)
    return {"intervals": intervals, "paired": paired, "range": _best_range(rows, criterion),
            "claim": claim_table(paired, criterion), "coverage": coverage}


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root`` (what ``intattn run`` writes as CSVs), each row
    labelled with its settings id, and the table of those ids (:func:`.settings.with_settings`)."""
    store = ResultStore(root, NAME)
    return with_settings(summarise(store), store)


def paired_table(edited: pd.DataFrame, baseline: str, criterion: Sequence[str],
                 metrics: Sequence[str]) -> pd.DataFrame:
    """Each setting against ``baseline`` on the facts both have, per protocol (see
    :func:`summarise`); ``p_holm`` corrects the p-values for multiplicity within one
    (model, dataset, protocol): every setting on the KnowEdit metrics of
    :data:`~intattn_analysis.reporting.VERDICT_METRICS` is one family, every setting on the
    other metrics another."""
    out = []
    edited = with_protocol(edited)
    for (model, dataset, protocol), group in edited.groupby(["model", "dataset", "protocol"], sort=False):
        indexed = {name: g.set_index(["batch", "position"]) for name, g in group.groupby("setting", sort=False)}
        if baseline not in indexed:
            continue
        scores = {name: criterion_per_fact(g, criterion).mean() for name, g in indexed.items()}
        best = max(scores, key=lambda n: (scores[n], n == baseline))  # a tie goes to the baseline
        for name, frame in indexed.items():
            if name == baseline:
                continue
            for metric in metrics:
                result = paired_difference(frame[metric], indexed[baseline][metric])
                if result["n_edits"] == 0:
                    continue
                scale = scale_of(metric)
                out.append({"model": model, "dataset": dataset, "protocol": protocol, "setting": name,
                            "baseline": baseline, "metric": metric,
                            "diff": result["diff"] * scale, "ci_low": result["ci_low"] * scale,
                            "ci_high": result["ci_high"] * scale, "p_value": result["p_value"],
                            "n_edits": result["n_edits"], "best": name == best})
    table = pd.DataFrame(out, columns=["model", "dataset", "protocol", "setting", "baseline", "metric", "diff",
                                       "ci_low", "ci_high", "p_value", "n_edits", "best"])
    return holm_within(table, ["model", "dataset", "protocol"], VERDICT_METRICS)


def claim_table(paired: pd.DataFrame, criterion: Sequence[str] = BEST_CRITERION, level: float = 0.05
                ) -> pd.DataFrame:
    """The paper's claim 3 (IntAttn-Edit beats MEMIT), per (model, dataset, protocol, setting)
    of a :func:`paired_table`: ``better_on`` and ``worse_on`` list the ``criterion``
    metrics on which the setting is decided better or worse than the baseline (Holm-adjusted
    p-value below ``level``), and ``beats`` is true when it is decided better on every one
    of them. A (model, dataset, protocol) where no setting ``beats`` is a claim that does
    not hold there."""
    columns = ["model", "dataset", "protocol", "setting", "baseline", "better_on", "worse_on", "beats",
               "n_edits"]
    part = paired[paired["metric"].isin(criterion)]
    out = []
    for keys, group in part.groupby(["model", "dataset", "protocol", "setting"], sort=False):
        decided = group[group["p_holm"] < level]
        better = [m for m in criterion if (decided.loc[decided["metric"] == m, "diff"] > 0).any()]
        worse = [m for m in criterion if (decided.loc[decided["metric"] == m, "diff"] < 0).any()]
        out.append(dict(zip(columns, (*keys, group["baseline"].iloc[0], ", ".join(better), ", ".join(worse),
                                      len(better) == len(criterion), int(group["n_edits"].min())))))
    return pd.DataFrame(out, columns=columns)


def criterion_per_fact(frame: pd.DataFrame, criterion: Sequence[str] = BEST_CRITERION) -> pd.Series:
    """Each fact's mean over the ``criterion`` metrics it has (NaN-aware)."""
    present = [m for m in criterion if m in frame.columns]
    return frame[present].mean(axis=1, skipna=True)


def best_range(store: ResultStore, criterion: Sequence[str] = BEST_CRITERION) -> pd.DataFrame:
    """The sweep's best fixed alpha per (model, dataset, protocol) and the range of fixed
    alphas that are not worse than it: those whose paired difference from the best in the
    per-fact criterion (the mean of ``criterion``) has a 95% interval reaching 0.

    This is the "optimal range" an estimator's alpha should fall in (the paper's claim 2).
    """
    rows = with_protocol(store.rows())
    return _best_range(check_unique(rows, ["model", "dataset", "protocol", "setting", "batch", "position"]),
                       criterion)


def _best_range(rows: pd.DataFrame, criterion: Sequence[str]) -> pd.DataFrame:
    rows = with_protocol(rows)
    fixed = pd.to_numeric(rows["setting"], errors="coerce").notna()
    edited = rows[fixed].copy()
    edited["criterion"] = criterion_per_fact(edited, criterion)
    out = []
    for (model, dataset, protocol), group in edited.groupby(["model", "dataset", "protocol"], sort=False):
        per = {float(name): g.set_index(["batch", "position"])["criterion"]
               for name, g in group.groupby("setting", sort=False)}
        best = max(per, key=lambda a: per[a].mean())
        inside = [a for a in per if a == best
                  or paired_difference(per[a], per[best])["ci_high"] >= 0]
        out.append({"model": model, "dataset": dataset, "protocol": protocol, "best_alpha": best,
                    "range_low": min(inside), "range_high": max(inside),
                    "alphas_in_range": ", ".join(f"{a:g}" for a in sorted(inside)),
                    "n_edits": int(len(per[best]))})
    return pd.DataFrame(out, columns=["model", "dataset", "protocol", "best_alpha", "range_low", "range_high",
                                      "alphas_in_range", "n_edits"])
