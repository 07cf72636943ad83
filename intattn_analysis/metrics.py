"""Evaluation of an edit: the KnowEdit metrics the paper reports, ROME's CounterFact metrics,
and the residue of the old answer.

``evaluate(model, facts)`` scores a model on a list of facts and returns an
:class:`Evaluation`: one row per fact (``per_fact``), the means under the names the papers
use (``summary``), how many facts each mean is over (``counts``), and the raw scores a later
call needs. The usual pattern is one call before an edit and one after::

    pre = evaluate(model, facts)               # baseline numbers, and the pre-edit state
    with edit(model, facts):
        post = evaluate(model, facts, pre=pre)  # pre-edit values are reused, not recomputed

Metric sets (the ``metrics`` argument):

``"knowedit"``, the paper's metrics, as KnowEdit / EasyEdit compute them
(Zhang et al. 2024, *A Comprehensive Study of Knowledge Editing for LLMs*; EasyEdit's
``compute_edit_quality`` and ``test_prediction_acc``). All of them are *teacher-forced token
accuracies*: the prompt and the answer's tokens are fed in one forward, and an answer token
counts as right when the model's argmax at the position before it is that token; a probe's
accuracy is the mean over its answer tokens.

* ``Edit Succ.``: accuracy of ``target_new`` after the filled edit prompt.
* ``Rephrase``: the same accuracy after each paraphrase, averaged over the paraphrases.
* ``Portability``: accuracy of each portability probe's answer after its prompt, averaged
  within each sub-type (``Probe.kind``; one column ``Portability/<kind>`` per sub-type) and
  then over the fact's sub-types (each sub-type weighs the same within a fact).
* ``Locality``: for each locality probe, the share of the model's teacher-forced argmax
  tokens over the probe's answer positions that are the same as before the edit (EasyEdit
  compares the pre- and post-edit predictions, not the ground truth); averaged per sub-type
  (``Locality/<kind>``) and then over sub-types, as for portability. Locality is a
  comparison with the pre-edit model, so an evaluation without ``pre`` gives NaN (not
  measured), never 1.0: pass ``pre`` to measure it (the unedited model against itself
  gives exactly 1.0).
* ``Fluency`` (its own metric set, ``"fluency"``, since generating costs far more than
  scoring): ROME's n-gram entropy (Meng et al. 2022, ``compute_n_gram_entropy``) of the
  filled edit prompt followed by its greedy continuation of ``fluency_tokens`` tokens:
  ``mean(2/3 * H_2, 4/3 * H_3)`` with ``H_n`` the entropy in bits of the text's word
  n-gram frequencies. ROME and EasyEdit score the generated text *with* its prompt, and so
  does this. Two differences from them, both documented in :func:`n_gram_entropy`: words
  are split by a regular expression rather than NLTK's tokenizer, and the continuation is
  greedy rather than top-k sampled, so that the number is deterministic.

``"counterfact"``, ROME's CounterFact metrics (``compute_rewrite_quality_counterfact`` and
``summarize.py`` of kmeng01/rome). Here the probability of an answer is ROME's: the mean
negative log-likelihood of all of its tokens, teacher-forced after the prompt, and
``p = exp(-mean NLL)`` where a probability is reported.

* ``Efficacy`` (ROME's *efficacy success*): 1 when the NLL of ``target_new`` after the edit
  prompt is below that of ``target_true``, else 0. ``Efficacy magnitude``:
  ``p(target_new) - p(target_true)``.
* ``Paraphrase``, ``Paraphrase magnitude``: the same on each paraphrase, averaged.
* ``Neighborhood``: on each neighborhood probe, 1 when its own answer (the unchanged true
  object) is more likely than ``target_new``; ``Neighborhood magnitude``:
  ``p(answer) - p(target_new)``; averaged over the probes.
* ``Score`` (summary only): the harmonic mean of the Efficacy, Paraphrase and Neighborhood
  means, as in ROME's tables.

Efficacy and Paraphrase need ``target_true`` and are NaN where a fact has none.

``"residue"``, the old knowledge an edit leaves behind: ``Residue p(true)`` is
``p(target_true)`` (the CounterFact probability above) after the edit prompt, and
``Residue old top-1`` is 1 when the model's greedy first token after the prompt is still the
first token of ``target_true``. Each comes as ``pre`` (before the edit) and ``post`` (after
it). An evaluation without ``pre`` describes the model as it is, as the baseline: its
``pre`` columns hold the current model's values and its ``post`` columns are NaN. With
``pre``, the ``pre`` columns are copied from it and the ``post`` columns measured.

Every metric a fact cannot have (no ``target_true``, no paraphrase, no portability probe
...) is NaN for that fact, never 0; the summary is a NaN-ignoring mean and ``counts`` says
over how many facts each mean is taken.

Answers are tokenized as they follow the prompt: ``" " + answer`` (the answer stripped), as
:func:`~intattn_analysis.predictions.first_answer_token` does, or the bare answer where
the prompt already ends with whitespace. Prompt and answer are tokenized apart and their
ids joined, so the answer's tokens are the same after every prompt.

Batching changes no number beyond float rounding: the (prompt, answer) pairs of all facts
and probes are deduplicated, sorted by token length and run through the bridge in
right-padded batches of ``batch_size`` rows, without an attention mask (causal attention
keeps every real token from seeing the pads after it), and only the answer positions are
unembedded; log-probabilities agree with unpadded forwards to 1e-5 (a test checks it).
Greedy generation batches prompts of the same token length only (left padding with a
mask moves logits by about 1e-4 on CPU and could flip a near-tie) and decodes with a
key-value cache: the prompt runs once, then one token per step.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .answers import GenerationSettings, answer_text, match_answer, normalize_answer, render_prompts, stopped
from .facts import Fact
from .loading import ModelHandle
from .model_access import FINAL_NORM_HOOK, cache_keyword

__all__ = [
    "GENERATION_METRICS",
    "METRICS",
    "PROTOCOLS",
    "AnswerScore",
    "Evaluation",
    "Evaluations",
    "answer_token_ids",
    "ask",
    "evaluate",
    "greedy_generations",
    "n_gram_entropy",
    "score_answers",
    "word_tokens",
]

#: The metric sets :func:`evaluate` knows, in the order their columns appear.
METRICS = ("knowedit", "counterfact", "residue", "fluency")
#: The evaluation protocols (:func:`evaluate`'s ``protocol``).
PROTOCOLS = ("teacher-forced", "generation", "both")
#: The metric sets with a generation form (the others are the same under both protocols).
GENERATION_METRICS = ("knowedit", "residue", "fluency")

# The columns of each metric set, in order (sub-type columns are added after their parent).
_COLUMNS = {
    # the prefix and F1 columns are the generation protocol's (its exact match is the headline)
    "knowedit": ["Edit Succ.", "Edit Succ. prefix", "Edit Succ. F1", "Rephrase", "Rephrase prefix", "Rephrase F1",
                 "Portability", "Portability prefix", "Portability F1", "Locality"],
    "counterfact": [
        "Efficacy", "Paraphrase", "Neighborhood",
        "Efficacy magnitude", "Paraphrase magnitude", "Neighborhood magnitude",
    ],
    "residue": [
        "Residue p(true) pre", "Residue p(true) post",
        "Residue old top-1 pre", "Residue old top-1 post",
    ],
    "fluency": ["Fluency"],
}


# --------------------------------------------------------------------------- n-grams
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks of ``text``, for n-gram statistics.

    A regular-expression stand-in for NLTK's ``word_tokenize`` (which ROME uses and which
    needs downloaded data): runs of word characters, with inner apostrophes kept
    (``"don't"`` is one word, where NLTK gives ``"do"``, ``"n't"``), and each other
    non-space character on its own.
    """
    return _WORD.findall(text)


def n_gram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency measure of one text: the mean over ``n`` of ``weight_n * H_n``.

    ``H_n`` is the entropy in bits of the frequency distribution of the text's word
    n-grams (:func:`word_tokens`); ROME's defaults are bi- and tri-grams with weights 2/3
    and 4/3 (``compute_n_gram_entropy`` in kmeng01/rome,
    ``experiments/py/eval_utils_counterfact.py``).
    A text with no n-gram of some length contributes 0 for it, as in ROME. Repetitive
    generations (the failure mode of a damaged model) have low entropy.
    """
    if len(ns) != len(weights):
        raise ValueError(f"ns and weights must have the same length, got {ns!r} and {weights!r}")
    tokens = word_tokens(text)
    weighted = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return float(np.mean(weighted))


# --------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class AnswerScore:
    """A teacher-forced answer after one prompt.

    ``answer_ids`` are the answer's tokens; ``predicted`` the model's argmax at the position
    before each of them (``predicted[0]`` is the greedy first token after the prompt);
    ``log_probs`` the log-probability of each answer token; ``first_rank`` how many tokens
    the model finds more likely than the answer's first token where it would come (0: it
    is the greedy choice; ties count for the answer; ``None`` where it was not measured).
    """

    answer_ids: tuple[int, ...]
    predicted: tuple[int, ...]
    log_probs: tuple[float, ...]
    first_rank: int | None = None

    @property
    def accuracy(self) -> float:
        """KnowEdit's token accuracy: the share of answer tokens that are the argmax."""
        return float(np.mean([p == a for p, a in zip(self.predicted, self.answer_ids)]))

    @property
    def nll(self) -> float:
        """ROME's mean negative log-likelihood per answer token."""
        return -float(np.mean(self.log_probs))

    @property
    def probability(self) -> float:
        """``exp(-nll)``: the geometric mean of the answer tokens' probabilities."""
        return math.exp(-self.nll)


def answer_token_ids(model: ModelHandle, context: str, answer: str) -> list[int]:
    """The tokens of ``answer`` as it follows ``context``.

    ``" " + answer.strip()``, unless ``context`` ends with whitespace, then the stripped
    answer; no special tokens. The first id is
    :func:`~intattn_analysis.predictions.first_answer_token` for a context that does not end
    with whitespace.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(
            f"an answer must be a non-empty string, got {answer!r} (after {context!r})"
        )
    text = answer.strip() if context[-1:].isspace() else " " + answer.strip()
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to no tokens")
    return [int(i) for i in ids]


def _same_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by length, each group cut into batches of at most ``batch_size``."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        groups[length].append(index)
    return [
        group[start : start + batch_size]
        for _, group in sorted(groups.items())
        for start in range(0, len(group), batch_size)
    ]


def _padded_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length and cut into batches of at most ``batch_size``, so that
    each batch pads its rows to a length close to theirs."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


@torch.no_grad()
def score_answers(
    model: ModelHandle,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    progress: bool = True,
    padded: bool = True,
) -> list[AnswerScore]:
    """Teacher-forced scores of ``(context, answer)`` pairs, one :class:`AnswerScore` each.

    Each pair is fed as the context's tokens (with the tokenizer's special tokens) followed
    by :func:`answer_token_ids`. Identical pairs are scored once.

    With ``padded`` (default) sequences are sorted by length and run ``batch_size`` at a
    time, right-padded without a mask: attention is causal, so no real token sees the
    pads that follow it, and only the answer positions are unembedded. Scores then differ
    from unpadded forwards only by float rounding (the tests hold log-probabilities to
    1e-5). ``padded=False`` batches only sequences of the same length (no padding at all,
    and many more forwards).
    """
    _check_batch_size(batch_size)
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    contexts = model.tokenize([context for context, _ in unique])
    answers = [answer_token_ids(model, context, answer) for context, answer in unique]
    sequences = [c + a for c, a in zip(contexts, answers)]
    lengths = [len(s) for s in sequences]
    batches = (_padded_batches if padded else _same_length_batches)(lengths, batch_size)
    cut = FINAL_NORM_HOOK in model.bridge.hook_dict
    pad = model.tokenizer.pad_token_id
    pad = int(pad if pad is not None else (model.tokenizer.eos_token_id or 0))
    scores: dict[tuple[str, str], AnswerScore] = {}
    for batch in tqdm(batches, desc="scoring answers", disable=not progress, leave=False):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : lengths[index]] = torch.tensor(sequences[index])
        # the positions whose logits predict each answer token, row after row
        entry_row = torch.tensor([row for row, i in enumerate(batch) for _ in answers[i]])
        entry_pos = torch.tensor([len(contexts[i]) - 1 + k for i in batch for k in range(len(answers[i]))])

        def keep_answers(y: torch.Tensor, hook=None) -> torch.Tensor:
            return y[entry_row.to(y.device), entry_pos.to(y.device)][None]

        if cut:
            with model.bridge.hooks(fwd_hooks=[(FINAL_NORM_HOOK, keep_answers)]):
                logits = model.bridge(ids.to(model.device))[0]
        else:
            logits = model.bridge(ids.to(model.device))[entry_row, entry_pos]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor([a for i in batch for a in answers[i]], device=log_probs.device)
        chosen = log_probs.gather(1, target[:, None])
        starts = torch.tensor([0] + [len(answers[i]) for i in batch[:-1]]).cumsum(0).to(log_probs.device)
        ranks = (log_probs[starts] > chosen[starts]).sum(-1).tolist()
        chosen = chosen[:, 0].tolist()
        predicted = log_probs.argmax(dim=-1).tolist()
        at = 0
        for row, index in enumerate(batch):
            n = len(answers[index])
            scores[unique[index]] = AnswerScore(
                answer_ids=tuple(answers[index]),
                predicted=tuple(int(t) for t in predicted[at : at + n]),
                log_probs=tuple(chosen[at : at + n]),
                first_rank=int(ranks[row]),
            )
            at += n
    return [scores[pair] for pair in pairs]


@torch.no_grad()
def greedy_generations(
    model: ModelHandle,
    texts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 128,
    progress: bool = True,
    kv_cache: bool = True,
    stop: Callable[[str], bool] | None = None,
) -> list[str]:
    """The greedy continuation of each text, the same as
    :func:`~intattn_analysis.known.greedy_continuation` gives one at a time.

    With ``kv_cache`` (default) prompts are sorted by length and decoded ``batch_size`` at
    a time, left-padded and masked: the prompts run once, and every later step runs only
    the new token of each row, reading the earlier keys and values from a Hugging Face
    ``DynamicCache`` that the bridge's attention extends. ``kv_cache=False`` decodes only
    prompts of the same length together, without padding, and runs the whole sequence
    at every step. The two give the same tokens (a test checks it, and all 100 of the
    benchmark's ZsRE generations agree); padding moves logits only by float rounding,
    which could flip an exact near-tie. The package decodes with its own loop rather than
    ``generate``, whose result on a bridge-wrapped model is not the model's greedy
    decoding.

    A row stops at the end-of-sequence token, which is then dropped from the decoded text
    with the other special tokens, and leaves the batch (and its keys and values the
    cache). ``stop``, if given, is asked after every step with each row's decoded text so
    far, and a row for which it says ``True`` stops there too (the generation protocol's
    natural end, :func:`intattn_analysis.answers.stopped`).
    """
    _check_batch_size(batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    texts = list(texts)
    if not texts:
        return []
    encoded = model.tokenize(texts)
    eos = model.tokenizer.eos_token_id
    ends = _Ends(model.tokenizer, eos, stop)
    generated: list[list[int]] = [[] for _ in texts]
    lengths = [len(e) for e in encoded]
    if kv_cache:
        batches = _padded_batches(lengths, batch_size)
    else:
        batches = _same_length_batches(lengths, batch_size)
    for batch in tqdm(batches, desc="generating", disable=not progress, leave=False):
        if kv_cache:
            tokens = _decode_cached(model, [encoded[i] for i in batch], max_new_tokens, ends)
        else:
            ids = torch.tensor([encoded[i] for i in batch], device=model.device)
            tokens = _decode_uncached(model, ids, max_new_tokens, ends)
        for index, row in zip(batch, tokens):
            generated[index] = row
    return [model.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in generated]


class _Ends:
    """When a row of a greedy decoding is finished: at the end-of-sequence token, or
    where ``stop`` says so of its decoded text."""

    def __init__(self, tokenizer, eos: int | None, stop: Callable[[str], bool] | None) -> None:
        self.tokenizer, self.eos, self.stop = tokenizer, eos, stop

    def done(self, tokens: list[int]) -> bool:
        if self.eos is not None and tokens[-1] == self.eos:
            return True
        return self.stop is not None and self.stop(self.tokenizer.decode(tokens, skip_special_tokens=True))


def _record(next_tokens: torch.Tensor, alive: list[int], out: list[list[int]], ends: _Ends) -> list[int]:
    """Append each row's token to its prompt's output (``alive[row]`` is the prompt of
    batch row ``row``) and return the rows that are not finished."""
    keep = []
    for row, (index, token) in enumerate(zip(alive, next_tokens.tolist())):
        out[index].append(int(token))
        if not ends.done(out[index]):
            keep.append(row)
    return keep


def _decode_uncached(model: ModelHandle, ids: torch.Tensor, steps: int, ends: _Ends) -> list[list[int]]:
    """Greedy tokens of each row, each step a forward over the whole sequence so far."""
    out: list[list[int]] = [[] for _ in range(len(ids))]
    alive = list(range(len(ids)))
    for _ in range(steps):
        next_tokens = model.bridge(ids)[:, -1].argmax(dim=-1)
        keep = _record(next_tokens, alive, out, ends)
        if not keep:
            break
        ids = torch.cat([ids, next_tokens[:, None]], dim=1)
        if len(keep) < len(alive):
            ids = ids[keep]
            alive = [alive[row] for row in keep]
    return out


def _decode_cached(model: ModelHandle, prompts: Sequence[Sequence[int]], steps: int, ends: _Ends) -> list[list[int]]:
    """Greedy tokens of each prompt: the prompts left-padded and masked in one forward,
    then one token per row per step, the earlier keys and values read from the cache."""
    from transformers import DynamicCache

    pad = model.tokenizer.pad_token_id
    pad = int(pad if pad is not None else (ends.eos if ends.eos is not None else 0))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    cache = DynamicCache(config=model.hf_model.config)
    out: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))  # the prompt of each row still in the batch
    step_ids = ids
    for _ in range(steps):
        kwargs = {"attention_mask": mask} if not bool(mask.all()) else {}
        logits = model.bridge(step_ids, **_cache_kwargs(model, cache), **kwargs)
        next_tokens = logits[:, -1].argmax(dim=-1)
        keep = _record(next_tokens, alive, out, ends)
        if not keep:
            break
        step_ids = next_tokens[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if len(keep) < len(alive):  # finished rows leave the batch and the cache
            rows = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(rows)
            step_ids, mask = step_ids[rows], mask[rows]
            alive = [alive[row] for row in keep]
    return out


def _cache_kwargs(model: ModelHandle, cache) -> dict:
    """The keyword arguments that hand ``cache`` to the Hugging Face model (``cache`` in
    recent versions, ``past_key_values`` before) and, as ``layer_past``, to the bridge's
    attention components, which read and extend it."""
    return {cache_keyword(model): cache, "layer_past": cache, "use_cache": True}


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# --------------------------------------------------------------------------- evaluation
def _fingerprint(fact: Fact) -> tuple:
    """What must be equal for a pre-edit evaluation to serve as ``pre`` for this fact."""
    return (fact.key, fact.locality)


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        per_fact: one row per fact, in the order given: ``case_id``, ``key``
            (``Fact.key``), ``subject``, one column per metric (NaN where the fact lacks
            what the metric needs), and the raw values behind them (``p_new`` and
            ``p_true``, the CounterFact probabilities after the edit prompt;
            ``old_top1``; ``generation``, the greedy continuation used for fluency).
        summary: the mean of each metric column over the facts that have it, plus
            ``Score``; named by the model.
        counts: over how many facts each summary value is taken.
        answers: one row per scored (fact, probe) pair: ``fact`` (position in the fact
            list), ``role`` (``edit``, ``rephrase``, ``portability``, ``locality``,
            ``neighborhood``, with ``/true`` or ``/new`` for CounterFact's two answers),
            ``kind``, ``prompt``, ``answer``, ``accuracy``, ``nll``, ``predicted``.
        model: the model's ``cache_id``.
        metrics: the metric sets computed.
        with_pre: whether a pre-edit evaluation was given.
        fingerprints: per fact, its key and locality probes; ``pre`` must match them.
        locality_predictions: per fact, per locality probe, what a later evaluation
            compares with: the model's teacher-forced argmax tokens, or under the
            generation protocol its normalised answer.
        protocol: ``"teacher-forced"`` or ``"generation"``.
    """

    per_fact: pd.DataFrame
    summary: pd.Series
    counts: pd.Series
    answers: pd.DataFrame
    model: str
    metrics: tuple[str, ...]
    with_pre: bool
    fingerprints: list[tuple] = field(repr=False)
    locality_predictions: list[list] | None = field(repr=False, default=None)
    protocol: str = "teacher-forced"

    def table(self) -> pd.DataFrame:
        """The summary with its counts, one row per metric."""
        return pd.DataFrame({"mean": self.summary, "n": self.counts})

    def select(self, positions: Sequence[int]) -> "Evaluation":
        """The evaluation of the facts at ``positions`` only, in that order: what
        :func:`evaluate` returns for that sub-list, and what serves as ``pre`` when those
        facts are evaluated on their own (the summary is taken over them)."""
        positions = [int(i) for i in positions]
        n = len(self.fingerprints)
        bad = [i for i in positions if not 0 <= i < n]
        if not positions or bad:
            raise ValueError(f"positions must be a non-empty list of fact positions in 0..{n - 1}, "
                             f"got {positions if not bad else bad}")
        per_fact = self.per_fact.iloc[positions].reset_index(drop=True)
        renumber = {old: new for new, old in enumerate(positions)}
        answers = self.answers[self.answers["fact"].isin(renumber)].copy()
        answers["fact"] = answers["fact"].map(renumber)
        answers = answers.sort_values("fact", kind="stable").reset_index(drop=True)
        summary, counts = _summary(per_fact, self.metrics, self.model)
        return Evaluation(
            per_fact=per_fact, summary=summary, counts=counts, answers=answers, model=self.model,
            metrics=self.metrics, with_pre=self.with_pre,
            fingerprints=[self.fingerprints[i] for i in positions],
            locality_predictions=(None if self.locality_predictions is None
                                  else [self.locality_predictions[i] for i in positions]),
            protocol=self.protocol,
        )

    def __repr__(self) -> str:
        return (
            f"Evaluation(model={self.model!r}, facts={len(self.per_fact)}, "
            f"with_pre={self.with_pre}, protocol={self.protocol!r})\n{self.table().to_string()}"
        )


class Evaluations(Mapping):
    """The result of :func:`evaluate` with ``protocol="both"``: ``{protocol: Evaluation}``
    for ``"teacher-forced"`` and ``"generation"``, measured on the same model state.

    ``per_fact`` and ``table()`` put the two side by side: ``per_fact`` is the two
    protocols' rows one after the other, with a ``protocol`` column first; ``table()``
    has one row per metric and a ``mean`` and ``n`` column per protocol.
    """

    protocol = "both"

    def __init__(self, parts: Mapping[str, Evaluation]) -> None:
        self.parts = dict(parts)

    def __getitem__(self, protocol: str) -> Evaluation:
        if protocol not in self.parts:
            raise KeyError(f"no {protocol!r} evaluation here; the protocols are {list(self.parts)}")
        return self.parts[protocol]

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def model(self) -> str:
        return next(iter(self.parts.values())).model

    @property
    def per_fact(self) -> pd.DataFrame:
        return pd.concat([e.per_fact.assign(protocol=p)[["protocol", *e.per_fact.columns]]
                          for p, e in self.parts.items()], ignore_index=True)

    def table(self) -> pd.DataFrame:
        """Each metric's mean and count under each protocol (NaN where a protocol has no
        such metric)."""
        return pd.concat({p: e.table() for p, e in self.parts.items()}, axis=1)

    def select(self, positions: Sequence[int]) -> "Evaluations":
        """Both protocols' evaluations of the facts at ``positions`` (:meth:`Evaluation.select`)."""
        return Evaluations({p: e.select(positions) for p, e in self.parts.items()})

    def __repr__(self) -> str:
        return f"Evaluations(model={self.model!r}, protocols={list(self.parts)})\n{self.table().to_string()}"


def _metric_names(metrics: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError(f"metrics is empty; choose from {list(METRICS)}")
    for name in metrics:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; the metric sets are {list(METRICS)}")
    return tuple(name for name in METRICS if name in metrics)


def _check_facts(facts: Sequence[Fact]) -> list[Fact]:
    if isinstance(facts, Fact):
        raise TypeError(
            "facts must be a list of Fact records, got a single Fact; wrap it in a list"
        )
    facts = list(facts)
    if not facts:
        raise ValueError("facts is empty; evaluate needs at least one Fact")
    for i, fact in enumerate(facts):
        if not isinstance(fact, Fact):
            raise TypeError(f"facts[{i}] must be a Fact, got {type(fact).__name__}")
        if not isinstance(fact.target_new, str) or not fact.target_new.strip():
            raise ValueError(
                f"facts[{i}].target_new must be a non-empty string, got {fact.target_new!r}"
            )
    return facts


def _check_pre(pre: Evaluation, facts: list[Fact], metrics: tuple[str, ...],
               protocol: str = "teacher-forced") -> None:
    if not isinstance(pre, Evaluation):
        raise TypeError(
            f"pre must be an Evaluation returned by evaluate(), got {type(pre).__name__}"
        )
    if pre.protocol != protocol:
        raise ValueError(
            f"pre was computed under protocol={pre.protocol!r}, but this evaluation is {protocol!r}; "
            f"compute pre with protocol={protocol!r} or 'both'"
        )
    if len(pre.fingerprints) != len(facts):
        raise ValueError(
            f"pre was computed on {len(pre.fingerprints)} facts, but {len(facts)} are given; "
            "pass the same facts, in the same order, as for the pre-edit evaluation"
        )
    for i, (before, fact) in enumerate(zip(pre.fingerprints, facts)):
        if before != _fingerprint(fact):
            raise ValueError(
                f"pre was computed on different facts: facts[{i}] ({fact}) is not the fact "
                "at that position in pre; pass the same facts, in the same order"
            )
    needs = {"knowedit": "locality", "residue": "residue"}
    for name, what in needs.items():
        if name in metrics and name not in pre.metrics:
            raise ValueError(
                f"metrics include {name!r}, whose {what} values compare with the pre-edit "
                f"model, but pre was computed with metrics={list(pre.metrics)}; compute pre "
                f"with {name!r} included"
            )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def _by_kind(values: Sequence[tuple[str, float]]) -> tuple[float, dict[str, float]]:
    """Overall mean (of the per-kind means) and the per-kind means of ``(kind, value)``."""
    groups: dict[str, list[float]] = defaultdict(list)
    for kind, value in values:
        groups[kind].append(value)
    per_kind = {kind: _mean(v) for kind, v in groups.items()}
    return _mean(per_kind.values()), {k: v for k, v in per_kind.items() if k}


def _harmonic_mean(values: Sequence[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def evaluate(
    model: ModelHandle,
    facts: Sequence[Fact],
    *,
    pre: "Evaluation | Evaluations | None" = None,
    metrics: Sequence[str] | str = METRICS,
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
    fluency_tokens: int = 50,
    batch_size: int = 32,
    generation_batch_size: int = 128,
    progress: bool = True,
) -> "Evaluation | Evaluations":
    """Score ``model`` on ``facts`` with the metric sets in ``metrics`` (see the module docstring).

    ``protocol`` says how an answer is judged:

    * ``"teacher-forced"`` (default): the KnowEdit metrics as the papers compute them.
    * ``"generation"``: the model answers each probe by greedy decoding to a natural stop
      (:mod:`intattn_analysis.answers`, with ``generation``'s prompt form and cap), and
      the answer is scored against the target and its aliases: ``Edit Succ.``,
      ``Rephrase`` and ``Portability`` hold the normalised exact match, and ``... prefix``
      and ``... F1`` columns whether the answer begins with the target and its token F1.
      ``Locality`` is the share of locality probes whose normalised answer is the
      unedited model's. ``Residue old top-1`` is whether the answer to the edit prompt
      begins with ``target_true``; ``Residue p(true)`` is not measured (a probability has
      no generation form). ``answer`` holds the answer to the edit prompt, and
      ``answers`` (per fact, per role) every answer; :attr:`Evaluation.answers` has one
      row per probe with its generated text and scores. ``"counterfact"`` compares
      probabilities and is refused here.
    * ``"both"``: an :class:`Evaluations` with both, from one model state. The metric sets
      without a generation form (``counterfact``) and those the same under both
      (``fluency``) are computed in the teacher-forced part only.

    ``pre`` is the evaluation of the same facts, in the same order, before the edit, under
    the same protocol (an :class:`Evaluations` serves either): its pre-edit locality
    predictions and residue values are reused (nothing of the pre-edit model is
    recomputed), and a ``pre`` computed on other facts, under another protocol, or without
    a metric set that needs it, raises ``ValueError``. ``fluency_tokens`` is the length of
    the greedy generations scored for fluency. All teacher-forced scoring is one
    deduplicated pass in padded batches of ``batch_size`` sequences
    (:func:`score_answers`), and generation decodes ``generation_batch_size`` prompts at a
    time (:func:`greedy_generations`; most rows of a question-answering benchmark end
    after a few tokens and leave the batch, so large batches cost little); results depend
    on either only through float rounding.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if generation is not None and not isinstance(generation, GenerationSettings):
        raise TypeError(f"generation must be a GenerationSettings, got {type(generation).__name__}")
    generation = generation or GenerationSettings()
    options = dict(fluency_tokens=fluency_tokens, batch_size=batch_size,
                   generation_batch_size=generation_batch_size, progress=progress)
    if protocol == "both":
        names = _metric_names(metrics)
        generated = tuple(m for m in names if m in GENERATION_METRICS and m != "fluency")
        parts = {"teacher-forced": evaluate(model, facts, pre=_protocol_part(pre, "teacher-forced"), metrics=names,
                                            **options)}
        if generated:
            parts["generation"] = evaluate(model, facts, pre=_protocol_part(pre, "generation"), metrics=generated,
                                           protocol="generation", generation=generation, **options)
        return Evaluations(parts)
    pre = _protocol_part(pre, protocol)
    facts, metrics = _check_evaluate_args(
        facts, metrics, pre, fluency_tokens, batch_size, generation_batch_size, protocol
    )
    if protocol == "generation":
        return _evaluate_generation(model, facts, pre, metrics, generation, **options)
    requests = _score_requests(facts, metrics)
    scored = score_answers(
        model, [(request.prompt, request.answer) for request in requests],
        batch_size=batch_size, progress=progress,
    )
    generations = None
    if "fluency" in metrics:
        generations = greedy_generations(
            model, [f.text for f in facts], fluency_tokens, batch_size=generation_batch_size,
            progress=progress,
        )
    by_fact = _scores_by_fact(requests, scored, len(facts))
    rows = []
    locality_predictions = [] if "knowedit" in metrics else None
    for i, fact in enumerate(facts):
        row, predictions = _fact_row(fact, by_fact[i], metrics, pre, i, generations)
        rows.append(row)
        if locality_predictions is not None:
            locality_predictions.append(predictions)
    per_fact = _per_fact_table(rows, metrics)
    summary, counts = _summary(per_fact, metrics, model.cache_id)
    return Evaluation(
        per_fact=per_fact,
        summary=summary,
        counts=counts,
        answers=_answers_table(requests, scored),
        model=model.cache_id,
        metrics=metrics,
        with_pre=pre is not None,
        fingerprints=[_fingerprint(f) for f in facts],
        locality_predictions=locality_predictions,
    )


def _protocol_part(pre, protocol: str):
    """The part of ``pre`` for ``protocol`` (``pre`` itself where it is one evaluation)."""
    if isinstance(pre, Evaluations):
        if protocol not in pre:
            raise ValueError(f"pre holds no {protocol!r} evaluation (it holds {list(pre)}); compute pre with "
                             f"protocol={protocol!r} or 'both'")
        return pre[protocol]
    return pre


def _check_evaluate_args(
    facts: Sequence[Fact],
    metrics: Sequence[str] | str,
    pre: Evaluation | None,
    fluency_tokens: int,
    batch_size: int,
    generation_batch_size: int,
    protocol: str = "teacher-forced",
) -> tuple[list[Fact], tuple[str, ...]]:
    """The facts as a list and the metric sets in their canonical order, after every
    argument of :func:`evaluate` has been checked (before any forward)."""
    facts = _check_facts(facts)
    metrics = _metric_names(metrics)
    if protocol == "generation" and "counterfact" in metrics:
        raise ValueError("metrics include 'counterfact', which compares answer probabilities and has no "
                         "generation form; leave it out, or use protocol='teacher-forced' or 'both'")
    _check_batch_size(batch_size)
    _check_batch_size(generation_batch_size)
    if "fluency" in metrics and (
        isinstance(fluency_tokens, bool)
        or not isinstance(fluency_tokens, int)
        or fluency_tokens < 1
    ):
        raise ValueError(f"fluency_tokens must be a positive integer, got {fluency_tokens!r}")
    if pre is not None:
        _check_pre(pre, facts, metrics, protocol)
    return facts, metrics


@dataclass(frozen=True)
class _Request:
    """One (prompt, answer) pair to score for a fact: ``role`` says what the score
    measures (``edit``, ``rephrase``, ``portability``, ``locality``, ``edit/true``,
    ``rephrase/true``, ``neighborhood/true``, ``neighborhood/new``) and ``kind`` is the
    probe's sub-type (empty for the fact's own prompts)."""

    fact: int
    role: str
    kind: str
    prompt: str
    answer: str


def _score_requests(facts: list[Fact], metrics: tuple[str, ...]) -> list[_Request]:
    """Every (prompt, answer) pair the metric sets need, fact after fact."""
    knowedit = "knowedit" in metrics
    counterfact = "counterfact" in metrics
    residue = "residue" in metrics
    requests: list[_Request] = []
    for i, fact in enumerate(facts):
        new, true = fact.target_new, fact.target_true
        paraphrases = fact.paraphrase_texts
        if knowedit or counterfact:
            requests.append(_Request(i, "edit", "", fact.text, new))
        if knowedit:
            requests += [_Request(i, "rephrase", "", text, new) for text in paraphrases]
            requests += [_Request(i, "portability", p.kind, p.prompt, p.answer) for p in fact.portability]
            requests += [_Request(i, "locality", p.kind, p.prompt, p.answer) for p in fact.locality]
        if (counterfact or residue) and true is not None:
            requests.append(_Request(i, "edit/true", "", fact.text, true))
        if counterfact:
            if true is not None:
                requests += [_Request(i, "rephrase/true", "", text, true) for text in paraphrases]
                requests += [_Request(i, "rephrase", "", text, new) for text in paraphrases if not knowedit]
            for p in fact.neighborhood:
                requests.append(_Request(i, "neighborhood/true", p.kind, p.prompt, p.answer))
                requests.append(_Request(i, "neighborhood/new", p.kind, p.prompt, new))
    return requests


def _answers_table(requests: list[_Request], scored: list[AnswerScore]) -> pd.DataFrame:
    """:attr:`Evaluation.answers`: one row per scored request."""
    return pd.DataFrame(
        [
            dict(fact=r.fact, role=r.role, kind=r.kind, prompt=r.prompt, answer=r.answer,
                 accuracy=s.accuracy, nll=s.nll, predicted=s.predicted)
            for r, s in zip(requests, scored)
        ],
        columns=["fact", "role", "kind", "prompt", "answer", "accuracy", "nll", "predicted"],
    )


class _FactScores:
    """The scored answers of one fact by role, each role's ``(kind, prompt, score)``
    entries in the order they were requested; a role the fact has no request for has no
    entries."""

    def __init__(self) -> None:
        self.by_role: dict[str, list[tuple[str, str, AnswerScore]]] = defaultdict(list)

    def __getitem__(self, role: str) -> list[tuple[str, str, AnswerScore]]:
        return self.by_role.get(role, [])

    def first(self, role: str) -> AnswerScore | None:
        """The score of the role's first request, or ``None`` where it has none."""
        entries = self[role]
        return entries[0][2] if entries else None


def _scores_by_fact(requests: list[_Request], scored: list[AnswerScore], n_facts: int) -> list[_FactScores]:
    """The scores sorted back to their facts, one :class:`_FactScores` per fact."""
    by_fact = [_FactScores() for _ in range(n_facts)]
    for request, score in zip(requests, scored):
        by_fact[request.fact].by_role[request.role].append((request.kind, request.prompt, score))
    return by_fact


def _fact_row(
    fact: Fact,
    scores: _FactScores,
    metrics: tuple[str, ...],
    pre: Evaluation | None,
    position: int,
    generations: list[str] | None,
) -> tuple[dict, list[tuple[int, ...]] | None]:
    """One fact's row of :attr:`Evaluation.per_fact` (its metric columns and the raw
    values behind them) and its locality predictions (``None`` without ``knowedit``).
    ``position`` is the fact's place in the list, where ``pre`` holds its pre-edit
    values."""
    row: dict = {"case_id": fact.case_id, "key": fact.key, "subject": fact.subject}
    edit_new = scores.first("edit") if ("knowedit" in metrics or "counterfact" in metrics) else None
    edit_true = scores.first("edit/true")
    predictions = None
    if "knowedit" in metrics:
        before = pre.locality_predictions[position] if pre is not None else None
        columns, predictions = _knowedit_columns(edit_new, scores, before)
        row.update(columns)
    if "fluency" in metrics:
        row["Fluency"] = n_gram_entropy(fact.text + generations[position])
    if "counterfact" in metrics:
        row.update(_counterfact_columns(edit_new, edit_true, scores))
    if "residue" in metrics:
        row.update(_residue_columns(edit_true, pre.per_fact.iloc[position] if pre is not None else None))
    if "counterfact" in metrics or "residue" in metrics:
        row["p_true"], row["old_top1"] = _old_answer(edit_true)
    if edit_new is not None:
        row["p_new"] = edit_new.probability
    if "fluency" in metrics:
        row["generation"] = generations[position]
    return row, predictions


def _knowedit_columns(
    edit_new: AnswerScore, scores: _FactScores, before: list[tuple[int, ...]] | None
) -> tuple[dict, list[tuple[int, ...]]]:
    """KnowEdit's columns of one fact and its locality predictions. ``before`` holds the
    pre-edit locality predictions; without them locality is not measured (NaN)."""
    columns: dict = {
        "Edit Succ.": edit_new.accuracy,
        "Rephrase": _mean(s.accuracy for _, _, s in scores["rephrase"]),
    }
    overall, per_kind = _by_kind([(k, s.accuracy) for k, _, s in scores["portability"]])
    columns["Portability"] = overall
    columns.update({f"Portability/{k}": v for k, v in per_kind.items()})
    predictions = [s.predicted for _, _, s in scores["locality"]]
    if before is not None:
        overall, per_kind = _by_kind([
            (kind, float(np.mean(np.equal(after, old))))
            for (kind, _, _), after, old in zip(scores["locality"], predictions, before)
        ])
    else:
        overall, per_kind = math.nan, {}
    columns["Locality"] = overall
    columns.update({f"Locality/{k}": v for k, v in per_kind.items()})
    return columns, predictions


def _counterfact_columns(
    edit_new: AnswerScore, edit_true: AnswerScore | None, scores: _FactScores
) -> dict:
    """CounterFact's columns of one fact (Efficacy and Paraphrase NaN without
    ``target_true``)."""
    columns: dict = {}
    if edit_true is not None:
        columns["Efficacy"] = float(edit_new.nll < edit_true.nll)
        columns["Efficacy magnitude"] = edit_new.probability - edit_true.probability
        pairs = list(zip(scores["rephrase"], scores["rephrase/true"]))
        columns["Paraphrase"] = _mean(float(n.nll < t.nll) for (_, _, n), (_, _, t) in pairs)
        columns["Paraphrase magnitude"] = _mean(
            n.probability - t.probability for (_, _, n), (_, _, t) in pairs
        )
    else:
        columns.update({"Efficacy": math.nan, "Efficacy magnitude": math.nan,
                        "Paraphrase": math.nan, "Paraphrase magnitude": math.nan})
    pairs = list(zip(scores["neighborhood/true"], scores["neighborhood/new"]))
    columns["Neighborhood"] = _mean(float(t.nll < n.nll) for (_, _, t), (_, _, n) in pairs)
    columns["Neighborhood magnitude"] = _mean(
        t.probability - n.probability for (_, _, t), (_, _, n) in pairs
    )
    return columns


def _old_answer(edit_true: AnswerScore | None) -> tuple[float, float]:
    """``p(target_true)`` after the edit prompt and whether the greedy first token is
    still ``target_true``'s first (1.0 or 0.0); NaN for both without ``target_true``."""
    if edit_true is None:
        return math.nan, math.nan
    return edit_true.probability, float(edit_true.predicted[0] == edit_true.answer_ids[0])


def _residue_columns(edit_true: AnswerScore | None, before: pd.Series | None) -> dict:
    """The residue columns of one fact. Without ``before`` (the fact's pre-edit row) the
    current model is the baseline: its values fill the ``pre`` columns and ``post`` is
    NaN; with it, ``pre`` is copied from it and ``post`` is the current model's."""
    p_true, old_top1 = _old_answer(edit_true)
    if before is None:
        return {"Residue p(true) pre": p_true, "Residue p(true) post": math.nan,
                "Residue old top-1 pre": old_top1, "Residue old top-1 post": math.nan}
    return {"Residue p(true) pre": before["p_true"], "Residue p(true) post": p_true,
            "Residue old top-1 pre": before["old_top1"], "Residue old top-1 post": old_top1}


# --------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class _Question:
    """One probe the generation protocol asks: as :class:`_Request`, with the answer's
    aliases."""

    fact: int
    role: str
    kind: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()


def _generation_questions(facts: list[Fact], metrics: tuple[str, ...]) -> list[_Question]:
    """Every probe the generation protocol asks for the metric sets, fact after fact
    (``edit/true`` reuses the edit prompt's answer, scored against ``target_true``)."""
    questions: list[_Question] = []
    for i, fact in enumerate(facts):
        if "knowedit" in metrics:
            questions.append(_Question(i, "edit", "", fact.text, fact.target_new))
            questions += [_Question(i, "rephrase", "", text, fact.target_new) for text in fact.paraphrase_texts]
            questions += [_Question(i, "portability", p.kind, p.prompt, p.answer, p.aliases)
                          for p in fact.portability]
            questions += [_Question(i, "locality", p.kind, p.prompt, p.answer, p.aliases) for p in fact.locality]
        if "residue" in metrics and fact.target_true is not None:
            questions.append(_Question(i, "edit/true", "", fact.text, fact.target_true))
    return questions


def ask(model: ModelHandle, prompts: Sequence[str], generation: GenerationSettings | None = None, *,
        batch_size: int = 128, progress: bool = True) -> list[str]:
    """The generation protocol's raw continuation of each prompt (greedy, in
    ``generation``'s prompt form, decoded until the natural stop or the cap; each distinct
    prompt once); :func:`intattn_analysis.answers.answer_text` cuts the answer from it."""
    generation = generation or GenerationSettings()
    prompts = list(prompts)
    unique = list(dict.fromkeys(prompts))
    if not unique:
        return []
    continuations = greedy_generations(
        model, render_prompts(model.tokenizer, unique, generation.prompt_form), generation.max_new_tokens,
        batch_size=batch_size, progress=progress, stop=stopped,
    )
    by_prompt = dict(zip(unique, continuations))
    return [by_prompt[p] for p in prompts]


def _evaluate_generation(model: ModelHandle, facts: list[Fact], pre: Evaluation | None, metrics: tuple[str, ...],
                         settings: GenerationSettings, *, fluency_tokens: int, batch_size: int,
                         generation_batch_size: int, progress: bool) -> Evaluation:
    """:func:`evaluate` under the generation protocol: each distinct prompt answered once."""
    questions = _generation_questions(facts, metrics)
    prompts = list(dict.fromkeys(q.prompt for q in questions))
    generated = dict(zip(prompts, ask(model, prompts, settings, batch_size=generation_batch_size, progress=progress)))
    fluency = greedy_generations(model, [f.text for f in facts], fluency_tokens, batch_size=generation_batch_size,
                                 progress=progress) if "fluency" in metrics else None
    by_fact: list[dict[str, list]] = [defaultdict(list) for _ in facts]
    table = []
    for q in questions:
        text = answer_text(generated[q.prompt])
        match = match_answer(text, (q.answer, *q.aliases))
        by_fact[q.fact][q.role].append((q.kind, text, match))
        table.append(dict(fact=q.fact, role=q.role, kind=q.kind, prompt=q.prompt, answer=q.answer,
                          aliases=list(q.aliases), generated=generated[q.prompt], answer_text=text,
                          exact=match.exact, prefix=match.prefix, f1=match.f1))
    rows, locality = [], ([] if "knowedit" in metrics else None)
    for i, fact in enumerate(facts):
        roles = by_fact[i]
        row: dict = {"case_id": fact.case_id, "key": fact.key, "subject": fact.subject}
        if "knowedit" in metrics:
            columns, answers = _generation_knowedit(roles, pre.locality_predictions[i] if pre is not None else None)
            row.update(columns)
            locality.append(answers)
        if fluency is not None:
            row["Fluency"] = n_gram_entropy(fact.text + fluency[i])
        if "residue" in metrics:
            row.update(_generation_residue(roles, pre.per_fact.iloc[i] if pre is not None else None))
        if roles.get("edit") or roles.get("edit/true"):
            row["answer"] = (roles.get("edit") or roles.get("edit/true"))[0][1]
        row["answers"] = {role: [text for _, text, _ in entries] for role, entries in roles.items()
                          if role != "edit/true"}
        if fluency is not None:
            row["generation"] = fluency[i]
        rows.append(row)
    per_fact = _per_fact_table(rows, metrics)
    summary, counts = _summary(per_fact, metrics, model.cache_id)
    return Evaluation(
        per_fact=per_fact, summary=summary, counts=counts,
        answers=pd.DataFrame(table, columns=["fact", "role", "kind", "prompt", "answer", "aliases", "generated",
                                             "answer_text", "exact", "prefix", "f1"]),
        model=model.cache_id, metrics=metrics, with_pre=pre is not None,
        fingerprints=[_fingerprint(f) for f in facts], locality_predictions=locality, protocol="generation",
    )


def _generation_knowedit(roles: Mapping[str, list], before: list[str] | None) -> tuple[dict, list[str]]:
    """KnowEdit's columns of one fact under generation, and its normalised locality
    answers. ``before`` holds the unedited model's; without them locality is NaN."""
    columns: dict = {}
    for name, role in (("Edit Succ.", "edit"), ("Rephrase", "rephrase")):
        entries = roles.get(role, [])
        columns[name] = _mean(m.exact for _, _, m in entries)
        columns[f"{name} prefix"] = _mean(m.prefix for _, _, m in entries)
        columns[f"{name} F1"] = _mean(m.f1 for _, _, m in entries)
    portability = roles.get("portability", [])
    overall, per_kind = _by_kind([(k, m.exact) for k, _, m in portability])
    columns["Portability"] = overall
    columns.update({f"Portability/{k}": v for k, v in per_kind.items()})
    columns["Portability prefix"] = _by_kind([(k, m.prefix) for k, _, m in portability])[0]
    columns["Portability F1"] = _by_kind([(k, m.f1) for k, _, m in portability])[0]
    answers = [normalize_answer(text) for _, text, _ in roles.get("locality", [])]
    if before is not None:
        overall, per_kind = _by_kind([(kind, float(now == old))
                                      for (kind, _, _), now, old in zip(roles.get("locality", []), answers, before)])
    else:
        overall, per_kind = math.nan, {}
    columns["Locality"] = overall
    columns.update({f"Locality/{k}": v for k, v in per_kind.items()})
    return columns, answers


def _generation_residue(roles: Mapping[str, list], before: pd.Series | None) -> dict:
    """The residue columns of one fact under generation: whether the answer to the edit
    prompt begins with ``target_true`` (NaN without one), before and after, as
    :func:`_residue_columns` has them; ``old_top1`` is the current model's value."""
    entries = roles.get("edit/true", [])
    old = entries[0][2].prefix if entries else math.nan
    if before is None:
        return {"Residue old top-1 pre": old, "Residue old top-1 post": math.nan, "old_top1": old}
    return {"Residue old top-1 pre": before["old_top1"], "Residue old top-1 post": old, "old_top1": old}


def _per_fact_table(rows: list[dict], metrics: tuple[str, ...]) -> pd.DataFrame:
    """The fact rows as :attr:`Evaluation.per_fact`: identity columns, metric columns in
    the papers' order, then the raw values."""
    per_fact = pd.DataFrame(rows)
    metric_columns = _ordered_metric_columns(per_fact.columns, metrics)
    return per_fact[
        ["case_id", "key", "subject", *metric_columns,
         *[c for c in ("p_new", "p_true", "old_top1", "answer", "answers", "generation") if c in per_fact.columns]]
    ]


def _summary(per_fact: pd.DataFrame, metrics: tuple[str, ...], name: str) -> tuple[pd.Series, pd.Series]:
    """Each metric column's mean over the facts that have it (plus CounterFact's
    ``Score``), and over how many facts it is taken."""
    values = per_fact[_ordered_metric_columns(per_fact.columns, metrics)].astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
        summary = values.apply(lambda column: np.nanmean(column.to_numpy()))
    counts = values.notna().sum()
    if "counterfact" in metrics:
        summary["Score"] = _harmonic_mean(
            [summary["Efficacy"], summary["Paraphrase"], summary["Neighborhood"]]
        )
        counts["Score"] = int(min(counts["Efficacy"], counts["Paraphrase"], counts["Neighborhood"]))
    summary.name = counts.name = name
    return summary, counts.astype(int)


def _ordered_metric_columns(columns: Iterable[str], metrics: tuple[str, ...]) -> list[str]:
    """Metric columns in the papers' order, each sub-type column after its parent."""
    present = set(columns)
    ordered = []
    for name in metrics:
        for column in _COLUMNS[name]:
            if column in present:
                ordered.append(column)
                ordered += sorted(c for c in present if c.startswith(column + "/"))
    return ordered
