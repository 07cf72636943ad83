"""Metrics split by relation: where an editor helps and where it hurts.

A fact's relation is its ``relation`` field (the built-in set, ROME's CounterFact); where a
benchmark gives none (KnowEdit's WikiData_counterfact), its prompt template (the prompt
with ``{}`` for the subject), which these benchmarks write one per relation ("The place
of birth of {} is"). Relations with fewer than ``min_facts`` facts in a table are pooled
as ``"other"``, so that no row rests on one or two facts; a benchmark of free-form
questions (ZsRE) therefore gives one ``"other"`` row and nothing per relation.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import pandas as pd

from ..facts import Fact
from ..intervals import paired_against, tidy_intervals

__all__ = ["MIN_FACTS", "OTHER", "by_relation", "relation_labels"]

#: Relations with fewer facts than this in a table are pooled.
MIN_FACTS = 5
OTHER = "other"


def relation_labels(facts: Iterable[Fact]) -> dict[str, str]:
    """``{fact key: relation}``: the fact's ``relation``, else its prompt template."""
    return {f.key: f.relation if f.relation else f.prompt for f in facts}


def by_relation(rows: pd.DataFrame, labels: Mapping[str, str], metrics: Sequence[str], *,
                groups: Sequence[str] = ("model", "dataset"), baseline: str | None = "MEMIT",
                on: Sequence[str] = ("batch", "position"), min_facts: int = MIN_FACTS) -> dict[str, pd.DataFrame]:
    """Per (``groups``, setting, relation, metric), the mean over facts with its 95%
    interval (``intervals``), and each edited setting minus ``baseline`` on the same facts
    within each relation (``paired``; empty without a baseline; the unedited model's rows,
    setting ``"pre-edit"``, are not paired). ``rows`` are per-fact rows with
    ``fact_key`` and ``setting``; a fact key missing from ``labels`` is an error."""
    missing = sorted(set(rows["fact_key"]) - set(labels))
    if missing:
        raise ValueError(f"{len(missing)} fact(s) have no relation label, e.g. {missing[0]!r}; "
                         "pass the facts the rows were measured on")
    rows = rows.assign(relation=rows["fact_key"].map(labels))
    counts = rows.groupby([*groups, "relation"])["fact_key"].transform("nunique")
    rows = rows.assign(relation=rows["relation"].where(counts >= min_facts, OTHER))
    intervals = tidy_intervals(rows, [*groups, "relation", "setting"], list(metrics))
    intervals = intervals.sort_values([*groups, "relation"], kind="stable").reset_index(drop=True)
    paired = pd.DataFrame()
    if baseline is not None and (rows["setting"] == baseline).any():
        edited = rows[rows["setting"] != "pre-edit"]
        paired = pd.DataFrame(paired_against(edited, list(metrics), baseline, groups=[*groups, "relation"],
                                             on=list(on)))
        if not paired.empty:
            paired = paired.sort_values([*groups, "relation"], kind="stable").reset_index(drop=True)
    return {"intervals": intervals, "paired": paired}
