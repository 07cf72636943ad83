"""Experiment ``outdated``: how much of the old answer survives an edit, and where.

The paper motivates editing attention as well as MLPs with one sentence: MLP-only edits
"can leave residual outdated knowledge" that attention still carries. This experiment
asks it directly. For each batch of facts the unedited model *knows* (its greedy answer
begins with ``target_true``: only knowledge that was there can survive), each method of
:data:`ROWS` writes the batch, and, with the batch written, three things are measured:

(a) **survival** (``part="survival"``, one row per fact, with the KnowEdit metrics of the
    edit beside it): the old answer's standing on the
    edit prompt, on each paraphrase and on each subject-alias probe (portability probes
    of kind ``Subject_Aliasing``, where the old answer is still ``target_true``):
    ``Old top-1`` (``target_true``'s first token is the greedy choice), ``Old top-10``,
    ``Old p`` (its probability, the geometric mean over its tokens, teacher-forced) and
    ``Old log rank`` (``log10(1 + r)``, with ``r`` the number of tokens ranked before its
    first token: ranks spread over four orders of magnitude, so their logarithm is what
    a mean can summarise; ``10**mean - 1`` is a geometric-mean rank), with the new answer's
    ``New top-1`` beside them; each as ``<metric>/<probe>``, averaged over a fact's
    probes of that kind;
(b) **where it flows** (``part="trace"``, one row per fact, module and token): causal
    tracing of the edited model with ``target_true`` as the answer
    (:func:`intattn_analysis.trace` with ``answered_only=False``): the indirect effect on
    ``p(target_true)`` of restoring attention or MLP outputs, at the last subject token
    and the last token, per layer (``ie``, a list over layers), beside the same trace of
    the unedited model (setting ``pre-edit``);
(c) **whether it comes back** (in the survival rows): the edit prompt behind a context
    that names the old attribute, :data:`CONTEXT` (``"{subject}, long known for its
    {old} ties."``, the wording of the issue that asked for it; it reads oddly for some
    relations): ``Context old top-1``, ``Context old p`` and ``Context new top-1``. The
    context holds the old answer verbatim, so a model may simply copy it; the control
    names another fact's old answer instead (the next fact of the batch of the same
    relation, :func:`distractors`), and ``Control copy top-1`` is the rate at which that
    word is copied. Only a return rate above the copying rate speaks of stored old
    knowledge. :func:`summarise` gives the return rate among the facts whose edit removed
    the old answer from the plain prompt (a subset that differs between methods; the
    paired table compares the unconditional rates on the same facts).

(d) **what the model says** (``part="answers"``, under the generation protocol, with
    ``protocol="both"`` or ``"generation"``): (a) and (c) asked rather than scored
    (:func:`answer_rows`): the model answers each probe by greedy decoding to a natural
    stop (:mod:`intattn_analysis.answers`), and ``Old answer/<probe>``, ``New
    answer/<probe>``, ``Context old answer``, ``Context new answer`` and ``Control copy
    answer`` are 1 when the answer begins with the old answer, the new one, or the other
    fact's old answer (the copying control); the KnowEdit metrics beside them are the
    generation protocol's. This is the superficial-editing probe of Xie et al. (arXiv
    2505.12636) under generation: a context that cites the old answer, and how often it
    comes back.

Reading (b). After a successful edit ``p(target_true)`` is small in the clean run, so
every effect on it is small in absolute terms; the ``flow`` table sets the clean and
corrupted probabilities beside the effects. The noise on the subject also blurs the
edited key, so the corrupted run partly loses the edit, and restoring a module the
edit wrote puts the edit back: its effect on ``p(target_true)`` can be negative. The
curves therefore show where the old answer still flows *and* where each method's edit
acts; a positive effect at a module the method did not write (attention for MEMIT) is
old knowledge flowing past the edit, which is the question the paper raises.

Methods are the rows of the ``batch-scaling`` experiment (every compared editor but the
fine-tuning baselines, with IntAttn-Edit without and with the null-space projection at the
train-chosen alpha), with the model's defaults. Each (batch, setting, part) is a stored unit; a killed run resumes.
Trace rows hold one list of per-layer effects per (fact, module, token), so that a batch
of 100 traced facts stays a small file.

Scales: ``ci``: one batch of 3 known built-in facts, MEMIT and IntAttn-Edit, 2 of them
traced with 2 noise draws, second moments from 20,000 tokens; ``paper``: three batches of
100 (300 of the 312 built-in facts SmolLM2 knows, 309 for Gemma-3: every relation), every
method, the first 50 facts of each batch traced with 10 noise draws (the localization
experiment's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..answers import GenerationSettings, answer_text, match_answer
from ..facts import Fact, sample_by_relation
from ..intervals import holm_within, paired_against, paired_difference, tidy_intervals
from ..known import is_known_cached
from ..cache import kind_folder
from ..loading import ModelHandle
from ..metrics import Evaluation, ask, evaluate, score_answers
from ..reporting import MAIN_METRICS, VERDICT_METRICS
from ..tracing import trace
from . import localization
from .batch_scaling import ROWS, settings_for
from .common import dataset_facts, dataset_label, metric_columns, resolve_scale, targets_cache
from .relations import by_relation, relation_labels
from .runner import PRE_EDIT, Cell, Setting, Unit, run_cells
from .settings import with_settings
from .store import ResultStore, check_unique
from .units import batch_key, method_key, protocols_of, shard_batches, slug

__all__ = ["ALIAS_KIND", "ANSWER_METRICS", "CONTEXT", "NAME", "OutdatedScale", "PROBES", "SCALES", "SURVIVAL_METRICS",
           "OldAnswerMeasure", "answer_rows", "context_prompt", "known_batches", "outdated_cells", "run", "run_batches", "summarise", "survival_rows", "tables",
           "trace_rows"]

NAME = "outdated"
#: The context that names the old attribute before the edit prompt (part (c)).
CONTEXT = "{subject}, long known for its {old} ties."
#: The portability probes whose answer is still the old one when the edit is undone: the
#: same question about an alias of the subject.
ALIAS_KIND = "Subject_Aliasing"
#: The probes of part (a), in column order.
PROBES = ("prompt", "paraphrase", "alias")
#: Part (a)'s per-probe metrics and part (c)'s, in column order.
SURVIVAL_METRICS = (
    *[f"{m}/{p}" for p in PROBES for m in ("Old top-1", "Old top-10", "Old p", "Old log rank", "New top-1")],
    "Context old top-1", "Context old p", "Context new top-1", "Control copy top-1",
)
#: Part (d)'s metrics, in column order.
ANSWER_METRICS = (
    *[f"{m}/{p}" for p in PROBES for m in ("Old answer", "New answer")],
    "Context old answer", "Context new answer", "Control copy answer",
)
#: Version of the answer rows; bump it when what they measure changes.
ANSWERS_FORMAT = 1
TRACE_KINDS = ("attn", "mlp")
TRACE_TOKENS = ("subject_last", "last")
TRACE_NOISE = 3.0  # times the embeddings' std, as the localization experiment
TRACE_SEED = 0
#: Version of the survival rows; bump it when what they measure changes.
SURVIVAL_FORMAT = 2


@dataclass(frozen=True)
class OutdatedScale:
    """How much of the experiment to run."""

    batch_size: int
    n_batches: int
    n_traced: int  # the first n_traced facts of each batch are traced
    samples: int  # noise draws per traced fact
    methods: tuple[str, ...] | None = None  # None: every row of batch scaling as registered when run
    mom2_n_tokens: int | None = None
    protocol: str = "teacher-forced"  # "both" or "generation": part (d) too
    generation: GenerationSettings = GenerationSettings()

    @property
    def rows(self) -> tuple[str, ...]:
        """The rows run: ``methods``, or every row of batch scaling as registered now."""
        return tuple(self.methods) if self.methods is not None else tuple(ROWS)


SCALES: dict[str, OutdatedScale] = {
    "ci": OutdatedScale(batch_size=3, n_batches=1, n_traced=2, samples=2,
                        methods=("MEMIT", "IntAttn-Edit, train alpha"), mom2_n_tokens=20_000),
    "paper": OutdatedScale(batch_size=100, n_batches=3, n_traced=50, samples=10),
}


def context_prompt(fact: Fact, attribute: str | None = None) -> str:
    """The edit prompt behind :data:`CONTEXT` naming ``attribute`` (default: this
    fact's old answer)."""
    attribute = attribute if attribute is not None else fact.target_true
    if not attribute:
        raise ValueError(f"fact {fact.key} ({fact.subject!r}) has no target_true; the context names it")
    return f"{CONTEXT.format(subject=fact.subject, old=attribute)} {fact.text}"


def distractors(facts: Sequence[Fact]) -> list[str | None]:
    """For each fact, the old answer of another fact of the batch to name in the control
    context: the next fact (cyclically) of the same relation whose old answer differs from
    both of this fact's answers, else the next of any relation; ``None`` when there is
    none."""
    labels = relation_labels(facts)
    out = []
    for i, fact in enumerate(facts):
        others = [facts[(i + k) % len(facts)] for k in range(1, len(facts))]
        usable = [o for o in others if o.target_true and o.target_true not in (fact.target_true, fact.target_new)]
        same = [o for o in usable if labels[o.key] == labels[fact.key]]
        chosen = (same or usable or [None])[0]
        out.append(chosen.target_true if chosen is not None else None)
    return out


def _probe_prompts(fact: Fact) -> dict[str, list[str]]:
    return {
        "prompt": [fact.text],
        "paraphrase": list(fact.paraphrase_texts),
        "alias": [p.prompt for p in fact.portability if p.kind == ALIAS_KIND],
    }


def known_batches(model: ModelHandle, dataset: str, batch_size: int, n_batches: int,
                  progress: bool = True) -> list[list[Fact]]:
    """``n_batches * batch_size`` facts of ``dataset`` that have a ``target_true``, ask
    for a change, and that the unedited model knows (:func:`intattn_analysis.known.is_known_cached`;
    a fact's stored flag for the model is trusted where it says no, and checked where it
    says yes or is missing), in consecutive batches. The facts are taken with their
    relations interleaved (:func:`intattn_analysis.facts.sample_by_relation`: the
    built-in file is sorted by relation, and batches of file order would each hold a few
    relations, confounding relation with batch); a dataset without relations keeps its
    file order. Raises when there are too few."""
    wanted = batch_size * n_batches
    chosen: list[Fact] = []
    facts = dataset_facts(dataset)
    facts = sample_by_relation(facts, len(facts))
    with tqdm(total=wanted, desc=f"known facts of {dataset_label(dataset)}", disable=not progress) as bar:
        for fact in facts:
            if len(chosen) == wanted:
                break
            if not fact.target_true or not fact.changes_answer or fact.known.get(model.name) is False:
                continue
            if is_known_cached(model, fact):
                chosen.append(fact)
                bar.update()
    if len(chosen) < wanted:
        raise ValueError(f"{model.name} knows {len(chosen)} editable facts of {dataset_label(dataset)} with a "
                         f"target_true; {n_batches} batch(es) of {batch_size} need {wanted}")
    return [chosen[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def survival_rows(model: ModelHandle, facts: Sequence[Fact], pre: Evaluation | None = None) -> list[dict]:
    """Parts (a) and (c) on the model as it is, with the KnowEdit metrics (Edit Succ.,
    Rephrase, Portability, Locality against ``pre``, the unedited model's evaluation of
    the same facts; without it Locality is NaN): one row per fact (see the module notes).
    ``relation`` is the fact's relation, or its prompt template where it has none
    (:func:`.relations.relation_labels`)."""
    main = evaluate(model, list(facts), pre=pre, metrics=("knowedit",), progress=False).per_fact
    others = distractors(facts)
    pairs = []
    for fact, other in zip(facts, others):
        pairs += [(p, a) for p in _asked_prompts(fact, None) for a in (fact.target_true, fact.target_new)]
        if other is not None:  # the control's context is scored for the distractor's answer alone
            pairs.append((_control_prompt(fact, other), other))
    scores = dict(zip(pairs, score_answers(model, pairs, progress=False)))
    rows = []
    for row, fact, other in _fact_rows(facts, others, main):
        for probe, prompts in _probe_prompts(fact).items():
            old = [scores[p, fact.target_true] for p in prompts]
            new = [scores[p, fact.target_new] for p in prompts]
            row[f"Old top-1/{probe}"] = _mean(_top(s) for s in old)
            row[f"Old top-10/{probe}"] = _mean(_top(s, 10) for s in old)
            row[f"Old p/{probe}"] = _mean(s.probability for s in old)
            row[f"Old log rank/{probe}"] = _mean(_log_rank(s) for s in old)
            row[f"New top-1/{probe}"] = _mean(_top(s) for s in new)
        context = context_prompt(fact)
        old, new = scores[context, fact.target_true], scores[context, fact.target_new]
        row["Context old top-1"] = _top(old)
        row["Context old p"] = old.probability
        row["Context new top-1"] = _top(new)
        row["Control copy top-1"] = _top(scores[_control_prompt(fact, other), other]) if other is not None else math.nan
        rows.append(row)
    return rows


def answer_rows(model: ModelHandle, facts: Sequence[Fact], pre: Evaluation | None = None,
                generation: GenerationSettings | None = None) -> list[dict]:
    """Part (d) on the model as it is: (a) and (c) asked under the generation protocol,
    with its KnowEdit metrics (against ``pre``, the unedited model's generation-protocol
    evaluation; without it Locality is NaN), one row per fact, and the answers to the
    edit prompt and to the context (``answer``, ``context answer``)."""
    generation = generation or GenerationSettings()
    main = evaluate(model, list(facts), pre=pre, metrics=("knowedit",), protocol="generation",
                    generation=generation, progress=False).per_fact
    others = distractors(facts)
    prompts = [prompt for fact, other in zip(facts, others) for prompt in _asked_prompts(fact, other)]
    said = {p: answer_text(a) for p, a in zip(prompts, ask(model, prompts, generation, progress=False))}

    def begins(prompt: str, answer: str) -> float:
        return match_answer(said[prompt], [answer]).prefix

    rows = []
    for row, fact, other in _fact_rows(facts, others, main):
        for probe, group in _probe_prompts(fact).items():
            row[f"Old answer/{probe}"] = _mean(begins(p, fact.target_true) for p in group)
            row[f"New answer/{probe}"] = _mean(begins(p, fact.target_new) for p in group)
        context = context_prompt(fact)
        row["Context old answer"] = begins(context, fact.target_true)
        row["Context new answer"] = begins(context, fact.target_new)
        row["Control copy answer"] = begins(_control_prompt(fact, other), other) if other is not None else math.nan
        row["answer"], row["context answer"] = said[fact.text], said[context]
        rows.append(row)
    return rows


def _asked_prompts(fact: Fact, other: str | None) -> list[str]:
    """Every prompt parts (a), (c) and (d) put to the model for ``fact``: its probes'
    prompts, the context that cites the old answer, and the copying control's context
    (citing ``other``, the fact's distractor, unless it is ``None``)."""
    prompts = [p for group in _probe_prompts(fact).values() for p in group] + [context_prompt(fact)]
    return prompts + ([_control_prompt(fact, other)] if other is not None else [])


def _control_prompt(fact: Fact, other: str | None) -> str | None:
    return context_prompt(fact, other) if other is not None else None


def _fact_rows(facts: Sequence[Fact], others: Sequence[str | None], main):
    """``(row, fact, distractor)`` per fact: the row starts with the fact's place, key,
    subject and relation, and its KnowEdit metrics from ``main`` (an evaluation's
    per-fact table)."""
    labels = relation_labels(facts)
    for position, (fact, other) in enumerate(zip(facts, others)):
        row: dict[str, Any] = {"position": position, "fact_key": fact.key, "subject": fact.subject,
                               "relation": labels[fact.key]}
        row.update({m: float(main.iloc[position][m]) for m in MAIN_METRICS if m in main.columns})
        yield row, fact, other


def _top(score, k: int = 1) -> float:
    """1 when the answer's first token is among the model's ``k`` first choices."""
    return math.nan if score.first_rank is None else float(score.first_rank < k)


def _log_rank(score) -> float:
    return math.nan if score.first_rank is None else math.log10(1 + score.first_rank)


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def trace_rows(model: ModelHandle, facts: Sequence[Fact], samples: int, window: int | None = None) -> list[dict]:
    """Part (b) on the model as it is: per fact, module and token class, the indirect
    effect on ``p(target_true)`` per layer (``window``: default the localization
    experiment's for the model), with the fact's clean and corrupted ``p(target_true)``."""
    if window is None:
        window = localization.window_for(model)
    result = trace(model, list(facts), kinds=TRACE_KINDS, tokens=TRACE_TOKENS, window=window, samples=samples,
                   noise=TRACE_NOISE, seed=TRACE_SEED, answered_only=False, cache_dir=kind_folder("traces"),
                   progress=False)
    table = result.to_dataframe()
    position = {f.key: i for i, f in enumerate(facts)}
    rows = []
    for (key, kind, token), group in table.groupby(["fact", "kind", "token_class"], sort=False):
        per_layer = group.groupby("layer")["ie"].mean().sort_index()
        rows.append({"position": position[key], "fact_key": key, "module": kind, "token_class": token,
                     "p_clean": float(group["p_clean"].iloc[0]), "p_corrupted": float(group["p_corrupted"].iloc[0]),
                     "layers": [int(l) for l in per_layer.index], "ie": [float(v) for v in per_layer.values]})
    return rows


@dataclass(frozen=True)
class OldAnswerMeasure:
    """Parts (a) and (c), ``survival`` (:func:`survival_rows`, edited settings against
    the unedited model's KnowEdit evaluation of the batch), and part (b), ``trace``
    (:func:`trace_rows` of the first ``n_traced`` facts), on one model state."""

    n_traced: int
    samples: int
    window: int
    generation: GenerationSettings | None = None  # part (d)'s settings, where it is measured
    edit_in_seconds = False  # each part's seconds time its own measurement

    def wants_pre(self, cells, missing) -> bool:
        """The unedited model's KnowEdit evaluation is needed by an edited survival or
        answers part."""
        return any(cell.setting.edits and {"survival", "answers"} & set(missing[i]) for i, cell in enumerate(cells))

    def pre(self, model, facts) -> dict[str, Evaluation]:
        out = {"teacher-forced": evaluate(model, list(facts), metrics=("knowedit",), progress=False)}
        if self.generation is not None:
            out["generation"] = evaluate(model, list(facts), metrics=("knowedit",), protocol="generation",
                                         generation=self.generation, progress=False)
        return out

    def rows(self, model, facts, part, pre, setting):
        if part == "survival":
            return survival_rows(model, facts, pre=pre["teacher-forced"] if setting.edits else None), None
        if part == "answers":
            return answer_rows(model, facts, pre=pre["generation"] if setting.edits else None,
                               generation=self.generation), None
        return trace_rows(model, list(facts)[: self.n_traced], self.samples, window=self.window), None


def outdated_cells(model: ModelHandle, batches: Sequence[Sequence[Fact]], settings: Mapping[str, tuple[str, Any]],
                   *, dataset: str, n_traced: int, samples: int, window: int,
                   shard: tuple[int, int] | None = None, protocol: str = "teacher-forced",
                   generation: GenerationSettings | None = None) -> list[Cell]:
    """For each batch of this shard, the unedited model (``pre-edit``) and each named
    (method, hparams) with the batch written, each with a ``survival`` and a ``trace``
    unit (label ``b000-<setting>-<part>``), and under ``protocol`` ``"both"`` or
    ``"generation"`` an ``answers`` unit (part (d); ``"generation"`` alone measures only
    it)."""
    generation = generation or GenerationSettings()
    protocols = protocols_of(protocol)
    parts = (("survival", "trace") if "teacher-forced" in protocols else ()) + \
        (("answers",) if "generation" in protocols else ())
    part_keys = {
        "survival": {"format": SURVIVAL_FORMAT, "context": CONTEXT, "alias_kind": ALIAS_KIND,
                     "metrics": ["knowedit"]},
        "trace": {"n_traced": n_traced, "samples": samples, "kinds": list(TRACE_KINDS),
                  "tokens": list(TRACE_TOKENS), "window": window, "noise": TRACE_NOISE, "seed": TRACE_SEED,
                  "answered_only": False},
        "answers": {"format": ANSWERS_FORMAT, "context": CONTEXT, "alias_kind": ALIAS_KIND, "metrics": ["knowedit"],
                    "evaluation": "generation", "generation": generation.key()},
    }
    part_labels = {"answers": {"protocol": "generation", "prompt_form": generation.prompt_form}}
    named = {"pre-edit": PRE_EDIT, **{name: Setting(name, m, hp) for name, (m, hp) in settings.items()}}
    cells = []
    for b in shard_batches(len(batches), shard):
        facts = list(batches[b])
        bkey = batch_key(model, dataset, b, facts)
        for name, setting in named.items():
            which = ({"unit": "edit", **method_key(model, setting.method, setting.hparams)} if setting.edits
                     else {"unit": "pre-edit"})
            columns = {"model": model.name, "dataset": dataset, "batch": b, "setting": name, "method": setting.method}
            units = {part: Unit({**bkey, **which, "part": part, **part_keys[part]}, f"b{b:03d}-{slug(name)}-{part}",
                                {**columns, "part": part, **part_labels.get(part, {})})
                     for part in parts}
            cells.append(Cell(b, facts, setting, units))
    return cells


def run_batches(model: ModelHandle, batches: Sequence[Sequence[Fact]], settings: Mapping[str, tuple[str, Any]],
                store: ResultStore, *, dataset: str, n_traced: int, samples: int,
                shard: tuple[int, int] | None = None, moments: Mapping | None = None,
                protocol: str = "teacher-forced", generation: GenerationSettings | None = None,
                progress: bool = True) -> int:
    """For each batch, the unedited model (``pre-edit``) and each named (method,
    hparams) with the batch written: a survival unit and a trace unit (the first
    ``n_traced`` facts) (:func:`outdated_cells`, :func:`.runner.run_cells`). Weights are
    restored after each method; ``shard`` splits the batches. Returns the number of
    units computed."""
    window = localization.window_for(model)
    generation = generation or GenerationSettings()
    cells = outdated_cells(model, batches, settings, dataset=dataset, n_traced=n_traced, samples=samples,
                           window=window, shard=shard, protocol=protocol, generation=generation)
    measured = generation if "generation" in protocols_of(protocol) else None
    return run_cells(model, cells, OldAnswerMeasure(n_traced, samples, window, measured), store, moments=moments,
                     targets_cache=targets_cache(), desc=f"{model.name} {dataset} outdated", progress=progress)


def run(model: ModelHandle, dataset: str, scale: str | OutdatedScale, root, *,
        shard: tuple[int, int] | None = None, protocol: str | None = None,
        generation: GenerationSettings | None = None, progress: bool = True) -> ResultStore:
    """Run (or resume) this shard's batches; returns the store. ``protocol`` and
    ``generation`` override the scale's."""
    scale_name = scale if isinstance(scale, str) else "ci"
    scale = resolve_scale(scale, SCALES, protocol, generation)
    store = ResultStore(root, NAME)
    batches = known_batches(model, dataset, scale.batch_size, scale.n_batches, progress)
    settings = settings_for(model, scale.rows, scale.mom2_n_tokens, scale_name, root, progress)
    run_batches(model, batches, settings, store, dataset=dataset_label(dataset), n_traced=scale.n_traced,
                samples=scale.samples, shard=shard, protocol=scale.protocol, generation=scale.generation,
                progress=progress)
    return store


def _trace_long(rows: pd.DataFrame) -> pd.DataFrame:
    """Trace rows with one row per layer: model, dataset, setting, fact_key, module,
    token_class, layer, ie."""
    keep = ["model", "dataset", "setting", "batch", "position", "fact_key", "module", "token_class", "p_clean",
            "p_corrupted"]
    long = rows[keep + ["layers", "ie"]].explode(["layers", "ie"]).rename(columns={"layers": "layer"})
    return long.astype({"layer": "int64", "ie": "float64"}).reset_index(drop=True)


def summarise(store: ResultStore, baseline: str = "MEMIT") -> dict[str, pd.DataFrame]:
    """The tables from whatever the store holds.

    Returns:
        ``intervals``: the survival metrics (a) and (c) per (model, dataset, setting), mean
        with 95% interval (percent for shares);
        ``paired``: each method minus ``baseline`` on the same facts (survival metrics);
        ``restored``: per (model, dataset, setting), among the facts whose old answer is no
        longer the greedy choice on the plain prompt, the share that the context brings
        back (``Context old top-1``), with its interval;
        ``relations``, ``relations_paired``: the KnowEdit metrics, ``Old top-1/prompt``
        and ``Context old top-1`` per relation (:func:`.relations.by_relation`), and each
        method minus ``baseline`` within each relation;
        ``aie``: per (model, dataset, setting, module, token class, layer), the indirect
        effect on ``p(target_true)`` averaged over the traced facts, with its interval;
        ``aie_paired``: per layer, each edited setting minus the unedited model and minus
        ``baseline`` on the same facts (``baseline`` column), with intervals: the layers
        where a method leaves more (or less) of the old answer's flow;
        ``answers``, ``answers_paired``: part (d) (under generation) as ``intervals`` and
        ``paired`` are for (a) and (c); ``answers_returned``: among the facts whose
        answer to the plain prompt no longer begins with the old answer, how often the
        context brings it back, beside the copying control on the same facts;
        ``flow``: per fact, module and token class, the mean effect over layers (the
        windows overlap, so this is a smoothed summary of the curve, not a sum of
        separate contributions); its mean per setting with interval, the mean clean and
        corrupted ``p(target_true)`` beside it (an effect cannot exceed their gap), and
        each setting minus ``pre-edit`` and minus ``baseline`` on the same facts
        (``diff_pre``, ``diff_baseline`` with intervals).
    """
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    survival = rows[rows["part"] == "survival"]
    out: dict[str, pd.DataFrame] = {}
    if not survival.empty:
        check_unique(survival, ["model", "dataset", "setting", "batch", "position"])
        metrics = [m for m in SURVIVAL_METRICS if m in survival.columns and survival[m].notna().any()]
        out["intervals"] = tidy_intervals(survival, ["model", "dataset", "setting"], metrics)
        edited = survival[survival["setting"] != "pre-edit"]
        # one family per (model, dataset) for the old-answer metrics, one for the KnowEdit metrics
        out["paired"] = holm_within(pd.DataFrame(paired_against(edited, metrics, baseline, groups=["model", "dataset"],
                                                                on=["batch", "position"])),
                                    ["model", "dataset"], VERDICT_METRICS)
        gone = survival[survival["Old top-1/prompt"] == 0]
        out["restored"] = tidy_intervals(gone, ["model", "dataset", "setting"], ["Context old top-1"])
        split = by_relation(survival, dict(zip(survival["fact_key"], survival["relation"])),
                            [*metric_columns(survival, MAIN_METRICS), "Old top-1/prompt", "Context old top-1"],
                            baseline=baseline)
        out["relations"], out["relations_paired"] = split["intervals"], split["paired"]
    answered = rows[rows["part"] == "answers"]
    if not answered.empty:
        check_unique(answered, ["model", "dataset", "setting", "batch", "position"])
        metrics = [m for m in (*MAIN_METRICS, *ANSWER_METRICS) if m in answered.columns and answered[m].notna().any()]
        out["answers"] = tidy_intervals(answered, ["model", "dataset", "setting"], metrics)
        edited = answered[answered["setting"] != "pre-edit"]
        out["answers_paired"] = holm_within(pd.DataFrame(paired_against(edited, metrics, baseline,
                                                                        groups=["model", "dataset"],
                                                                        on=["batch", "position"])),
                                            ["model", "dataset"], VERDICT_METRICS)
        gone = answered[answered["Old answer/prompt"] == 0]
        out["answers_returned"] = tidy_intervals(gone, ["model", "dataset", "setting"],
                                                 ["Context old answer", "Control copy answer"])
    traced = rows[rows["part"] == "trace"]
    if not traced.empty:
        check_unique(traced, ["model", "dataset", "setting", "batch", "position", "module", "token_class"])
        long = _trace_long(traced)
        per_layer = tidy_intervals(long.rename(columns={"ie": "AIE"}),
                                   ["model", "dataset", "setting", "module", "token_class", "layer"], ["AIE"])
        out["aie"] = per_layer.drop(columns="metric")
        groups = ["model", "dataset", "module", "token_class", "layer"]
        against_pre = paired_against(long, ["ie"], "pre-edit", groups=groups, on=["batch", "position"])
        edited = long[long["setting"] != "pre-edit"]
        against_base = paired_against(edited, ["ie"], baseline, groups=groups, on=["batch", "position"])
        out["aie_paired"] = pd.DataFrame(against_pre + against_base).drop(columns="metric", errors="ignore")
        out["flow"] = _flow(long, baseline)
    return out


def _flow(long: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per (model, dataset, setting, module, token class): the mean over facts of each
    fact's mean effect across layers, with its interval, and the paired differences from
    the unedited model and from ``baseline`` on the same facts."""
    per_fact = (long.groupby(["model", "dataset", "setting", "module", "token_class", "batch", "position"],
                             sort=False).agg(ie=("ie", "mean"), p_clean=("p_clean", "first"),
                                             p_corrupted=("p_corrupted", "first")).reset_index())
    groups = ["model", "dataset", "module", "token_class"]
    table = tidy_intervals(per_fact.rename(columns={"ie": "mean AIE"}), [*groups[:2], "setting", *groups[2:]],
                           ["mean AIE"]).drop(columns="metric")
    probabilities = (per_fact.groupby([*groups[:2], "setting", *groups[2:]], sort=False)[["p_clean", "p_corrupted"]]
                     .mean().reset_index())
    table = table.merge(probabilities, on=[*groups[:2], "setting", *groups[2:]], how="left")
    extra = []
    for _, row in table.iterrows():
        entry = {}
        for column, reference in (("pre", "pre-edit"), ("baseline", baseline)):
            mine = _facts_of(per_fact, row, row["setting"])
            other = _facts_of(per_fact, row, reference)
            if row["setting"] == reference or mine.empty or other.empty:
                entry.update({f"diff_{column}": math.nan, f"diff_{column}_low": math.nan,
                              f"diff_{column}_high": math.nan})
                continue
            result = paired_difference(mine, other)
            entry.update({f"diff_{column}": result["diff"], f"diff_{column}_low": result["ci_low"],
                          f"diff_{column}_high": result["ci_high"]})
        extra.append(entry)
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def _facts_of(per_fact: pd.DataFrame, row, setting: str) -> pd.Series:
    part = per_fact[(per_fact["model"] == row["model"]) & (per_fact["dataset"] == row["dataset"])
                    & (per_fact["setting"] == setting) & (per_fact["module"] == row["module"])
                    & (per_fact["token_class"] == row["token_class"])]
    return part.set_index(["batch", "position"])["ie"]


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root`` (what ``intattn run`` writes as CSVs), each row
    labelled with its settings id, and the table of those ids (:func:`.settings.with_settings`)."""
    store = ResultStore(root, NAME)
    return with_settings(summarise(store), store)
