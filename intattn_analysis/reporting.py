"""Result tables: per-batch metric records, the paper-shaped main table, Markdown output.

An editing experiment produces one :class:`~intattn_analysis.metrics.Evaluation` per
(model, dataset, method, batch). :func:`record` flattens one into a row of labels and the
summary metrics; :func:`main_table` averages the rows over batches (mean, standard
deviation, number of batches) the way the paper reports its tables (mean ± std over
batches of 100 edits); :func:`formatted` renders it as ``"95.1 ± 2.0"`` strings in percent;
:func:`markdown_table` writes any DataFrame as a GitHub Markdown table without extra
dependencies.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["GENERATION_SCORES", "MAIN_METRICS", "formatted", "main_table", "markdown_table", "record"]

#: The paper's four metrics, plus the rephrase accuracy KnowEdit reports beside them.
MAIN_METRICS: tuple[str, ...] = ("Edit Succ.", "Rephrase", "Portability", "Locality", "Fluency")
#: The metrics every verdict is read from, measured under both protocols: each family of
#: comparisons that is corrected for multiplicity (``p_holm``) is made of these, the other
#: metrics (Fluency, the generation protocol's prefix and F1 scores, ...) of their own.
VERDICT_METRICS: tuple[str, ...] = ("Edit Succ.", "Rephrase", "Portability", "Locality")
#: The generation protocol's other two scores of the main metrics (its exact match fills
#: the main metrics' columns; :mod:`intattn_analysis.answers`).
GENERATION_SCORES: tuple[str, ...] = ("Edit Succ. prefix", "Edit Succ. F1", "Rephrase prefix", "Rephrase F1",
                                      "Portability prefix", "Portability F1")
#: Metrics that are shares in [0, 1] (shown in percent); the others are shown as they are.
SHARE_METRICS = {"Edit Succ.", "Rephrase", "Portability", "Locality", *GENERATION_SCORES, "Efficacy", "Paraphrase",
                 "Neighborhood", "Residue old top-1 pre", "Residue old top-1 post", "Known kept",
                 "Old top-1", "Old top-10", "New top-1", "Context old top-1", "Context new top-1",
                 "Control copy top-1", "Old answer", "New answer", "Context old answer", "Context new answer",
                 "Control copy answer"}


def record(evaluation, **labels) -> dict:
    """One row: ``labels`` (model, dataset, method, batch, ...) and every summary metric."""
    summary = evaluation.summary
    values = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)
    if isinstance(next(iter(values.values()), None), Mapping):  # a one-row DataFrame
        values = {k: next(iter(v.values())) for k, v in values.items()}
    return {**labels, **{k: float(v) for k, v in values.items()}}


def main_table(
    records: Iterable[Mapping] | pd.DataFrame,
    metrics: Sequence[str] = MAIN_METRICS,
    by: Sequence[str] = ("model", "dataset", "method"),
) -> pd.DataFrame:
    """Mean, standard deviation and batch count of each metric per group.

    Columns are a two-level index ``(metric, statistic)`` with statistics ``mean``,
    ``std`` (over batches; NaN with a single batch) and ``n`` (batches with a value).
    Groups keep the order in which they first appear.
    """
    frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if frame.empty:
        raise ValueError("no records to tabulate")
    missing = [c for c in (*by, *metrics) if c not in frame.columns]
    if missing:
        raise ValueError(f"records lack the columns {missing}; they have {list(frame.columns)}")
    grouped = frame.groupby(list(by), sort=False)[list(metrics)]
    table = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "n"}, level=1)
    return table


def formatted(table: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """``main_table`` as strings ``"mean ± std"`` (shares in percent; ``±`` omitted with
    one batch)."""
    out = {}
    for metric in dict.fromkeys(table.columns.get_level_values(0)):
        scale = 100.0 if metric in SHARE_METRICS else 1.0
        cells = []
        for mean, std in zip(table[(metric, "mean")], table[(metric, "std")]):
            if np.isnan(mean):
                cells.append("n/a")
            elif np.isnan(std):
                cells.append(f"{mean * scale:.{digits}f}")
            else:
                cells.append(f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}")
        out[metric] = cells
    return pd.DataFrame(out, index=table.index)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``frame`` (its index becomes the first columns)."""
    flat = frame.reset_index() if frame.index.name or any(frame.index.names) else frame
    headers = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in flat.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in flat.itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
