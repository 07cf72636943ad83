"""Second moments of the keys of the editable matrices: ``C = E[k kᵀ]`` per layer and module.

A MEMIT-family edit of a linear map ``W`` (key ``k`` in, value ``v`` out) inserts new
key/value pairs ``(K, V)`` while changing the map as little as possible on the keys it
already serves. "The keys it already serves" are summarised by their uncentred second
moment over a text corpus, ``C = E[k kᵀ]``, and the update is
``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (:func:`intattn_analysis.editing.solve_update`).
IntAttn-Edit edits two maps per layer, so it needs two moments per layer:

* ``"mlp"``: the key of the MLP down-projection is its input, the activated hidden layer
  (hook ``blocks.{l}.mlp.out.hook_in``, ``[batch, pos, d_mlp]``); this is ROME/MEMIT's
  ``mom2`` statistic.
* ``"attn"``: the key of the attention output projection ``o_proj`` is its input, the
  heads' outputs (hook ``blocks.{l}.attn.o.hook_in``, ``[batch, pos, head, d_head]``),
  flattened head-major to ``[batch, pos, head * d_head]``, which is the layout ``o_proj``'s
  weight consumes (``value = key @ Wᵀ``; the tests check it).

Collecting the statistics is the expensive part of every MEMIT-family method, so
:func:`second_moments` collects every requested layer and both modules in **one**
streaming pass over the corpus, and stops each forward as soon as the last needed key has
been seen (:class:`~intattn_analysis.model_access.StopForward`, raised from that hook), so
layers above it and the unembedding never run. Padding is never counted: sequences are
right-padded, which leaves every real position of a causal model unchanged, and only real
positions enter the sums.
Each batch's ``kᵀk`` is computed in ``dtype`` (float32 by default, as ROME/MEMIT's
``mom2_dtype``) and summed over batches in float64 on the model's device; the result is
the sum divided by the number of tokens counted.

Every ``(module, layer)`` moment is cached in its own safetensors file under
``cache_dir`` (default ``cache_root() / "moments"``), named by everything its numbers
depend on: the model's ``state_id`` (name and revision or GGUF hash, plus the edits
applied to it, if any), the model's dtype,
module, layer, corpus id, ``n_tokens``, ``max_len`` and ``dtype``. ``batch_size`` is
deliberately not part of the key: it changes only how the same tokens are grouped (the
sums agree to float rounding). Files are written atomically. A later call loads what is
cached and computes only the missing pairs, again in one pass. The statistics describe
the model's weights at the time they are collected: an edited model has moments of its
own. :func:`intattn_analysis.edit_sequence` and the ``sequential`` experiment compute the
unedited model's once and pass them to every edit (the reference implementations keep
theirs the same way); a plain :func:`intattn_analysis.edit` of an already edited model
with ``moments=None`` computes, and caches, the edited model's. Pass ``moments=`` to
preserve another model state's.

Scale. ROME and MEMIT estimate ``C`` from 100,000 Wikipedia articles, each cut to the
model's context length (1,024 tokens for GPT-2 XL, 2,048 for GPT-J), float32 products:
on the order of 10⁷-10⁸ tokens. A paper-scale run here is
``second_moments(model, layers, corpus="wikipedia", n_tokens=10_000_000, max_len=1024)``
or more (a GPU job); the default ``n_tokens=100_000`` over model samples is a laptop
setting whose ``C`` is noisier, and which the covariance weight λ partly compensates for.
For a ``d``-dimensional key ``C`` has rank at most the number of tokens counted: with
``d_mlp`` in the tens of thousands (7B models) use at least a few hundred thousand tokens.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .architectures import MODULES
from .corpus import CorpusError, ModelSamples, TextCorpus, resolve_corpus
from .cache import CacheEntry, cache_entry, kind_folder
from .loading import ModelHandle
from .model_access import StopForward

__all__ = [
    "CACHE_FORMAT",
    "SecondMoments",
    "cache_file",
    "second_moments",
    "second_moments_per_layer",
]

#: Bump when the stored format or the algorithm changes (part of every cache key).
CACHE_FORMAT = 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Pair = tuple[str, int]


# =========================================================================== result
class SecondMoments(Mapping[Pair, Tensor]):
    """The moments ``E[k kᵀ]`` of one collection, keyed by ``(module, layer)``.

    Each value is a float64 ``[d, d]`` tensor (``d = d_mlp`` for ``"mlp"``,
    ``n_heads * d_head`` for ``"attn"``). ``n_tokens`` is the number of tokens counted,
    ``corpus_id`` names the corpus, ``max_len`` the sequence cap, ``dtype`` the precision
    of the per-batch products. A plain ``{(module, layer): tensor}`` dict is accepted
    wherever a :class:`SecondMoments` is (:meth:`of` wraps it; its provenance fields are
    then ``None``).
    """

    def __init__(
        self,
        moments: Mapping[Pair, Tensor],
        *,
        n_tokens: int | None = None,
        corpus_id: str | None = None,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        model_id: str | None = None,
        seconds: float | None = None,
    ) -> None:
        self._moments = {(str(m), int(l)): t for (m, l), t in moments.items()}
        self.n_tokens = n_tokens
        self.corpus_id = corpus_id
        self.max_len = max_len
        self.dtype = dtype
        self.model_id = model_id
        #: Seconds the collection passes took (not counting reading or sampling the
        #: corpus; 0 when everything came from the cache).
        self.seconds = seconds

    @classmethod
    def of(cls, moments: "Mapping[Pair, Tensor] | SecondMoments") -> "SecondMoments":
        """``moments`` as a :class:`SecondMoments` (a plain dict is wrapped, not copied)."""
        return moments if isinstance(moments, SecondMoments) else cls(moments)

    def __getitem__(self, key: Pair) -> Tensor:
        try:
            return self._moments[key]
        except KeyError:
            raise KeyError(
                f"no second moment for {key!r}; held: {sorted(self._moments)}"
            ) from None

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._moments)

    def __len__(self) -> int:
        return len(self._moments)

    def layers(self, module: str) -> list[int]:
        """The layers held for ``module``."""
        return sorted(l for m, l in self._moments if m == module)

    def describe(self) -> dict[str, Any]:
        """Where the numbers come from, as plain data (for result files and tables)."""
        return {
            "model": self.model_id,
            "corpus": self.corpus_id,
            "n_tokens": self.n_tokens,
            "max_len": self.max_len,
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "matrices": {
                m: self.layers(m) for m in MODULES if self.layers(m)
            },
            "dims": {f"{m}:{l}": int(t.shape[0]) for (m, l), t in sorted(self._moments.items())},
        }

    def __repr__(self) -> str:
        held = ", ".join(f"{m}: {self.layers(m)}" for m in MODULES if self.layers(m))
        return (
            f"SecondMoments({held}; corpus={self.corpus_id!r}, n_tokens={self.n_tokens}, "
            f"max_len={self.max_len})"
        )


# =========================================================================== validation
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _pairs(model: ModelHandle, layers: Any, modules: Any) -> list[Pair]:
    if isinstance(modules, str):
        modules = (modules,)
    modules = tuple(dict.fromkeys(modules))
    if not modules or any(m not in MODULES for m in modules):
        raise ValueError(
            f"modules must be a non-empty selection of {list(MODULES)}, got {list(modules)}"
        )
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise ValueError(f"layers must be an int or a sequence of ints, got {layers!r}") from None
    n_layers = model.n_layers
    bad = [
        l for l in layers
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers
    ]
    if bad or not layers:
        raise ValueError(
            f"layers must be integers in [0, {n_layers}) for {model.name} and not empty; "
            f"got {bad or layers}"
        )
    return [(m, l) for l in sorted(set(layers)) for m in modules]


# =========================================================================== cache
def _cache_entry(
    folder: str | os.PathLike, model: ModelHandle, pair: Pair, corpus_id: str, n_tokens: int,
    max_len: int, dtype: torch.dtype,
) -> CacheEntry:
    """The cache entry of one moment: keyed on the model (state and dtype, added by
    :func:`~intattn_analysis.cache.cache_entry`), module, layer, corpus, ``n_tokens``,
    ``max_len`` and the dtype of the products. The label spells the settings out for a
    reader of the folder."""
    module, layer = pair
    fields = {
        "format": CACHE_FORMAT,
        "module": module,
        "layer": layer,
        "corpus": corpus_id,
        "n_tokens": n_tokens,
        "max_len": max_len,
        "product_dtype": str(dtype),
    }
    label = (f"mom2-{module}-layer{layer}-{corpus_id}-n{n_tokens}-len{max_len}-"
             f"{str(dtype).replace('torch.', '')}")
    return cache_entry(folder, model, label, fields, what="second moment", suffix="safetensors")


def cache_file(
    cache_dir: str | os.PathLike,
    model: ModelHandle,
    module: str,
    layer: int,
    corpus_id: str,
    n_tokens: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The file that holds (or would hold) one cached moment (the layout is that of
    :mod:`intattn_analysis.cache`).

    The name spells out the settings for a reader of the folder; the key at its end
    covers them all, and the model's state and dtype, so no setting can be silently left
    out.
    """
    return _cache_entry(cache_dir, model, (module, layer), corpus_id, n_tokens, max_len, dtype).path


def _write_cached(entry: CacheEntry, moment: Tensor, counted: int) -> None:
    """Save one moment so that a reader sees the whole file or none of it."""
    entry.write_tensors({"mom2": moment}, {"n_tokens_counted": str(counted)})


def _read_cached(entry: CacheEntry, device: torch.device, d_in: int) -> tuple[Tensor, int] | None:
    """The cached moment and its token count, or ``None`` when there is no entry or it is
    damaged (unreadable, truncated, another key's, of the wrong shape, not finite); a
    damaged entry is reported with a warning, and the caller recomputes and replaces it."""

    def check(tensors: dict, metadata: dict) -> None:
        moment, counted = tensors["mom2"], int(metadata["n_tokens_counted"])
        if tuple(moment.shape) != (d_in, d_in) or not bool(torch.isfinite(moment).all()) or counted < 1:
            raise ValueError(f"shape {tuple(moment.shape)}, {counted} tokens")

    stored = entry.read_tensors(check)
    if stored is None:
        return None
    tensors, metadata = stored
    return tensors["mom2"].to(device), int(metadata["n_tokens_counted"])


# =========================================================================== collection
def _batches(
    sequences: list[list[int]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(ids, real)``: right-padded ``[batch, pos]`` token ids and a mask of real tokens."""
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first : first + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        real = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            real[row, : len(sequence)] = True
        yield ids.to(device), real


class _Collector:
    """Hooks that add each batch's ``kᵀk`` to float64 sums, and stop the forward early."""

    def __init__(self, model: ModelHandle, pairs: Sequence[Pair], dtype: torch.dtype) -> None:
        self.pairs = list(pairs)
        self.dtype = dtype
        self.sums: dict[Pair, Tensor] = {}
        self.fired: set[Pair] = set()
        self.real: Tensor | None = None
        self._real_on: dict[torch.device, Tensor] = {}
        self.hooks = [(model.layer(l).key_hook(m), self._hook((m, l))) for m, l in self.pairs]

    def start_batch(self, real: Tensor) -> None:
        self.real, self._real_on = real, {}
        self.fired.clear()

    def _hook(self, pair: Pair):
        def accumulate(x: Tensor, hook=None) -> None:
            real = self._real_on.get(x.device)
            if real is None:
                real = self._real_on[x.device] = self.real.to(x.device)
            # [batch, pos, head, d_head] -> [batch, pos, head * d_head]: o_proj's input layout
            keys = x.reshape(*x.shape[:2], -1)[real].to(self.dtype)
            product = (keys.T @ keys).to(torch.float64)
            if pair in self.sums:
                self.sums[pair] += product
            else:
                self.sums[pair] = product
            self.fired.add(pair)
            if len(self.fired) == len(self.pairs):
                raise StopForward  # the rest of the forward is not needed

        return accumulate


@torch.no_grad()
def _collect(
    model: ModelHandle,
    pairs: Sequence[Pair],
    sequences: list[list[int]],
    *,
    batch_size: int,
    dtype: torch.dtype,
    progress: bool,
    description: str,
) -> dict[Pair, Tensor]:
    """One streaming pass over ``sequences``: the summed ``kᵀk`` of every pair."""
    collector = _Collector(model, pairs, dtype)
    pad_id = model.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    total = sum(len(s) for s in sequences)
    with tqdm(total=total, unit="tok", desc=description, disable=not progress) as bar:
        with model.bridge.hooks(fwd_hooks=collector.hooks):
            for ids, real in _batches(sequences, batch_size, pad_id, model.device):
                collector.start_batch(real)
                try:
                    model.bridge(ids)
                except StopForward:
                    pass
                if len(collector.fired) != len(collector.pairs):
                    missing = sorted(set(collector.pairs) - collector.fired)
                    raise RuntimeError(
                        f"the key hooks of {missing} did not fire during a forward of "
                        f"{model.name}; is the bridge's hook vocabulary the package's?"
                    )
                bar.update(int(real.sum()))
    return collector.sums


def _validated(
    model, layers, modules, corpus, n_tokens, max_len, batch_size, dtype
) -> tuple[list[Pair], "TextCorpus | ModelSamples"]:
    pairs = _pairs(model, layers, modules)
    _positive_int("n_tokens", n_tokens)
    _positive_int("max_len", max_len)
    _positive_int("batch_size", batch_size)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype!r}")
    return pairs, resolve_corpus(corpus)


def _sequences(
    model, source, n_tokens, max_len, corpus_cache, progress, allow_fewer_tokens
) -> list[list[int]]:
    sequences = source.sequences(
        model, n_tokens, max_len, cache_dir=corpus_cache, progress=progress
    )
    found = sum(len(s) for s in sequences)
    if found == 0:
        raise CorpusError(f"the corpus {source.corpus_id!r} holds no tokens")
    if found < n_tokens and not allow_fewer_tokens:
        raise CorpusError(
            f"the corpus {source.corpus_id!r} holds only {found} tokens (in sequences of at "
            f"most max_len={max_len}), fewer than n_tokens={n_tokens}. Pass n_tokens<={found}, "
            "a larger corpus, or allow_fewer_tokens=True to use all of it."
        )
    return sequences


def moments_cache_dir() -> Path:
    """The default folder of cached second moments: ``cache_root() / "moments"``."""
    return kind_folder("moments")


def corpus_cache_dir(moments_dir: Path | None = None) -> Path:
    """Where the corpora sampled for a moments folder are cached: its ``corpora``
    subfolder (of :func:`moments_cache_dir` by default)."""
    return Path(moments_dir if moments_dir is not None else moments_cache_dir()) / "corpora"


def second_moments(
    model: ModelHandle,
    layers: int | Sequence[int],
    modules: str | Sequence[str] = ("mlp", "attn"),
    corpus: object = None,
    *,
    n_tokens: int = 100_000,
    max_len: int = 128,
    batch_size: int = 16,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    one_pass: bool = True,
    allow_fewer_tokens: bool = False,
) -> SecondMoments:
    """``E[k kᵀ]`` of the keys of ``modules`` at ``layers``, over ``n_tokens`` corpus tokens.

    Args:
        model: the loaded model; its weights as they are now are the ones measured.
        layers: a layer index or several.
        modules: ``"mlp"`` (down-projection input), ``"attn"`` (``o_proj`` input), or both.
        corpus: ``None`` (text sampled from the model, the offline default), a ``.txt``
            file or folder, ``"wikitext"`` / ``"wikipedia"``, a list of strings, or a
            :class:`~intattn_analysis.corpus.TextCorpus` /
            :class:`~intattn_analysis.corpus.ModelSamples`
            (see :mod:`intattn_analysis.corpus`).
        n_tokens: tokens to count, exactly; a corpus with fewer is an error unless
            ``allow_fewer_tokens``.
        max_len: the longest sequence fed to the model (longer documents are chunked).
        batch_size: sequences per forward.
        dtype: precision of each batch's ``kᵀk``; the sum over batches is float64.
        cache_dir: the folder of cached moments (default ``cache_root() / "moments"``;
            sampled corpora go to its ``corpora`` subfolder); ``False`` turns the cache
            of moments off (a sampled corpus is still cached, in the default folder).
        progress: show tqdm progress bars.
        one_pass: ``True`` collects every missing pair in one pass; ``False`` runs one
            pass per ``(module, layer)``, as a per-layer implementation would (for
            benchmarks; see :func:`second_moments_per_layer`).
        allow_fewer_tokens: use the whole corpus when it holds fewer than ``n_tokens``
            tokens (the result's ``n_tokens`` says how many were counted).

    Returns:
        a :class:`SecondMoments`, float64 ``[d, d]`` per ``(module, layer)``, on the
        model's device.
    """
    pairs, source = _validated(model, layers, modules, corpus, n_tokens, max_len, batch_size, dtype)
    if cache_dir is False:
        folder, corpus_folder = None, corpus_cache_dir()
    else:
        folder = moments_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        corpus_folder = corpus_cache_dir(folder)
    corpus_id = source.corpus_id

    moments: dict[Pair, Tensor] = {}
    counted: int | None = None
    entries: dict[Pair, CacheEntry] = {}
    if folder is not None:
        for pair in pairs:
            entries[pair] = _cache_entry(folder, model, pair, corpus_id, n_tokens, max_len, dtype)
            hit = _read_cached(entries[pair], model.device, model.key_dim(*pair))
            if hit is not None:
                moments[pair], counted = hit
    missing = [p for p in pairs if p not in moments]
    if counted is not None and counted < n_tokens and not allow_fewer_tokens:
        raise CorpusError(
            f"the corpus {corpus_id!r} holds only {counted} tokens (cached result), fewer than "
            f"n_tokens={n_tokens}; pass allow_fewer_tokens=True to use all of it"
        )

    seconds = 0.0
    if missing:
        sequences = _sequences(
            model, source, n_tokens, max_len,
            corpus_folder, progress, allow_fewer_tokens,
        )
        counted = sum(len(s) for s in sequences)
        started = time.perf_counter()
        groups = [missing] if one_pass else [[p] for p in missing]
        for group in groups:
            top = max(l for _, l in group)
            sums = _collect(
                model, group, sequences, batch_size=batch_size, dtype=dtype, progress=progress,
                description=f"key moments of {len(group)} matrices, layers <= {top}",
            )
            for pair in group:
                moments[pair] = sums[pair] / counted
                if folder is not None:
                    _write_cached(entries[pair], moments[pair], counted)
        seconds = time.perf_counter() - started

    return SecondMoments(
        {p: moments[p] for p in pairs},
        n_tokens=counted,
        corpus_id=corpus_id,
        max_len=max_len,
        dtype=dtype,
        model_id=model.state_id,
        seconds=seconds,
    )


def second_moments_per_layer(
    model: ModelHandle,
    layers: int | Sequence[int],
    modules: str | Sequence[str] = ("mlp", "attn"),
    corpus: object = None,
    **kwargs: Any,
) -> SecondMoments:
    """:func:`second_moments` with one pass per ``(module, layer)`` and no disk cache.

    What a per-layer implementation (ROME/MEMIT's ``layer_stats``) costs: each matrix gets
    its own pass over the corpus, stopped after its layer. The numbers equal the one-pass
    result; a benchmark compares the two timings (``result.seconds``).
    """
    kwargs.setdefault("cache_dir", False)
    return second_moments(model, layers, modules, corpus, one_pass=False, **kwargs)
