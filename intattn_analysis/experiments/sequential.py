"""Experiment ``sequential``: edits that pile up, batch after batch, on one model.

For each method, rounds of ``batch_size`` test edits are applied one after another to the
same model (:func:`intattn_analysis.edit_sequence`'s procedure: each round's targets are
optimised on the model as the earlier rounds left it, AlphaEdit carries the keys edited
so far, the second moments and context prefixes are the unedited model's). After each
round every edit so far is evaluated (Edit Succ., Rephrase, Portability, Locality against
the unedited model's predictions), as is a fixed set of known built-in facts that no
round edits ("Known kept": the share the model still answers), and each method is paired
against MEMIT on the same edits after the same round (and the pairs of
:data:`.batch_scaling.CONTRASTS` against each other). Fluency is measured at
the rounds in ``fluency_rounds``.

Each (method, round) is a stored unit. A killed run resumes: the rounds already stored
are applied again without their evaluation (the edits are deterministic) and the run
goes on from the first missing round. The first rounds of a longer run are exactly a
shorter run's (round ``r`` depends only on rounds ``1..r``, and its key names only its own
evaluation), so a run of 10 rounds is extended to 20 by running 20: the first 10 are read
from the store.

The methods are rows of the ``editors`` experiment or of the ``batch-scaling`` one
(:func:`intattn_analysis.experiments.batch_scaling.settings_for`); by default
(:func:`default_rows`) every row of batch scaling (every compared editor but the
fine-tuning baselines: ROME fact after fact, PMET, AlphaEdit, MEMIT, IntAttn-Edit without
and with the null-space projection at the train-chosen alpha, and any editor registered
with ``ia.register_editor``) and IntAttn-Edit at the traced alpha.

Scales: ``ci``: 3 rounds of 2 ZsRE test edits, MEMIT, AlphaEdit and IntAttn-Edit, second
moments from 20,000 tokens; ``paper``: 20 rounds of 10 with every default row, Fluency
after rounds 10 and 20.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..answers import GenerationSettings
from ..datasets import load_facts
from ..intervals import holm_within, paired_against, paired_contrasts, tidy_intervals
from ..known import is_known, is_known_cached
from ..loading import ModelHandle
from ..metrics import evaluate
from ..reporting import GENERATION_SCORES, MAIN_METRICS, VERDICT_METRICS
from .batch_scaling import CONTRASTS, ROWS, settings_for
from .common import dataset_batches, dataset_label, metric_columns, resolve_scale
from .runner import SharedMoments, Setting, Unit, run_sequence
from .settings import with_settings
from .store import ResultStore, check_unique
from .units import (batch_key, fact_rows, facts_digest, method_key, part_protocol, protocol_units, protocols_of,
                    slug, with_protocol)

__all__ = ["NAME", "SCALES", "SequentialScale", "default_rows", "round_units", "run", "run_sequences", "summarise", "tables"]

NAME = "sequential"


@dataclass(frozen=True)
class SequentialScale:
    """How much of the experiment to run."""

    rounds: int
    batch_size: int
    methods: tuple[str, ...] | None = ("MEMIT", "AlphaEdit", "IntAttn-Edit")  # None: default_rows()
    fluency_rounds: tuple[int, ...] = ()
    n_known: int = 50
    mom2_n_tokens: int | None = None
    fluency_tokens: int = 50
    protocol: str = "teacher-forced"
    generation: GenerationSettings = GenerationSettings()


SCALES: dict[str, SequentialScale] = {
    "ci": SequentialScale(rounds=3, batch_size=2, fluency_rounds=(3,), n_known=8, mom2_n_tokens=20_000,
                          fluency_tokens=20),
    "paper": SequentialScale(rounds=20, batch_size=10, fluency_rounds=(10, 20), methods=None),
}


def default_rows() -> tuple[str, ...]:
    """IntAttn-Edit at the traced alpha, then every row of batch scaling
    (:data:`.batch_scaling.ROWS`, as registered now)."""
    return ("IntAttn-Edit", *ROWS)


def known_probe_facts(model: ModelHandle, edited: Sequence, n: int) -> list:
    """Up to ``n`` built-in facts the unedited model answers, whose subjects no round
    edits (in file order)."""
    subjects = {f.subject for f in edited}
    out = []
    for fact in load_facts("builtin"):
        if len(out) == n:
            break
        if fact.target_true is None or fact.subject in subjects:
            continue
        if fact.known.get(model.name, None) is False:
            continue
        if is_known_cached(model, fact):
            out.append(fact)
    return out


def round_units(model: ModelHandle, rounds: Sequence[Sequence], name: str, method: str, hp, *, dataset: str,
                known: Sequence = (), fluency_rounds: Sequence[int] = (), fluency_tokens: int = 50) -> list[Unit]:
    """The unit of each round (numbered from 1) of one named (method, hparams): its key
    names the edits so far and only its own evaluation (with or without Fluency), so
    that the first rounds of a longer run are the units of a shorter one. (The
    teacher-forced units; :func:`.units.protocol_units` adds each round's generation
    unit.)"""
    eval_key = {"metrics": ["knowedit"], "fluency_tokens": fluency_tokens, "known": facts_digest(known)}
    columns = {"model": model.name, "dataset": dataset, "setting": name, "method": method}
    units = []
    for r in range(1, len(rounds) + 1):
        done = [fact for batch in rounds[:r] for fact in batch]
        key = {**batch_key(model, dataset, r, done), "unit": "round", "rounds_of": len(rounds[0]),
               **method_key(model, method, hp), "fluency": r in fluency_rounds, **eval_key}
        units.append(Unit(key, f"{slug(name)}-r{r:03d}", {**columns, "round": r}))
    return units


def run_sequences(
    model: ModelHandle,
    rounds: Sequence[Sequence],
    settings: Mapping[str, tuple[str, Any]],
    store: ResultStore,
    *,
    dataset: str,
    known: Sequence = (),
    fluency_rounds: Sequence[int] = (),
    fluency_tokens: int = 50,
    moments: Mapping | None = None,
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
    progress: bool = True,
) -> int:
    """Apply ``rounds`` one after another with each named (method, hparams)
    (:func:`.runner.run_sequence`), evaluating after each round every edit so far against
    the unedited model, and the ``known`` facts; one stored unit per (name, round)
    (:func:`round_units`), and under ``protocol`` ``"both"`` or ``"generation"`` a
    generation unit per round too (or instead): the KnowEdit metrics of every edit so far
    under the generation protocol (``Known kept`` is measured once, in the
    teacher-forced unit: it is already a greedy answer). Returns the number of units
    computed."""
    rounds = [list(r) for r in rounds]
    generation = generation or GenerationSettings()
    protocols = protocols_of(protocol)
    moments_of = SharedMoments(model, [Setting(n, m, hp) for n, (m, hp) in settings.items()], moments, progress)
    pre: dict[str, list] = {}

    def evaluate_unedited() -> None:
        for each in protocols:
            if each not in pre:
                pre[each] = [evaluate(model, batch, metrics=("knowedit",), protocol=each, generation=generation,
                                      progress=False) for batch in rounds]

    computed = 0
    for name, (method, hp) in tqdm(settings.items(), desc=f"{model.name} sequences", disable=not progress):
        def measure_round(r: int, part: str = "") -> list[dict]:
            each = part_protocol(part)
            if each == "generation":
                metrics = ("knowedit",)
            else:
                metrics = ("knowedit", "fluency") if (r + 1) in fluency_rounds else ("knowedit",)
            rows = []
            for j, batch in enumerate(rounds[: r + 1]):
                post = evaluate(model, batch, pre=pre[each][j], metrics=metrics, fluency_tokens=fluency_tokens,
                                protocol=each, generation=generation, progress=False)
                rows += [{**row, "kind": "edit", "edited_in": j + 1} for row in fact_rows(post)]
            if each == "teacher-forced":
                for i, fact in enumerate(known):
                    rows.append({"kind": "known", "position": i, "fact_key": fact.key,
                                 "Known kept": float(is_known(model, fact)[0])})
            return rows

        units = round_units(model, rounds, name, method, hp, dataset=dataset, known=known,
                            fluency_rounds=fluency_rounds, fluency_tokens=fluency_tokens)
        done = [f for batch in rounds for f in batch]
        parts = [protocol_units(unit, protocol, generation, done[: len(rounds[0]) * (r + 1)])
                 for r, unit in enumerate(units)]
        computed += run_sequence(model, rounds, Setting(name, method, hp), parts, measure_round, store,
                                 moments=moments_of, before=evaluate_unedited)
    return computed


def run(
    model: ModelHandle, dataset: str, scale: str | SequentialScale, root, *,
    shard: tuple[int, int] | None = None, protocol: str | None = None,
    generation: GenerationSettings | None = None, progress: bool = True,
) -> ResultStore:
    """Run (or resume) every method's sequence (``shard`` splits the methods).
    ``protocol`` and ``generation`` override the scale's evaluation protocol."""
    scale_name = scale if isinstance(scale, str) else "ci"
    scale = resolve_scale(scale, SCALES, protocol, generation)
    store = ResultStore(root, NAME)
    rounds = dataset_batches(dataset, scale.batch_size, scale.rounds)
    methods = list(scale.methods) if scale.methods is not None else list(default_rows())
    if shard is not None:
        index, count = shard
        methods = methods[index - 1::count]
    settings = settings_for(model, methods, scale.mom2_n_tokens, scale_name, root, progress)
    known = known_probe_facts(model, [f for r in rounds for f in r], scale.n_known)
    run_sequences(model, rounds, settings, store, dataset=dataset_label(dataset), known=known,
                  fluency_rounds=scale.fluency_rounds, fluency_tokens=scale.fluency_tokens, protocol=scale.protocol,
                  generation=scale.generation, progress=progress)
    return store


def summarise(store: ResultStore, baseline: str = "MEMIT",
              contrasts: Sequence[tuple[str, str]] = CONTRASTS) -> dict[str, pd.DataFrame]:
    """The sequential tables from whatever the store holds.

    Every table is split by evaluation ``protocol`` (teacher-forced rows of stores
    written before the generation protocol count as such; ``Known kept`` is in the
    teacher-forced rows).

    Returns:
        ``intervals``: per (model, dataset, protocol, setting, round, metric), the mean and 95%
        interval over every edit so far (``Known kept`` over the known built-in facts),
        and ``n_edits``;
        ``paired``: per (model, dataset, setting other than ``baseline``, round, metric),
        the mean per-fact difference from ``baseline`` after the same round on the same
        edits (``Known kept`` on the same known facts), its 95% interval and p-value;
        ``contrasts``: the same for each ``(setting, baseline)`` of ``contrasts`` whose
        two rows the store holds (by default IntAttn-Edit+NS against AlphaEdit and
        against IntAttn-Edit at the same alpha).
    """
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    rows = with_protocol(rows)
    edits = rows[rows["kind"] == "edit"]
    known = rows[rows["kind"] == "known"]
    check_unique(edits, ["model", "dataset", "protocol", "setting", "round", "edited_in", "position"])
    by = ["model", "dataset", "protocol", "setting", "round"]
    metrics = metric_columns(edits, MAIN_METRICS + GENERATION_SCORES)
    parts = [tidy_intervals(edits, by, metrics)]
    if not known.empty:
        parts.append(tidy_intervals(known, by, ["Known kept"]))
    # rounds in order; within a round the metrics keep the main table's order
    intervals = pd.concat(parts, ignore_index=True).sort_values(by, kind="stable")
    groups = ["model", "dataset", "protocol", "round"]
    paired = paired_against(edits, metrics, baseline, groups, on=["edited_in", "position"])
    if not known.empty:
        paired += paired_against(known, ["Known kept"], baseline, groups, on=["position"])
    contrasted = paired_contrasts(edits, metrics, contrasts, groups, on=["edited_in", "position"])
    if not known.empty:
        contrasted += paired_contrasts(known, ["Known kept"], contrasts, groups, on=["position"])
    columns = ["model", "dataset", "protocol", "setting", "baseline", "round", "metric", "diff", "ci_low", "ci_high",
               "p_value", "n_edits"]
    paired = pd.DataFrame(paired, columns=columns).sort_values(["model", "dataset", "protocol", "setting", "round"],
                                                               kind="stable")
    contrasted = pd.DataFrame(contrasted, columns=columns).sort_values(
        ["model", "dataset", "protocol", "setting", "baseline", "round"], kind="stable")
    # one family of comparisons per (model, dataset, protocol, round): every editor on the
    # KnowEdit metrics (VERDICT_METRICS), the other metrics (Known kept, Fluency, ...) another
    family = ["model", "dataset", "protocol", "round"]
    return {"intervals": intervals.reset_index(drop=True),
            "paired": holm_within(paired.reset_index(drop=True), family, VERDICT_METRICS),
            "contrasts": holm_within(contrasted.reset_index(drop=True), family, VERDICT_METRICS)}


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root`` (what ``intattn run`` writes as CSVs), each row
    labelled with its settings id, and the table of those ids (:func:`.settings.with_settings`)."""
    store = ResultStore(root, NAME)
    return with_settings(summarise(store), store)
