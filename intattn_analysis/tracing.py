"""Causal tracing: how much of a fact's recall flows through each layer's attention and MLP.

This is ROME's causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT"), run through the TransformerLens bridge. For each fact the model answers
correctly three kinds of forward pass are compared:

* the *clean* run on the prompt, which records every hidden state;
* the *corrupted* run, where Gaussian noise is added to the subject tokens' embeddings
  (the output of ``hook_embed``), so the model can no longer tell which subject it is
  reading. ``samples`` noise draws are made per fact, seeded from ``seed`` and the fact's
  key, and run as one batch;
* the *restored* run: the corrupted run, except that one state is put back to its clean
  value. A state is a site ``(kind, token, layer)``: kind ``"resid"`` restores the
  residual stream entering block ``layer`` (``blocks.{l}.hook_resid_pre``) at that token;
  kinds ``"attn"`` and ``"mlp"`` restore the attention or MLP output
  (``hook_attn_out`` / ``hook_mlp_out``) at that token in a window of ``window`` layers
  around ``layer``, with ROME's convention ``max(0, l - w//2) <= j < min(L, l - (-w//2))``.

The indirect effect of a site is ``IE = p(answer | restored) - p(answer | corrupted)``,
averaged over the noise draws, where the answer is the first token of ``target_true``. The
average indirect effect (AIE) averages IEs over facts per token class and layer;
:meth:`TraceResult.contributions` gives the attention and MLP curves at one token class,
and :func:`balance` turns them into the IntAttn-Edit balance factor alpha.

The *severed* variant (``severed="mlp"`` or ``"attn"``, ROME's frozen-MLP experiment)
restores the residual stream at ``(t, l)`` while the MLP (or attention) outputs of layers
``l`` and above at token ``t`` are held at their corrupted values, so the restored state
cannot act through that module at that token. The gap between the plain and severed curves
is the share of the effect that goes through the module.

Noise. ``noise=3.0`` means 3 x the standard deviation of all entries of the input
embeddings, measured after any scaling the embedding applies (Gemma multiplies by
sqrt(d_model)); ROME measured the std over its dataset's subject tokens instead.
``Noise(0.1, relative=False)`` fixes an absolute std.

Token classes. Tokens are labelled ``subject_first``, ``subject_middle``,
``subject_last`` (a one-token subject is ``subject_last``), ``further`` (between the
subject and the last token) and ``last`` (the prompt's last token; a subject that ends
the prompt keeps ``subject_last``). Tokens *before* the subject, the BOS token included,
are not traced: the noise touches only subject positions and attention is causal, so the
clean and corrupted states there are identical and their indirect effect is exactly zero.

How it is made fast. ROME runs one forward per site with a batch of noise draws; the
engine here puts many ``(site, noise draw)`` rows on the batch axis of one forward, and
every forward starts late and narrow:

* at the lowest layer restored in the batch, from the cached corrupted residual stream,
  since the layers below see only corrupted inputs (``bridge(resid, start_at_layer=s)``;
  the bridge would still run the blocks below ``s`` and throw their output away, so they
  are skipped for the duration of the call);
* at the first restored token, since positions before it are identical to the corrupted
  run: their keys and values come from the corrupted run's cache;
* with the unembedding applied to the last position only.

:func:`trace` checks once per model that a resumed forward equals a full one and falls back
to the plain path (with a warning) where it does not
(:func:`~intattn_analysis.model_access.resume_engine`). The resumed forward, the noise and
the restores are those of :mod:`intattn_analysis.model_access`. The test suite compares the
engine with :mod:`intattn_analysis.tracing_reference`, a one-site-per-forward
implementation, to 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .architectures import hook, layer_indices
from .cache import CacheEntry, cache_entry
from .facts import SUBJECT_SLOT, Fact
from .intervals import normal_interval
from .loading import ModelHandle, write_json_atomic
from .model_access import (
    ResumeEngine,
    cache_keyword,  # noqa: F401  (importable from here as well)
    key_value_hooks,
    key_values,
    noise_draws,
    noise_hook,
    overwrite_hook,
    resume_engine,
    resumed_logits,
)
from .predictions import first_answer_token

__all__ = [
    "BALANCE_EPSILON",
    "KINDS",
    "TOKEN_CLASSES",
    "BalanceWarning",
    "LayerAlphas",
    "Noise",
    "TraceResult",
    "balance",
    "embedding_std",
    "noise_draws",
    "subject_span",
    "token_classes",
    "trace",
    "window_layers",
]

KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
TOKEN_CLASSES: tuple[str, ...] = (
    "subject_first",
    "subject_middle",
    "subject_last",
    "further",
    "last",
)
SEVERED_MODULES: tuple[str | None, ...] = (None, "mlp", "attn")
#: The hook each kind restores (a key of :data:`~intattn_analysis.architectures.HOOKS`).
KIND_HOOK: dict[str, str] = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}
#: Bump when the cached per-fact result format or the algorithm changes.
CACHE_FORMAT = 1
#: Token positions per forward when ``batch_size`` is not given.
DEFAULT_TOKENS_PER_BATCH = 4096
#: The scheduler's estimate of a forward's fixed cost per layer (Python, hooks, kernel
#: launches), in token positions: a forward of ``rows`` rows over ``positions`` positions
#: from layer ``s`` costs ``(n_layers - s) * (rows * positions + FORWARD_OVERHEAD_TOKENS)``.
FORWARD_OVERHEAD_TOKENS = 64
#: AIEs below this (after clipping at 0) count as no evidence in :func:`balance`.
BALANCE_EPSILON = 1e-3


# =========================================================================== noise
@dataclass(frozen=True)
class Noise:
    """The scale of the Gaussian noise added to the subject's embeddings.

    ``Noise(3.0)`` (what ``noise=3.0`` means) is 3 x the standard deviation of the
    model's input embeddings, ROME's default; ``Noise(0.1, relative=False)`` is an
    absolute standard deviation of 0.1.
    """

    scale: float = 3.0
    relative: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not self.scale > 0 or math.isinf(self.scale):
            raise ValueError(f"noise scale must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def of(cls, value: "float | Noise") -> "Noise":
        """``value`` as a :class:`Noise` (a number is a multiple of the embedding std)."""
        if isinstance(value, Noise):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"noise must be a positive number (a multiple of the embedding std) or a "
                f"Noise(scale, relative=...), got {value!r}"
            )
        return cls(float(value), relative=True)

    def std(self, model: ModelHandle) -> float:
        """The absolute standard deviation of the noise for ``model``."""
        return self.scale * embedding_std(model) if self.relative else self.scale


_EMBEDDING_STD: "weakref.WeakKeyDictionary[Any, tuple[int, float]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def embedding_std(model: ModelHandle, chunk: int = 16384) -> float:
    """Standard deviation of all entries of the input embeddings, as ``hook_embed`` sees them.

    Measured on the embedding module's output, so a model that scales its embeddings
    (Gemma multiplies them by sqrt(d_model)) is measured in the space the noise is added
    to. Where the module is a lookup times a constant (checked on the first ids) that is
    the weight's std times the constant; otherwise every id is embedded, in chunks.
    Cached per model.
    """
    module = model.hf_model.get_input_embeddings()
    module = getattr(module, "original_component", None) or module
    weight = module.weight
    cached = _EMBEDDING_STD.get(model.bridge)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    probe = torch.arange(min(256, weight.shape[0]), device=weight.device)
    looked_up, rows = module(probe).double(), weight[probe].double()
    factor = float(looked_up.norm() / rows.norm())
    if torch.allclose(looked_up, rows * factor, rtol=1e-5, atol=0):
        std = factor * float(torch.var_mean(weight, correction=1)[0]) ** 0.5  # Welford: accurate
    else:
        std = _chunked_std(module, weight.shape[0], weight.device, chunk)
    _EMBEDDING_STD[model.bridge] = (weight._version, std)
    return std


def _chunked_std(embed, vocab_size: int, device, chunk: int) -> float:
    """Std of ``embed(ids)`` over all ids, accumulated in float64 a chunk at a time."""
    total = total_sq = 0.0
    count = 0
    for first in range(0, vocab_size, chunk):
        values = embed(torch.arange(first, min(first + chunk, vocab_size), device=device))
        total += float(values.sum(dtype=torch.float64))
        total_sq += float(torch.linalg.vector_norm(values, dtype=torch.float64) ** 2)
        count += values.numel()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean * mean, 0.0) * count / (count - 1))


# =========================================================================== tokens
def subject_span(model: ModelHandle, fact: Fact) -> tuple[int, int]:
    """``(start, end)``: the subject's token positions in the tokenized prompt.

    The text before ``{}`` (without its trailing space, which belongs to the subject's
    first token) and that text plus the subject are tokenized the same way as the whole
    prompt, BOS included. Where a token straddles the subject's edge it counts as subject.
    """
    full = model.tokenize(fact.text)[0]
    prefix = fact.prompt[: fact.prompt.index(SUBJECT_SLOT)]
    before = model.tokenize(prefix.rstrip())[0]
    through = model.tokenize(prefix + fact.subject)[0]
    start = _common_prefix(before, full)
    end = len(through) if full[: len(through)] == through else _common_prefix(through, full) + 1
    end = min(end, len(full))
    if end <= start:
        raise ValueError(
            f"fact {fact.key} ({fact.text!r}): the subject {fact.subject!r} covers no tokens "
            f"of the prompt; the subject must be a non-empty part of the text"
        )
    return start, end


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def token_classes(n_tokens: int, start: int, end: int) -> list[str | None]:
    """The class of each position (``None`` before the subject), see the module notes."""
    classes: list[str | None] = []
    for t in range(n_tokens):
        if t < start:
            classes.append(None)
        elif t == end - 1:
            classes.append("subject_last")
        elif t == start:
            classes.append("subject_first")
        elif t < end:
            classes.append("subject_middle")
        elif t == n_tokens - 1:
            classes.append("last")
        else:
            classes.append("further")
    return classes


def _token_selection(tokens: str | Iterable[str]) -> tuple[str, ...]:
    allowed = f"'all', one of {list(TOKEN_CLASSES)}, or a list of them"
    if isinstance(tokens, str):
        if tokens == "all":
            return TOKEN_CLASSES
        tokens = [tokens]
    try:
        chosen = list(tokens)
    except TypeError:
        raise ValueError(f"tokens must be {allowed}, got {tokens!r}") from None
    for name in chosen:
        if name == "before":
            raise ValueError(
                "tokens: 'before' is not traced: positions before the subject see no noise, "
                f"so their indirect effect is exactly zero; choose from {list(TOKEN_CLASSES)}"
            )
        if name not in TOKEN_CLASSES:
            raise ValueError(f"tokens must be {allowed}; unknown token class {name!r}")
    if not chosen:
        raise ValueError(f"tokens must be {allowed}, got an empty list")
    return tuple(c for c in TOKEN_CLASSES if c in chosen)


# =========================================================================== settings
def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers a window of ``window`` layers centred on ``layer`` restores (ROME's rule)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


@dataclass(frozen=True)
class _Settings:
    """Everything that decides the numbers of a trace (the cache key), validated."""

    kinds: tuple[str, ...]
    tokens: tuple[str, ...]
    layers: tuple[int, ...]
    window: int
    samples: int
    noise: Noise
    noise_std: float
    severed: str | None
    seed: int
    answered_only: bool = True
    method: str = "exact"

    def describe(self) -> dict[str, Any]:
        # ``answered_only`` and ``method`` enter only when not the default, so that the
        # keys of traces made before they existed still match
        extra = {} if self.answered_only else {"answered_only": False}
        if self.method != "exact":
            extra["method"] = self.method
        return {
            "kinds": list(self.kinds),
            "tokens": list(self.tokens),
            "layers": list(self.layers),
            "window": self.window,
            "samples": self.samples,
            "noise": {
                "scale": self.noise.scale,
                "relative": self.noise.relative,
                "std": self.noise_std,
            },
            "severed": self.severed,
            "seed": self.seed,
            **extra,
        }

    def restore_layers(self, kind: str, layer: int, n_layers: int) -> range:
        if kind == "resid":
            return range(layer, layer + 1)
        return window_layers(layer, self.window, n_layers)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _settings(
    model: ModelHandle, kinds, tokens, layers, window, samples, noise, severed, seed
) -> _Settings:
    n_layers = model.n_layers
    if severed not in SEVERED_MODULES:
        raise ValueError(f"severed must be one of {list(SEVERED_MODULES)}, got {severed!r}")
    if kinds is None:
        kinds = ("resid",) if severed else KINDS
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(dict.fromkeys(kinds))
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; kinds must be among {list(KINDS)}")
    if not kinds:
        raise ValueError(f"kinds must name at least one of {list(KINDS)}")
    if severed and kinds != ("resid",):
        raise ValueError(
            f"severed={severed!r} restores the residual stream only; pass kinds=('resid',) "
            f"(or leave kinds unset), got kinds={list(kinds)}"
        )
    window = _positive_int("window", window)
    if window > n_layers:
        raise ValueError(f"window={window} is larger than the model's {n_layers} layers")
    layers = layer_indices(range(n_layers) if layers is None else layers, n_layers)
    noise = Noise.of(noise)
    return _Settings(
        kinds=kinds,
        tokens=_token_selection(tokens),
        layers=layers,
        window=window,
        samples=_positive_int("samples", samples),
        noise=noise,
        noise_std=noise.std(model),
        severed=severed,
        seed=int(seed),
    )


# =========================================================================== per-fact state
class Site(NamedTuple):
    """One restore: ``kind`` at ``token`` and ``layer``; the forward can start at ``start``."""

    kind: str
    token: int
    layer: int
    start: int
    restored: range


@dataclass
class _FactRun:
    """One fact's prompt, clean and corrupted states, and answer probabilities."""

    fact: Fact
    ids: Tensor  # [1, pos]
    span: tuple[int, int]
    answer: int
    classes: list[str | None]
    clean: dict[str, Tensor] = field(default_factory=dict)  # name -> [1, pos, d_model]
    p_clean: float = float("nan")
    top_token: int = -1
    corrupted: dict[str, Tensor] = field(default_factory=dict)  # name -> [samples, pos, ...]
    p_corrupted: Tensor | None = None  # [samples]

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[1]

    def positions(self, settings: _Settings) -> list[int]:
        return [t for t, c in enumerate(self.classes) if c is not None and c in settings.tokens]


def _prepare(model: ModelHandle, fact: Fact) -> _FactRun:
    start, end = subject_span(model, fact)
    ids = torch.tensor(model.tokenize(fact.text), device=model.device)
    return _FactRun(
        fact=fact,
        ids=ids,
        span=(start, end),
        answer=first_answer_token(model, fact.target_true),
        classes=token_classes(ids.shape[1], start, end),
    )


def _answer_probability(logits: Tensor, answer: int) -> Tensor:
    """``[batch]`` probability of ``answer`` at the last position of ``[batch, pos, vocab]``."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer]


@torch.no_grad()
def _clean_run(model: ModelHandle, run: _FactRun, settings: _Settings) -> None:
    names = {hook(KIND_HOOK[k], l) for k in settings.kinds for l in range(model.n_layers)}
    logits, cache = model.bridge.run_with_cache(run.ids, names_filter=lambda n: n in names)
    probs = torch.softmax(logits[0, -1].float(), dim=-1)
    run.clean = {name: cache[name] for name in names}
    run.p_clean = float(probs[run.answer])
    run.top_token = int(probs.argmax())


@torch.no_grad()
def _corrupted_run(
    model: ModelHandle, run: _FactRun, settings: _Settings, engine: ResumeEngine
) -> None:
    start, end = run.span
    noise = noise_draws(
        run.fact, settings.samples, end - start, model.d_model, settings.seed, settings.noise_std
    )
    names = {hook("resid_pre", l) for l in range(model.n_layers)}
    if settings.severed:
        names |= {hook(KIND_HOOK[settings.severed], l) for l in range(model.n_layers)}
    if engine.prefix_cache:
        names |= set(key_value_hooks(model, range(model.n_layers)))
    ids = run.ids.expand(settings.samples, -1)
    with model.bridge.hooks(fwd_hooks=[(hook("embed"), noise_hook(noise, start, end))]):
        logits, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    run.corrupted = {name: cache[name] for name in names}
    run.p_corrupted = _answer_probability(logits, run.answer)


def _sites(
    model: ModelHandle, run: _FactRun, settings: _Settings, kinds: Sequence[str]
) -> list[Site]:
    """Every restore site of one fact, ordered so that neighbours share start token and layer."""
    sites = []
    for kind in kinds:
        for t in run.positions(settings):
            for layer in settings.layers:
                restored = settings.restore_layers(kind, layer, model.n_layers)
                sites.append(Site(kind, t, layer, restored.start, restored))
    return sorted(sites, key=lambda s: (s.token, s.start, KINDS.index(s.kind), s.layer))


# =========================================================================== restores
def _assignments(
    model: ModelHandle,
    run: _FactRun,
    settings: _Settings,
    sites: Sequence[Site],
    rows: Sequence[tuple[int, int]],
    t0: int,
) -> list:
    """The forward hooks that restore each row's site (and hold severed outputs).

    ``rows`` are ``(site index, noise sample)`` pairs; row ``i`` of the batch is ``rows[i]``.
    Each hook writes, for its rows, the clean (or held corrupted) value at the row's token.
    """
    plan: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for i, (site_index, sample) in enumerate(rows):
        site = sites[site_index]
        for j in site.restored:
            name = hook(KIND_HOOK[site.kind], j)
            plan[name][0].append(i)
            plan[name][1].append(site.token - t0)
            plan[name][2].append(run.clean[name][0, site.token])
        if settings.severed:
            for j in range(site.layer, model.n_layers):
                name = hook(KIND_HOOK[settings.severed], j)
                plan[name][0].append(i)
                plan[name][1].append(site.token - t0)
                plan[name][2].append(run.corrupted[name][sample, site.token])
    device = run.ids.device
    hooks = []
    for name, (batch_rows, positions, values) in plan.items():
        index = (torch.tensor(batch_rows, device=device), torch.tensor(positions, device=device))
        hooks.append((name, overwrite_hook(*index, torch.stack(values))))
    return hooks


def _schedule(
    sites: Sequence[Site], samples: int, batch_size: int, n_layers: int, n_tokens: int
) -> list[list[tuple[int, int]]]:
    """Split the ``(site index, noise sample)`` rows into forwards of at most ``batch_size``.

    A forward costs as much as its lowest start layer and first token make it, so rows are
    grouped by token and, within a token, cut where the estimated total work is smallest
    (a small dynamic programme over the sites, which are sorted by start layer). A site's
    noise draws stay together unless ``batch_size`` is smaller than ``samples``.
    """

    def rows_of(members: Iterable[int]) -> list[tuple[int, int]]:
        return [(i, s) for i in members for s in range(samples)]

    if batch_size < samples:
        rows = rows_of(range(len(sites)))
        return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    chunks = []
    by_token: dict[int, list[int]] = defaultdict(list)
    for i, site in enumerate(sites):
        by_token[site.token].append(i)
    for token, members in sorted(by_token.items()):
        members.sort(key=lambda i: sites[i].start)
        starts = [sites[i].start for i in members]
        width = (n_tokens - token) * samples
        for first, end in _cheapest_cuts(starts, width, batch_size // samples, n_layers):
            chunks.append(rows_of(members[first:end]))
    return chunks


def _cheapest_cuts(
    starts: Sequence[int], width: int, per_forward: int, n_layers: int
) -> list[tuple[int, int]]:
    """``[(first, end), ...]`` cutting sites sorted by start layer into forwards of at most
    ``per_forward`` sites so that the summed cost estimate is smallest."""
    n = len(starts)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for first in range(max(0, end - per_forward), end):
            cost = best[first] + (n_layers - starts[first]) * (
                width * (end - first) + FORWARD_OVERHEAD_TOKENS
            )
            if cost < best[end]:
                best[end], cut[end] = cost, first
    spans, end = [], n
    while end > 0:
        spans.append((cut[end], end))
        end = cut[end]
    return spans[::-1]


@torch.no_grad()
def _restored_probabilities(
    model: ModelHandle,
    run: _FactRun,
    settings: _Settings,
    sites: list[Site],
    engine: ResumeEngine,
    batch_size: int,
) -> Tensor:
    """``[n_sites]`` p(answer | restored), averaged over the noise draws."""
    samples = settings.samples
    totals = torch.zeros(len(sites), dtype=torch.float64)
    kv = None
    if engine.prefix_cache:
        kv = key_values(model, run.corrupted, range(model.n_layers))
    for chunk in _schedule(sites, samples, batch_size, model.n_layers, run.n_tokens):
        chunk_sites = [sites[i] for i, _ in chunk]
        start = min(site.start for site in chunk_sites)
        t0 = min(site.token for site in chunk_sites) if engine.prefix_cache else 0
        samples_idx = torch.tensor([s for _, s in chunk], device=run.ids.device)
        resid = run.corrupted[hook("resid_pre", start)][samples_idx, t0:]
        hooks = _assignments(model, run, settings, sites, chunk, t0)
        logits = resumed_logits(model, engine, resid, start, t0, kv, samples_idx, hooks)
        probs = _answer_probability(logits, run.answer).double().cpu()
        totals.index_add_(0, torch.tensor([i for i, _ in chunk]), probs)
    return totals / samples


# =========================================================================== disk cache
def _cache_entry(
    cache_dir: Path, model: ModelHandle, fact: Fact, kind: str, settings: _Settings
) -> CacheEntry:
    """The cache entry of one fact's rows of one kind: keyed on the model (state and
    dtype, added by :func:`~intattn_analysis.cache.cache_entry`), the fact's content, the
    kind and every setting of the trace."""
    described = settings.describe()
    described.pop("kinds")
    fields = {"format": CACHE_FORMAT, "fact": fact.key, "kind": kind, **described}
    return cache_entry(cache_dir, model, f"trace-{fact.key}-{kind}", fields, what="trace")


_write_atomic = write_json_atomic


def _read_cached(entry: CacheEntry, fact: Fact, kind: str) -> list[dict] | None:
    """The cached rows of one fact and kind, or ``None`` when there are none; an entry that
    cannot be read, is another key's or holds something else than this fact's rows of
    this kind (truncated JSON, ``[]``, ``null``, rows without their columns or with
    non-finite numbers) is reported with a warning, and the caller recomputes and
    replaces it."""

    def check(stored: dict) -> None:
        rows = stored["rows"]
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"rows is {type(rows).__name__} of length {len(rows) if isinstance(rows, list) else '-'}")
        for row in rows:
            if not isinstance(row, dict) or not set(COLUMNS) <= set(row):
                raise ValueError("a row lacks the trace columns")
            if row["fact"] != fact.key or row["kind"] != kind:
                raise ValueError(f"a row of fact {row['fact']!r}, kind {row['kind']!r}")
            if not all(isinstance(row[c], (int, float)) and math.isfinite(row[c])
                       for c in ("p_clean", "p_corrupted", "p_restored", "ie", "layer", "token")):
                raise ValueError("a row holds a non-number")

    stored = entry.read_json(check)
    return None if stored is None else stored["rows"]


# =========================================================================== trace
def trace(
    model: ModelHandle,
    facts: Fact | Sequence[Fact],
    *,
    kinds: Sequence[str] | None = None,
    tokens: str | Sequence[str] = "all",
    layers: Iterable[int] | None = None,
    window: int = 10,
    samples: int = 10,
    noise: float | Noise = 3.0,
    severed: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    answered_only: bool = True,
    method: str = "exact",
    progress: bool = True,
) -> "TraceResult":
    """Causal-trace ``facts`` on ``model`` (see the module notes for the method).

    Args:
        model: a loaded model (:func:`~intattn_analysis.loading.load_model`).
        facts: the facts to trace; those whose ``target_true`` is missing or whose first
            answer token is not the model's top-1 prediction are left out and recorded in
            :attr:`TraceResult.skipped`.
        kinds: states to restore, among ``"resid"``, ``"mlp"``, ``"attn"``; default all
            three, or ``("resid",)`` for a severed trace.
        tokens: ``"all"`` (every token from the subject's first on), a token class
            (``"subject_last"``, ``"last"``, ...) or a list of classes.
        layers: layers to trace (for attn/mlp: the window centres); default all.
        window: layers restored together for attn/mlp (ROME: 10); resid restores one.
        samples: noise draws per fact.
        noise: the noise scale: a multiple of the embeddings' std (ROME: 3), or a
            :class:`Noise` (``Noise(0.1, relative=False)`` for an absolute std).
        severed: ``"mlp"`` or ``"attn"`` for ROME's severed-path variant, else ``None``.
        seed: combined with each fact's key to seed its noise.
        batch_size: ``(site, noise draw)`` rows per forward; default about
            ``4096 // prompt length``. Results do not depend on it beyond float rounding.
        cache_dir: where to keep one result file per (model, fact, kind, settings);
            an interrupted run started again reads what is there and computes the rest.
        answered_only: leave out facts whose first ``target_true`` token is not the
            model's top-1 prediction (default). ``False`` traces every fact with a
            ``target_true``: the indirect effects on ``p(target_true)`` wherever it
            stands, which is how an *edited* model is asked where the old answer it no
            longer gives still flows.
        method: ``"exact"`` restores each site in its own forward rows (the default);
            ``"attribution"`` estimates every site's indirect effect from one corrupted
            forward and backward per fact (AtP), and ``"attribution*"`` adds GradDrop
            (AtP*), an estimate of each site's *magnitude*; see
            :mod:`intattn_analysis.attribution` for both and for how windows are
            approximated. The rows have the same columns; ``p_restored`` of an estimate
            is ``p_corrupted + ie``. Attribution has no severed variant.
        progress: show a progress bar over facts.

    Returns:
        a :class:`TraceResult`, one row per (fact, kind, token, layer).

    Raises:
        ValueError: no facts, no fact the model answers correctly, a subject covering no
            token, an unknown kind or token class, a window larger than the model, a bad
            ``severed`` value.
    """
    from tqdm.auto import tqdm

    facts = [facts] if isinstance(facts, Fact) else list(facts)
    if not facts:
        raise ValueError("facts is empty; pass at least one Fact")
    for i, fact in enumerate(facts):
        if not isinstance(fact, Fact):
            raise ValueError(f"facts[{i}] must be a Fact, got {type(fact).__name__}")
    settings = _settings(model, kinds, tokens, layers, window, samples, noise, severed, seed)
    from .attribution import check_method

    check_method(method)
    if method != "exact" and settings.severed:
        raise ValueError(
            f"method={method!r} has no severed variant (holding a module at its corrupted value "
            "while restoring another state is not a first-order quantity); trace severed paths "
            "with method='exact'")
    settings = dataclasses.replace(settings, answered_only=bool(answered_only), method=method)
    if batch_size is not None:
        batch_size = _positive_int("batch_size", batch_size)

    rows: list[dict] = []
    traced: list[Fact] = []
    skipped: list[Fact] = []
    reasons: list[str] = []
    for fact in tqdm(facts, desc=f"tracing {model.name}", disable=not progress):
        fact_rows, reason = _trace_fact(model, fact, settings, batch_size, cache_dir)
        if reason is not None:
            skipped.append(fact)
            reasons.append(reason)
            continue
        traced.append(fact)
        rows.extend(fact_rows)
    if not traced:
        detail = "; ".join(f"{f.key} ({f.subject!r}): {r}" for f, r in zip(skipped[:5], reasons))
        detail += "; ..." if len(skipped) > 5 else ""
        raise ValueError(
            f"none of the {len(facts)} facts is answered correctly by {model.name} "
            f"(first answer token top-1 in the clean run), nothing to trace: {detail}"
        )
    described = {"model": model.state_id, "dtype": str(model.dtype), **settings.describe()}
    return TraceResult.from_rows(rows, described, traced, skipped, reasons)


def _trace_fact(
    model: ModelHandle, fact: Fact, settings: _Settings, batch_size: int | None, cache_dir
) -> tuple[list[dict], str | None]:
    """The rows of one fact, from the disk cache where possible; or the reason it is skipped."""
    if fact.target_true is None:
        return [], "no target_true"
    entries = {}
    if cache_dir is not None:
        entries = {k: _cache_entry(Path(cache_dir), model, fact, k, settings) for k in settings.kinds}
    cached = {k: _read_cached(entry, fact, k) for k, entry in entries.items()}
    missing = [k for k in settings.kinds if cached.get(k) is None]
    if not missing:
        return [row for k in settings.kinds for row in cached[k]], None

    run = _prepare(model, fact)
    _clean_run(model, run, settings)
    if settings.answered_only and run.top_token != run.answer:
        predicted = model.tokenizer.decode([run.top_token])
        expected = model.tokenizer.decode([run.answer])
        return [], f"top-1 prediction {predicted!r} is not the answer {expected!r}"
    if settings.method != "exact":
        from .attribution import attribution_estimates

        sites = _sites(model, run, settings, missing)
        ie, run.p_corrupted = attribution_estimates(model, run, settings, sites, settings.method)
        p_restored = ie + float(run.p_corrupted.double().mean())
    else:
        engine = resume_engine(model, run.ids)
        _corrupted_run(model, run, settings, engine)
        sites = _sites(model, run, settings, missing)
        size = batch_size or max(1, DEFAULT_TOKENS_PER_BATCH // run.n_tokens)
        p_restored = _restored_probabilities(model, run, settings, sites, engine, size)
    computed = _rows(model, run, settings, sites, p_restored)
    for kind in missing:
        cached[kind] = [row for row in computed if row["kind"] == kind]
        if kind in entries:
            entries[kind].write_json({"rows": cached[kind]})
    return [row for k in settings.kinds for row in cached[k]], None


def _rows(
    model: ModelHandle, run: _FactRun, settings: _Settings, sites: list[Site], p_restored: Tensor
) -> list[dict]:
    p_corrupted = float(run.p_corrupted.double().mean())
    def table_order(i: int) -> tuple:
        return KINDS.index(sites[i].kind), sites[i].token, sites[i].layer

    ordered = sorted(range(len(sites)), key=table_order)
    rows = []
    for i in ordered:
        site = sites[i]
        restored = float(p_restored[i])
        rows.append(
            {
                "fact": run.fact.key,
                "subject": run.fact.subject,
                "kind": site.kind,
                "token": site.token,
                "token_text": model.tokenizer.decode([int(run.ids[0, site.token])]),
                "token_class": run.classes[site.token],
                "layer": site.layer,
                "p_clean": run.p_clean,
                "p_corrupted": p_corrupted,
                "p_restored": restored,
                "ie": restored - p_corrupted,
                "severed": settings.severed or "none",
            }
        )
    return rows


# =========================================================================== results
COLUMNS = (
    "fact", "subject", "kind", "token", "token_text", "token_class", "layer",
    "p_clean", "p_corrupted", "p_restored", "ie", "severed",
)  # fmt: skip


@dataclass
class TraceResult:
    """The outcome of :func:`trace`.

    Attributes:
        table: one row per (fact, kind, token, layer); see :meth:`to_dataframe`.
        settings: the model and every setting that decided the numbers.
        facts: the facts traced.
        skipped: the facts left out (no ``target_true``, or not answered correctly).
        skip_reasons: why each of ``skipped`` was left out.
    """

    table: Any  # pandas.DataFrame
    settings: dict[str, Any]
    facts: tuple[Fact, ...] = ()
    skipped: tuple[Fact, ...] = ()
    skip_reasons: tuple[str, ...] = ()

    @classmethod
    def from_rows(cls, rows, settings, facts, skipped=(), reasons=()) -> "TraceResult":
        import pandas as pd

        table = pd.DataFrame(list(rows), columns=list(COLUMNS))
        table = table.astype({"token": "int64", "layer": "int64"})
        return cls(table, dict(settings), tuple(facts), tuple(skipped), tuple(reasons))

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_facts(self) -> int:
        return len(self.facts)

    def to_dataframe(self):
        """A copy of the table: columns fact (key), subject, kind, token (position),
        token_text, token_class, layer, p_clean, p_corrupted, p_restored, ie, severed
        (``"none"`` for a plain trace)."""
        return self.table.copy()

    def average_indirect_effect(self, by: str = "token_class"):
        """AIE per (kind, ``by``, layer) with 95% confidence intervals over facts.

        IEs are first averaged within each fact (a fact with several middle subject
        tokens counts once), then over facts: ``aie`` is the mean, ``ci_low`` /
        ``ci_high`` are ``aie -/+ 1.96 * sem`` (:func:`intattn_analysis.intervals.normal_interval`);
        with one fact the interval is NaN.
        ``by`` is ``"token_class"`` or ``"token"`` (the position, meaningful for facts
        sharing a template).
        """
        if by not in ("token_class", "token"):
            raise ValueError(f"by must be 'token_class' or 'token', got {by!r}")
        keys = ["kind", by, "layer"]
        per_fact = self.table.groupby(["fact", *keys], sort=False)["ie"].mean().reset_index()
        out = per_fact.groupby(keys, sort=False)["ie"].agg(aie="mean", sem="sem", n_facts="count")
        out = out.reset_index()
        out["ci_low"], out["ci_high"] = normal_interval(out["aie"], out["sem"])
        order = {"kind": KINDS.index, "token_class": TOKEN_CLASSES.index}
        out = out.sort_values(
            keys, key=lambda col: col.map(order[col.name]) if col.name in order else col
        )
        return out.reset_index(drop=True)[[*keys, "aie", "sem", "ci_low", "ci_high", "n_facts"]]

    def contributions(self, token: str = "subject_last"):
        """Attention and MLP AIE per layer at one token class.

        A DataFrame with columns layer, module (``"attn"`` / ``"mlp"``), aie, ci_low,
        ci_high, n_facts: the input of :func:`balance`.
        """
        modules = [k for k in ("attn", "mlp") if k in self.settings["kinds"]]
        if not modules:
            raise ValueError(
                "contributions need attn or mlp traces; this result has kinds "
                f"{self.settings['kinds']}"
            )
        aie = self.average_indirect_effect("token_class")
        present = list(dict.fromkeys(aie["token_class"]))
        if token not in present:
            raise ValueError(f"token class {token!r} was not traced; traced classes: {present}")
        part = aie[(aie["token_class"] == token) & aie["kind"].isin(modules)]
        part = part.rename(columns={"kind": "module"})
        part = part.sort_values(["layer", "module"]).reset_index(drop=True)
        return part[["layer", "module", "aie", "ci_low", "ci_high", "n_facts"]]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as one JSON file (atomically); :meth:`load` reads it back."""
        path = Path(path)
        _write_atomic(
            path,
            {
                "format": "intattn.TraceResult",
                "version": CACHE_FORMAT,
                "settings": self.settings,
                "rows": self.table.to_dict(orient="records"),
                "facts": [f.to_dict() for f in self.facts],
                "skipped": [f.to_dict() for f in self.skipped],
                "skip_reasons": list(self.skip_reasons),
            },
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TraceResult":
        with open(path) as fh:
            payload = json.load(fh)
        if payload.get("format") != "intattn.TraceResult":
            raise ValueError(f"{path} is not a saved TraceResult")
        return cls.from_rows(
            payload["rows"],
            payload["settings"],
            [Fact.from_dict(f) for f in payload["facts"]],
            [Fact.from_dict(f) for f in payload["skipped"]],
            payload["skip_reasons"],
        )

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"TraceResult({s.get('model')}, facts={self.n_facts}, skipped={self.n_skipped}, "
            f"kinds={s.get('kinds')}, window={s.get('window')}, samples={s.get('samples')}, "
            f"severed={s.get('severed')}, rows={len(self.table)})"
        )


# =========================================================================== balance
class BalanceWarning(UserWarning):
    """:func:`balance` clipped a negative AIE or fell back for a layer without evidence."""


class LayerAlphas(dict):
    """``{layer: alpha}`` from :func:`balance`, with ``notes`` on clipping and fallbacks
    and the ``global_alpha`` of the same layers."""

    def __init__(
        self,
        alphas: Mapping[int, float],
        notes: Sequence[str] = (),
        global_alpha: float = float("nan"),
    ):
        super().__init__(alphas)
        self.notes = list(notes)
        self.global_alpha = global_alpha


def _module_aie(contributions) -> dict[str, dict[int, float]]:
    if isinstance(contributions, TraceResult):
        contributions = contributions.contributions()
    needed = {"layer", "module", "aie"}
    columns = set(getattr(contributions, "columns", ()))
    if not needed <= columns:
        raise ValueError(
            "balance needs a TraceResult, a contributions DataFrame (columns layer, module, "
            f"aie) or a number in [0, 1]; got {type(contributions).__name__} with columns "
            f"{sorted(columns)}"
        )
    aie: dict[str, dict[int, float]] = {"attn": {}, "mlp": {}}
    columns = (contributions["layer"], contributions["module"], contributions["aie"])
    for layer, module, value in zip(*columns):
        if module in aie:
            aie[module][int(layer)] = float(value)
    return aie


def balance(
    contributions,
    layers: Iterable[int] | None = None,
    mode: str = "per_layer",
    *,
    epsilon: float = BALANCE_EPSILON,
) -> "LayerAlphas | float":
    """The IntAttn-Edit balance factor: the share of an edit that goes to attention.

    ``alpha_l = AIE_attn(l) / (AIE_attn(l) + AIE_mlp(l))`` per layer (``mode="per_layer"``,
    a :class:`LayerAlphas` dict), or ``sum_l AIE_attn / (sum_l AIE_attn + sum_l AIE_mlp)``
    over ``layers`` (``mode="global"``, a float). ``contributions`` is
    :meth:`TraceResult.contributions` (or a TraceResult, whose subject-last contributions
    are used); a number fixes alpha instead (``balance(0.3, layers=[3, 4])`` gives
    ``{3: 0.3, 4: 0.3}``; alpha = 0 is MEMIT, 1 attention only).

    Negative AIEs say the module does not carry the fact and are clipped at 0. A layer
    whose clipped attention and MLP AIEs are both below ``epsilon`` carries no evidence
    either way: it gets the global alpha of the requested layers, and if that too has no
    evidence, 0.5. Every clip and fallback is listed in ``LayerAlphas.notes`` and
    summarised in one :class:`BalanceWarning`.
    """
    if mode not in ("per_layer", "global"):
        raise ValueError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    if isinstance(contributions, (int, float)) and not isinstance(contributions, bool):
        return _fixed_alpha(float(contributions), layers, mode)
    aie = _module_aie(contributions)
    available = sorted(set(aie["attn"]) & set(aie["mlp"]))
    layers = available if layers is None else sorted(set(int(l) for l in layers))
    missing = [l for l in layers if l not in available]
    if missing or not layers:
        raise ValueError(
            f"layers {missing or layers} have no attention and MLP contributions; "
            f"available: {available}"
        )
    notes: list[str] = []
    attn = {l: _clipped(aie["attn"][l], f"layer {l}: attn", notes) for l in layers}
    mlp = {l: _clipped(aie["mlp"][l], f"layer {l}: mlp", notes) for l in layers}
    total = sum(attn.values()) + sum(mlp.values())
    if max(sum(attn.values()), sum(mlp.values())) < epsilon:
        global_alpha = 0.5
        notes.append(f"no evidence over layers {layers} (AIEs below {epsilon}): global alpha 0.5")
    else:
        global_alpha = sum(attn.values()) / total
    if mode == "global":
        _warn(notes)
        return global_alpha
    alphas = {}
    for l in layers:
        if max(attn[l], mlp[l]) < epsilon:
            alphas[l] = global_alpha
            notes.append(
                f"layer {l}: both AIEs below {epsilon}; used the global alpha {global_alpha:.4g}"
            )
        else:
            alphas[l] = attn[l] / (attn[l] + mlp[l])
    _warn(notes)
    return LayerAlphas(alphas, notes, global_alpha)


def _fixed_alpha(alpha: float, layers, mode: str) -> "LayerAlphas | float":
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"a fixed alpha must be in [0, 1], got {alpha}")
    if mode == "global":
        return alpha
    if layers is None:
        raise ValueError(
            "a fixed alpha with mode='per_layer' needs layers=[...] to build {layer: alpha}"
        )
    return LayerAlphas({int(l): alpha for l in sorted(set(layers))}, [], alpha)


def _clipped(value: float, label: str, notes: list[str]) -> float:
    if value < 0:
        notes.append(f"{label} AIE {value:.4g} clipped to 0")
        return 0.0
    return value


def _warn(notes: list[str]) -> None:
    if notes:
        warnings.warn(
            f"balance: {len(notes)} adjustment(s): "
            + "; ".join(notes[:5])
            + ("; ..." if len(notes) > 5 else ""),
            BalanceWarning,
            stacklevel=3,
        )
