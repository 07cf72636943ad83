"""Teacher forcing against generation: where the two protocols part, on the same edits.

Every experiment that measures ``protocol="both"`` stores, for each edited fact, its
teacher-forced row and its generation row (:func:`.units.protocol_units`). This module
reads such rows and answers the questions a verdict needs:

* :func:`rankings`: the editors ranked by a metric under each protocol;
* :func:`verdicts`: each editor against the baseline under each protocol, paired on the
  same facts, with Holm-corrected p-values over each (model, dataset, protocol) family of
  comparisons, and whether the comparison keeps its direction, separates, merges or
  flips between the protocols;
* :func:`disagreements`: facts on which the two protocols disagree about the same edit,
  with the prompt, the target and what the model said;
* :func:`reading`: the sentences a notebook prints, every number filled in from these
  tables.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..intervals import holm, paired_against
from .units import with_protocol

__all__ = ["disagreements", "rankings", "reading", "verdicts"]

PROTOCOL_ORDER = ("teacher-forced", "generation")


def rankings(intervals: pd.DataFrame, metric: str = "Edit Succ.") -> pd.DataFrame:
    """Per (model, dataset, setting), the edited settings' mean ``metric`` and rank (1 =
    highest) under each protocol, from a tidy interval table with a ``protocol`` column;
    ``rank change`` is generation's rank minus teacher forcing's."""
    table = intervals[(intervals["metric"] == metric) & (intervals["setting"] != "pre-edit")]
    if table.empty:
        raise ValueError(f"no {metric!r} rows in the interval table; its metrics are "
                         f"{sorted(intervals['metric'].unique())}")
    wide = table.pivot_table(index=["model", "dataset", "setting"], columns="protocol", values="mean",
                             sort=False)
    missing = [p for p in PROTOCOL_ORDER if p not in wide.columns]
    if missing:
        raise ValueError(f"the table has no {missing} rows; run the experiment with protocol='both'")
    wide = wide[list(PROTOCOL_ORDER)].dropna()
    out = wide.copy()
    for protocol in PROTOCOL_ORDER:
        out[f"rank {protocol}"] = wide[protocol].groupby(level=["model", "dataset"]).rank(ascending=False,
                                                                                          method="min")
    out["rank change"] = out["rank generation"] - out["rank teacher-forced"]
    out.insert(0, "metric", metric)
    return out.reset_index()


def verdicts(rows: pd.DataFrame, metrics: Sequence[str], baseline: str = "MEMIT", level: float = 0.05
             ) -> pd.DataFrame:
    """Each edited setting minus ``baseline`` on the same facts, under each protocol.

    One row per (model, dataset, setting, metric) measured under both protocols (a
    setting stored under one only is left out) with, for each protocol, the paired
    difference (percentage points for shares), its 95% interval, its bootstrap p-value and
    its Holm-adjusted p-value (:func:`intattn_analysis.intervals.holm`, over all the
    settings and metrics of that model, dataset and protocol: one family), and
    ``verdict``: with ``decided`` meaning the Holm-adjusted p-value is below ``level``,

    * ``same``: decided the same way under both (or undecided under both);
    * ``separates``: undecided under teacher forcing, decided under generation;
    * ``merges``: decided under teacher forcing, undecided under generation;
    * ``flips``: decided under both, in opposite directions.
    """
    rows = with_protocol(rows)
    edited = rows[rows["setting"] != "pre-edit"]
    paired = pd.DataFrame(paired_against(edited, list(metrics), baseline,
                                         groups=["model", "dataset", "protocol"], on=["batch", "position"]))
    if paired.empty:
        raise ValueError(f"no setting could be paired with {baseline!r}; is it among the rows?")
    paired["p_holm"] = paired.groupby(["model", "dataset", "protocol"], sort=False)["p_value"].transform(
        lambda p: pd.Series(holm(p.to_numpy()), index=p.index))
    keep = ["diff", "ci_low", "ci_high", "p_value", "p_holm", "n_edits"]
    wide = paired.pivot_table(index=["model", "dataset", "setting", "metric"], columns="protocol", values=keep,
                              sort=False)
    missing = [p for p in PROTOCOL_ORDER if p not in wide.columns.get_level_values(1)]
    if missing:
        raise ValueError(f"the rows have no {missing} protocol; run the experiment with protocol='both'")
    wide.columns = [f"{stat} {protocol}" for stat, protocol in wide.columns]
    # a setting measured under one protocol only has no verdict to compare
    wide = wide.dropna(subset=[f"diff {p}" for p in PROTOCOL_ORDER]).reset_index()

    def decided(protocol: str) -> pd.Series:
        return np.sign(wide[f"diff {protocol}"]).where(wide[f"p_holm {protocol}"] < level, 0)

    forced, generated = decided("teacher-forced"), decided("generation")
    wide["verdict"] = np.select(
        [forced == generated, (forced == 0) & (generated != 0), (forced != 0) & (generated == 0)],
        ["same", "separates", "merges"], default="flips")
    wide.insert(3, "baseline", baseline)
    return wide


def disagreements(rows: pd.DataFrame, facts_by_key: dict, metric: str = "Edit Succ.", n: int = 3
                  ) -> pd.DataFrame:
    """Edited facts on which teacher forcing and generation disagree about ``metric``:
    teacher-forced accuracy 1 and no exact generated match (``teacher forcing only``), or
    the reverse (``generation only``). Up to ``n`` per (model, dataset, setting,
    direction), in fact order, with the prompt, the target, the teacher-forced accuracy
    and the generated answer. ``facts_by_key`` maps ``Fact.key`` to the fact (its prompt
    and target are not stored with the rows)."""
    rows = with_protocol(rows)
    rows = rows[rows["setting"] != "pre-edit"]
    on = ["model", "dataset", "setting", "batch", "position"]
    forced = rows[rows["protocol"] == "teacher-forced"][on + ["fact_key", metric]]
    generated = rows[rows["protocol"] == "generation"][on + [metric, f"{metric} prefix", "answer"]]
    both = forced.merge(generated, on=on, suffixes=(" teacher-forced", " generation"))
    both["direction"] = np.select(
        [(both[f"{metric} teacher-forced"] == 1) & (both[f"{metric} generation"] == 0),
         (both[f"{metric} teacher-forced"] < 1) & (both[f"{metric} generation"] == 1)],
        ["teacher forcing only", "generation only"], default="")
    both = both[both["direction"] != ""]
    both = both.groupby(["model", "dataset", "setting", "direction"], sort=False).head(n)
    prompts, targets = [], []
    for key in both["fact_key"]:
        fact = facts_by_key.get(key)
        if fact is None:
            raise KeyError(f"fact {key} of the rows is not among the facts given; pass the dataset's facts")
        prompts.append(fact.text)
        targets.append(fact.target_new)
    return both.assign(prompt=prompts, target=targets)[
        ["model", "dataset", "setting", "direction", "prompt", "target", f"{metric} teacher-forced", "answer",
         f"{metric} prefix"]].reset_index(drop=True)


def reading(verdict_table: pd.DataFrame, ranking: pd.DataFrame, gaps: pd.DataFrame, metric: str = "Edit Succ."
            ) -> list[str]:
    """Sentences that state, from the tables, what changes between the protocols: the
    largest gap per editor, the ranking, and each comparison with the baseline that does
    not keep its verdict."""
    lines = []
    for (model, dataset), group in gaps[gaps["metric"] == metric].groupby(["model", "dataset"], sort=False):
        edited = group[group["setting"] != "pre-edit"].sort_values("diff")
        worst, best = edited.iloc[0], edited.iloc[-1]
        lines.append(
            f"{model} / {dataset}: {metric} under generation minus teacher-forced ranges from "
            f"{worst['diff']:+.1f} [{worst['ci_low']:+.1f}, {worst['ci_high']:+.1f}] points ({worst['setting']}) to "
            f"{best['diff']:+.1f} [{best['ci_low']:+.1f}, {best['ci_high']:+.1f}] ({best['setting']}), "
            f"over {int(worst['n_edits'])} edits.")
    for (model, dataset), group in ranking.groupby(["model", "dataset"], sort=False):
        order = {p: " > ".join(group.sort_values(f"rank {p}")["setting"]) for p in PROTOCOL_ORDER}
        changed = group[group["rank change"] != 0]
        lines.append(
            f"{model} / {dataset}: by {group['metric'].iloc[0]}, teacher forcing ranks {order['teacher-forced']}; "
            f"generation ranks {order['generation']}"
            + (f" ({len(changed)} of {len(group)} editors change rank)." if len(changed) else " (the same order).")
        )
    for _, row in verdict_table[verdict_table["verdict"] != "same"].iterrows():
        lines.append(
            f"{row['model']} / {row['dataset']}: {row['setting']} minus {row['baseline']} on {row['metric']} "
            f"{row['verdict']}: {row['diff teacher-forced']:+.1f} [{row['ci_low teacher-forced']:+.1f}, "
            f"{row['ci_high teacher-forced']:+.1f}] (Holm p {row['p_holm teacher-forced']:.3f}) teacher-forced, "
            f"{row['diff generation']:+.1f} [{row['ci_low generation']:+.1f}, {row['ci_high generation']:+.1f}] "
            f"(Holm p {row['p_holm generation']:.3f}) under generation.")
    if verdict_table["verdict"].eq("same").all():
        lines.append(f"Every comparison with {verdict_table['baseline'].iloc[0]} keeps its verdict "
                     f"({len(verdict_table)} comparisons, Holm-corrected per protocol).")
    return lines
