"""Intervals over facts: every confidence interval the package reports is computed here.

Two estimators, each used where it was chosen and documented:

* the percentile bootstrap over facts of the experiments' tables (below);
* :func:`normal_interval`, ``mean ± 1.96 · sem`` over facts, the interval of causal
  tracing's average indirect effects
  (:meth:`intattn_analysis.TraceResult.average_indirect_effect`), whose per-fact effects
  are averages over noise draws.

Means with bootstrap confidence intervals, and paired comparisons:

A metric of an editing run is a mean over facts, and with a batch of 10 one fact moves it
by 10 points. Every number this package reports at scale therefore comes with an
interval over facts:

* :func:`mean_interval`: the mean and a percentile bootstrap interval (resampling facts
  with replacement, 10,000 draws by default, seeded, so a table is the same on every run);
* :func:`paired_difference`: the mean of per-fact differences between two settings
  evaluated on the *same* facts (the same edits with alpha 0.3 and alpha 0, say), its
  bootstrap interval and a two-sided bootstrap p-value. Pairing removes the fact-to-fact
  spread, which is far larger than most effects between settings;
* :func:`tidy_intervals`: one row per (group, metric) with ``mean``, ``ci_low``,
  ``ci_high``, ``n_edits``, the shape of the CSVs under ``figures/``.

What the intervals assume, and what they do not cover:

* facts are resampled as if independent. The facts of one batch are edited together, so
  a batch's shared update adds a batch effect the bootstrap over facts does not see;
  with 3 batches a bootstrap over batches would be meaningless, so the tables report
  the fact-level interval and the coverage table gives the batches behind it;
* a percentile interval of a mean of values that are all 0 or all 1 has zero width;
  per-fact Edit Succ. is a token accuracy, so this happens only for degenerate samples;
* p-values are per comparison, not corrected for the several alphas compared, and a
  setting picked as best on the same facts is favoured by the picking. Estimator (e) of
  the alpha-estimators experiment chooses on train records and is the clean comparison.

Shares (Edit Succ., Rephrase, Portability, Locality, ...) are reported in percent, other
metrics (Fluency, in bits) as they are. Facts without a value for a metric (no rephrase
in a dataset, no locality before an edit) are left out of that metric's count, which
``n_edits`` shows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .reporting import SHARE_METRICS

__all__ = ["BOOTSTRAP_DRAWS", "NORMAL_Z", "formatted_intervals", "mean_interval", "normal_interval", "paired_against",
           "holm", "paired_contrasts", "paired_difference", "scale_of", "tidy_intervals"]

#: Bootstrap resamples behind every interval. With 10,000 the interval's ends move by
#: well under a tenth of their width between seeds.
BOOTSTRAP_DRAWS = 10_000


#: The normal quantile of a two-sided 95% interval.
NORMAL_Z = 1.96


def normal_interval(mean, sem):
    """``(mean - 1.96 sem, mean + 1.96 sem)``: the normal-approximation 95% interval of a
    mean with standard error ``sem`` (numbers, arrays or pandas Series alike; NaN where
    ``sem`` is, as with one fact)."""
    return mean - NORMAL_Z * sem, mean + NORMAL_Z * sem


def scale_of(metric: str) -> float:
    """100 for a share (shown in percent), 1 for anything else."""
    base = metric.split("/")[0]
    return 100.0 if base in SHARE_METRICS else 1.0


def _values(values) -> np.ndarray:
    array = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=np.float64)
    return array[np.isfinite(array)]


def _bootstrap_means(values: np.ndarray, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    chunk = max(1, 2_000_000 // max(len(values), 1))  # bounded memory for large samples
    for start in range(0, draws, chunk):
        stop = min(draws, start + chunk)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(axis=1)
    return means


def mean_interval(
    values, level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean, percentile-bootstrap interval ends and count of the finite ``values``.

    With fewer than two values the interval is ``(nan, nan)``: one fact says nothing about
    the spread.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    array = _values(values)
    n = len(array)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(array.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    means = _bootstrap_means(array, draws, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return mean, float(low), float(high), n


def paired_difference(
    a, b, level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> dict[str, float]:
    """Mean of ``a - b`` over facts measured under both settings, with its bootstrap
    interval and a two-sided p-value.

    ``a`` and ``b`` are aligned per fact (pandas Series are aligned on their index; other
    sequences by position); facts missing either value are dropped. The p-value is twice
    the smaller share of bootstrap means on either side of zero (at least ``1/draws``),
    the usual percentile-bootstrap test of "no difference".
    """
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        a, b = a.align(b, join="inner")
    a = np.asarray(pd.to_numeric(pd.Series(list(a)), errors="coerce"), dtype=np.float64)
    b = np.asarray(pd.to_numeric(pd.Series(list(b)), errors="coerce"), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.shape[0]} and {b.shape[0]}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    n = len(diff)
    if n < 2:
        return {"diff": float(diff.mean()) if n else float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "p_value": float("nan"), "n_edits": n}
    means = _bootstrap_means(diff, draws, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return {"diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high),
            "p_value": float(min(1.0, max(p, 1.0 / draws))), "n_edits": n}


def paired_against(
    rows: pd.DataFrame, metrics: Sequence[str], baseline: str, groups: Sequence[str], on: Sequence[str],
) -> list[dict]:
    """Each ``setting`` against ``baseline`` within each group of ``groups``: per metric,
    the :func:`paired_difference` of the per-fact values, rows matched on ``on`` (scaled
    to percent for shares). One dict per (group, setting, metric) with the group's labels,
    ``setting``, ``baseline``, ``metric``, ``diff``, ``ci_low``, ``ci_high``, ``p_value``
    and ``n_edits``; groups without the baseline and metrics the setting never measured
    give none. Groups and settings keep their first order."""
    out = []
    for labels, group in rows.groupby(list(groups), sort=False):
        labels = labels if isinstance(labels, tuple) else (labels,)
        base = group[group["setting"] == baseline]
        if base.empty:
            continue
        for setting, other in group.groupby("setting", sort=False):
            if setting == baseline:
                continue
            joined = other.merge(base, on=list(on), suffixes=("", "_base"))
            for metric in metrics:
                if joined[metric].isna().all():
                    continue
                result = paired_difference(joined[metric], joined[f"{metric}_base"])
                scale = scale_of(metric)
                out.append({**dict(zip(groups, labels)), "setting": setting, "baseline": baseline,
                            "metric": metric, "diff": result["diff"] * scale,
                            "ci_low": result["ci_low"] * scale, "ci_high": result["ci_high"] * scale,
                            "p_value": result["p_value"], "n_edits": result["n_edits"]})
    return out


def holm_within(table: pd.DataFrame, family: Sequence[str], metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """``table`` (rows with a ``p_value``) with ``p_holm`` after it: Holm's adjustment
    (:func:`holm`) over each family of comparisons, the rows that share the ``family``
    columns. With ``metrics``, the rows of those metrics are one family and the rows of
    any other metric another (so that two protocols that measure different extra scores
    still correct their main comparisons over families of the same size). An empty table
    gets the column too."""
    out = table.copy()
    if out.empty:
        out["p_holm"] = pd.Series(dtype=float)
    else:
        keys = [out[c] for c in family]
        if metrics is not None:
            keys.append(out["metric"].isin(list(metrics)))
        out["p_holm"] = out.groupby(keys, sort=False)["p_value"].transform(lambda p: holm(p.to_numpy()))
    columns = list(out.columns)
    columns.remove("p_holm")
    columns.insert(columns.index("p_value") + 1 if "p_value" in columns else len(columns), "p_holm")
    return out[columns]


def paired_contrasts(
    rows: pd.DataFrame, metrics: Sequence[str], pairs: Sequence[tuple[str, str]], groups: Sequence[str],
    on: Sequence[str],
) -> list[dict]:
    """:func:`paired_against` for named ``(setting, baseline)`` pairs only, when the
    question is not "against the common baseline" but one setting against another (an
    editor with and without a component). Pairs whose settings are not both in ``rows``
    give no row; the dicts are :func:`paired_against`'s, in the order of ``pairs``."""
    out = []
    for setting, baseline in pairs:
        if setting == baseline:
            raise ValueError(f"contrast ({setting!r}, {baseline!r}) pairs a setting with itself")
        both = rows[rows["setting"].isin([setting, baseline])]
        out += [entry for entry in paired_against(both, metrics, baseline, groups, on) if entry["setting"] == setting]
    return out


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (Holm 1979): the adjusted
    p-value of the ``k``-th smallest of ``m`` is the running maximum of
    ``(m - j) * p_(j)`` over ``j <= k`` (0-based), capped at 1. Rejecting where the
    adjusted value is below ``alpha`` controls the family-wise error rate at ``alpha``.
    NaN p-values stay NaN and do not count in ``m``."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for j, index in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[index]))
        out[index] = running
    return out


def tidy_intervals(
    per_fact: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], level: float = 0.95,
    draws: int = BOOTSTRAP_DRAWS, seed: int = 0,
) -> pd.DataFrame:
    """One row per (group, metric): ``mean``, ``ci_low``, ``ci_high`` (percent for shares)
    and ``n_edits``, over the per-fact rows of each group. Groups keep their first order."""
    missing = [c for c in (*by, *metrics) if c not in per_fact.columns]
    if missing:
        raise ValueError(f"per_fact lacks the columns {missing}; it has {list(per_fact.columns)}")
    rows = []
    for labels, group in per_fact.groupby(list(by), sort=False, dropna=False):
        labels = labels if isinstance(labels, tuple) else (labels,)
        for metric in metrics:
            mean, low, high, n = mean_interval(group[metric], level, draws, seed)
            if n == 0:
                continue
            scale = scale_of(metric)
            rows.append({**dict(zip(by, labels)), "metric": metric, "mean": mean * scale,
                         "ci_low": low * scale, "ci_high": high * scale, "n_edits": n})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "ci_low", "ci_high", "n_edits"])


def formatted_intervals(table: pd.DataFrame, index: Sequence[str], value: str = "mean",
                        digits: int = 1) -> pd.DataFrame:
    """A tidy interval table as strings ``"88.5 [84.1, 92.3]"``, one column per metric.

    Works for :func:`tidy_intervals` tables (``value="mean"``) and paired tables
    (``value="diff"``); ``n_edits`` is not shown (the coverage tables give it). A table
    whose rows name their settings (``settings_id``) shows it as the first column.
    """
    def cell(row) -> str:
        if pd.isna(row["ci_low"]):
            return f"{row[value]:.{digits}f}"
        return f"{row[value]:.{digits}f} [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"

    repeated = table.duplicated([*index, "metric"])
    if repeated.any():
        others = [c for c in ("protocol", "setting", "dataset", "model") if c in table.columns and c not in index]
        raise ValueError(f"index {list(index)} does not identify the rows: {int(repeated.sum())} repeat a "
                         f"(row, metric); add the column that tells them apart to index ({others})")
    frame = table.assign(text=table.apply(cell, axis=1))
    order = list(dict.fromkeys(frame["metric"]))
    out = frame.pivot_table(index=list(index), columns="metric", values="text", aggfunc="first", sort=False)
    out = out[[m for m in order if m in out.columns]]
    if "settings_id" in frame.columns and "settings_id" not in index:
        # each row's settings label, first (its metrics' rows pool the same units)
        ids = frame.assign(settings_id=frame["settings_id"].fillna("").astype(str)).groupby(list(index), sort=False)[
            "settings_id"].agg(lambda s: "+".join(dict.fromkeys(s)))
        out.insert(0, "settings_id", ids.reindex(out.index).to_numpy())
    return out
