"""Corpora for the key statistics: where the "preserved" keys of an edit come from.

A MEMIT-family edit keeps a matrix's answers to the keys of ordinary text unchanged by
weighting its least-squares solve with the second moment of those keys (see
:mod:`intattn_analysis.covariance`). This module turns a corpus choice into token
sequences of at most ``max_len`` tokens, and names each choice with a stable
``corpus_id`` that goes into every cache key. The id is known *before* any text is read
or sampled, so a cached statistic is found without touching the corpus.

The choices (what ``corpus=`` accepts in :func:`~intattn_analysis.covariance.second_moments`):

* ``None``: :class:`ModelSamples`, text sampled from the model itself (seed 0,
  temperature 1, from the start of a document). This is the offline default: it needs no
  network and no data files. It is not ROME's corpus: the keys are those of the model's
  own text distribution, which for an instruction-tuned model leans towards chat-like
  prose. Results name it (``corpus_id="model-samples:seed0"``). The samples themselves
  are cached on disk, so the statistics of more layers later reuse the same text. The
  package ships the samples of its embedded models (:data:`SHIPPED_SAMPLES`), so that
  every machine edits with the same statistics: sampling is floating-point arithmetic
  followed by a draw, and a different CPU may draw a different token and diverge from it.
* a path to a ``.txt`` file, or a folder searched recursively for ``.txt`` files: each
  file is one document (``corpus_id="text-files:<content hash>"``).
* ``"wikitext"`` / ``"wikipedia"``: through the ``datasets`` package, streamed, in the
  dataset's own order. ``"wikitext"`` is wikitext-103-raw-v1 (train);
  ``"wikipedia"`` is the English Wikipedia snapshot of :data:`HUB_DATASETS` (ROME and
  MEMIT used the 20220301.en snapshot of the former ``wikipedia`` loading script, which
  current ``datasets`` releases no longer run). Both need network access or a filled
  ``datasets`` cache; offline they raise :class:`CorpusError` saying what works instead.
* a list of strings: each string is one document (``corpus_id="texts:<content hash>"``).
* a :class:`TextCorpus` or :class:`ModelSamples` made by hand.

Text is tokenized with the model's own tokenizer the way prompts are: each sequence
starts with the special tokens the tokenizer puts before a text (Gemma's ``<bos>``;
nothing for SmolLM2), followed by up to ``max_len - len(prefix)`` tokens of the document.
A document longer than that is cut into consecutive chunks; the last, shorter chunk is
kept. A corpus delivers exactly ``n_tokens`` tokens in document order (the last sequence
is cut short), or all it has when it is smaller; the caller decides whether that is an
error.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .cache import CacheEntry, cache_key, canonical_json, entry_name
from .loading import EMBEDDED_MODELS, ModelHandle, write_atomic

__all__ = [
    "HUB_DATASETS",
    "SAMPLING_DTYPE",
    "SHIPPED_SAMPLES",
    "CorpusError",
    "ModelSamples",
    "TextCorpus",
    "resolve_corpus",
    "special_prefix",
]

#: ``corpus=`` names that load through ``datasets``: (hub path, configuration).
HUB_DATASETS: dict[str, tuple[str, str]] = {
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
}
#: Rows per ``generate`` call when sampling; part of :class:`ModelSamples`' identity,
#: since a different batch draws different random numbers.
SAMPLE_BATCH = 32
#: Where the package keeps model samples it ships (gzipped JSON, the cache file's name
#: prefixed with the model's cache id); read before sampling when their key matches.
SHIPPED_SAMPLES = Path(__file__).parent / "data" / "samples"
#: The dtype model samples are drawn in, whatever dtype the model is loaded in: the text
#: of a checkpoint is the same for every precision it is run in.
SAMPLING_DTYPE = torch.float32
#: Texts longer than this many characters are tokenized in pieces, split at blank lines.
_TOKENIZE_PIECE_CHARS = 1_000_000
_SAMPLES_FORMAT = 1


class CorpusError(ValueError):
    """A corpus could not be read or is unsuitable; the message says what would work."""


# =========================================================================== tokenizing
def special_prefix(model: ModelHandle) -> list[int]:
    """The special tokens the model's tokenizer puts before every text (``[]`` if none)."""
    tokenizer = model.tokenizer
    probe = "The"
    with_specials = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def _chunks(model: ModelHandle, documents: Iterable[str], max_len: int) -> Iterator[list[int]]:
    """Token sequences of at most ``max_len`` tokens, each starting with the special prefix."""
    prefix = special_prefix(model)
    body = max_len - len(prefix)
    if body < 1:
        raise ValueError(
            f"max_len={max_len} leaves no room for text after the tokenizer's "
            f"{len(prefix)} special prefix token(s); use max_len > {len(prefix)}"
        )
    for document in documents:
        for piece in _pieces(document):
            ids = model.tokenizer(piece, add_special_tokens=False)["input_ids"]
            for first in range(0, len(ids), body):
                yield prefix + list(ids[first : first + body])


def _pieces(text: str) -> Iterator[str]:
    """``text`` in parts of at most about ``_TOKENIZE_PIECE_CHARS`` characters."""
    if not text or text.isspace():
        return
    if len(text) <= _TOKENIZE_PIECE_CHARS:
        yield text
        return
    piece: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if piece and size + len(paragraph) > _TOKENIZE_PIECE_CHARS:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if piece:
        yield "\n\n".join(piece)


def _take(sequences: Iterable[list[int]], n_tokens: int) -> list[list[int]]:
    """Sequences in order until they hold ``n_tokens`` tokens (the last one cut short)."""
    taken: list[list[int]] = []
    count = 0
    for sequence in sequences:
        if not sequence:
            continue
        sequence = sequence[: n_tokens - count]
        taken.append(sequence)
        count += len(sequence)
        if count >= n_tokens:
            break
    return taken


# =========================================================================== text corpora
@dataclass(frozen=True)
class TextCorpus:
    """Documents of text, read lazily; ``corpus_id`` must change whenever the text does.

    ``documents`` is called each time sequences are needed and returns an iterable of
    strings, one per document. Reading stops as soon as enough tokens are gathered, so a
    large dataset is only read as far as it is used.
    """

    corpus_id: str
    documents: Callable[[], Iterable[str]]
    description: str = ""

    def sequences(
        self, model: ModelHandle, n_tokens: int, max_len: int, **_: object
    ) -> list[list[int]]:
        """Up to ``n_tokens`` tokens of the corpus as sequences of at most ``max_len``."""
        return _take(_chunks(model, self.documents(), max_len), n_tokens)

    def __repr__(self) -> str:
        described = f", {self.description!r}" if self.description else ""
        return f"TextCorpus({self.corpus_id!r}{described})"


def _hash_texts(texts: Iterable[str | bytes]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8") if isinstance(text, str) else text
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def _text_files(path: Path) -> TextCorpus:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"the corpus folder {str(path)!r} holds no .txt files")
    else:
        raise CorpusError(
            f"corpus {str(path)!r} is neither a file nor a folder; pass a .txt file, a folder "
            f"of .txt files, one of {sorted(HUB_DATASETS)}, a list of strings, or None for "
            "text sampled from the model"
        )
    names = [str(f.relative_to(path)) if path.is_dir() else f.name for f in files]
    digest = _hash_texts(
        part for name, f in zip(names, files) for part in (name, f.read_bytes())
    )

    def documents() -> Iterator[str]:
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")

    return TextCorpus(f"text-files:{digest}", documents, f"{len(files)} file(s) under {path}")


def _hub_dataset(name: str) -> TextCorpus:
    hub_path, config = HUB_DATASETS[name]

    def documents() -> Iterator[str]:
        offline = (
            "Offline, pass a local .txt file or folder (corpus='path/to/texts'), a list of "
            f"strings, or corpus=None for text sampled from the model itself."
        )
        try:
            import datasets
        except ImportError:
            raise CorpusError(
                f"corpus={name!r} needs the `datasets` package (pip install datasets). {offline}"
            ) from None
        try:
            rows = datasets.load_dataset(hub_path, config, split="train", streaming=True)
            iterator = iter(rows)
            first = next(iterator)
        except Exception as error:  # network, hub and format errors all end here
            raise CorpusError(
                f"could not load corpus {name!r} ({hub_path}, {config}) through `datasets` "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"It needs network access or a filled datasets cache. {offline}"
            ) from error
        yield first["text"]
        for row in iterator:
            yield row["text"]

    return TextCorpus(f"{name}:{config}:train", documents, f"{hub_path} ({config}), train split")


def _strings(texts: Sequence[str]) -> TextCorpus:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise CorpusError(
            f"a corpus list must hold strings; items {bad[:5]} are "
            f"{sorted({type(texts[i]).__name__ for i in bad})}"
        )
    texts = list(texts)
    return TextCorpus(f"texts:{_hash_texts(texts)}", lambda: iter(texts), f"{len(texts)} texts")


# =========================================================================== model samples
@dataclass(frozen=True)
class ModelSamples:
    """Text sampled from the model itself: the offline default corpus.

    Sequences are drawn at temperature 1 with no top-k / top-p truncation, in batches of
    ``batch`` rows, from the start of a document: the tokenizer's own special prefix where
    it has one (Gemma's ``<bos>``), else its BOS token, else its end-of-text token. Batch
    ``i`` is seeded with ``(seed, i)``, so the first ``n`` tokens are the same whatever
    total is asked for; a sequence ends at the first end-of-sequence token (which is not
    kept) or after ``max_len`` tokens. The stored sequence is the tokenizer's special
    prefix followed by the sampled tokens, the form in which a text of the model's would
    be fed back to it.

    The text is the checkpoint's, in float32: sampling uses a fresh, unwrapped copy of
    the Hugging Face model reloaded from the same checkpoint in float32, whatever dtype
    the model was loaded in and whatever edits are applied to it (booting the
    TransformerLens bridge wraps the model's modules in place, and ``generate`` on the
    wrapped model reuses its key-value cache incorrectly). So a model loaded in bfloat16
    reads the same text as in float32, and its second moments differ from float32's only
    by its own arithmetic (the precision policy of ``docs/design.md``). Where the
    checkpoint cannot be reloaded the bridge samples instead, recomputing every prefix
    (correct, but quadratic in ``max_len``); it gives the checkpoint's text only from an
    unedited float32 model and refuses any other with a :class:`CorpusError`. The
    samples are cached per ``(checkpoint, seed, batch, max_len)`` and extended when more
    tokens are asked for.

    Shipped samples (:data:`SHIPPED_SAMPLES`, under the cache file's name) come first when
    they hold enough tokens and their key (the checkpoint, float32, seed, batch,
    ``max_len``) is the one asked for: then no sampling runs and the text is the same on
    every machine. Asked for more than they hold, the samples are extended from the
    shipped rows, since batch ``i``'s seed does not depend on the total.
    """

    seed: int = 0
    batch: int = SAMPLE_BATCH

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ModelSamples seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"ModelSamples batch must be a positive integer, got {self.batch!r}")

    @property
    def corpus_id(self) -> str:
        suffix = "" if self.batch == SAMPLE_BATCH else f":batch{self.batch}"
        return f"model-samples:seed{self.seed}{suffix}"

    @property
    def description(self) -> str:
        return f"text sampled from the model (seed {self.seed}, temperature 1, batch {self.batch})"

    def sequences(
        self,
        model: ModelHandle,
        n_tokens: int,
        max_len: int,
        *,
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> list[list[int]]:
        """The first ``n_tokens`` sampled tokens as sequences of at most ``max_len``."""
        prefix = special_prefix(model)
        if max_len <= len(prefix):
            raise ValueError(
                f"max_len={max_len} leaves no room for sampled text after the tokenizer's "
                f"{len(prefix)} special prefix token(s); use max_len > {len(prefix)}"
            )
        entry = None if cache_dir is None else self._cache_entry(Path(cache_dir), model, max_len)
        key = self._cache_key(model, max_len)
        rows: list[list[int]] = []
        if entry is not None:
            stored = entry.read_json(_check_rows)
            rows = [] if stored is None else stored["rows"]
        shipped = _read_samples(self.shipped_file(model, max_len), key) or []
        if sum(len(r) for r in shipped) >= min(n_tokens, sum(len(r) for r in rows) + 1):
            rows = shipped  # the shipped text wins over this machine's when it is enough
        have = sum(len(r) for r in rows)
        if have < n_tokens:
            for batch_rows in self._sample(model, max_len, prefix, n_tokens, rows, progress):
                rows = rows + batch_rows
                if entry is not None:  # after every batch: an interrupted run keeps its work
                    entry.write_json({"rows": rows})
        return _take(rows, n_tokens)

    def ship(
        self,
        model: ModelHandle,
        n_tokens: int,
        max_len: int,
        *,
        cache_dir: Path,
        progress: bool = True,
    ) -> tuple[Path, int, int]:
        """Write the first ``n_tokens`` sampled tokens to :meth:`shipped_file`, so that every
        machine reads this text instead of drawing its own.

        It samples first where neither ``cache_dir`` nor the shipped file holds enough.
        Whole sampled rows are kept (empty ones too), up to a whole sampling batch past
        ``n_tokens``, so that a later request for more tokens continues them exactly as
        sampling would. Returns the file, the tokens and the rows written.
        """
        self.sequences(model, n_tokens, max_len, cache_dir=cache_dir, progress=progress)
        key = self._cache_key(model, max_len)
        rows = _read_samples(self._cache_file(Path(cache_dir), model, max_len), key)
        if rows is None:  # the shipped file alone held enough and nothing was cached
            rows = _read_samples(self.shipped_file(model, max_len), key)
        if rows is None:
            raise CorpusError(f"no sampled rows stored for {model.name} (max_len={max_len})")
        kept, count = [], 0
        for row in rows:
            if count >= n_tokens and len(kept) % self.batch == 0:
                break
            kept.append(row)
            count += len(row)
        path = self.shipped_file(model, max_len)

        def write(staging: str) -> None:
            with gzip.open(staging, "wt") as fh:
                json.dump({"key": key, "rows": kept}, fh, separators=(",", ":"))

        write_atomic(path, write)  # a killed writer never leaves a truncated shipped file
        return path, count, len(kept)

    # ------------------------------------------------------------------ internals
    def _fields(self, max_len: int) -> dict:
        return {"format": _SAMPLES_FORMAT, "corpus": self.corpus_id, "max_len": max_len}

    def _cache_key(self, model: ModelHandle, max_len: int) -> dict:
        """The fields of these samples' cache entry (the key stored in the entry and in a
        shipped file): the checkpoint (``cache_id``: no edits) and :data:`SAMPLING_DTYPE`,
        the dtype the text is sampled in whatever the model's own, in the fields and
        order of :func:`intattn_analysis.cache.entry_fields`."""
        return json.loads(canonical_json({"model": model.cache_id, "dtype": str(SAMPLING_DTYPE),
                                          **self._fields(max_len)}))

    def _cache_entry(self, cache_dir: Path, model: ModelHandle, max_len: int) -> CacheEntry:
        key = self._cache_key(model, max_len)
        name = f"{entry_name(key, self._label(max_len))}.json"
        return CacheEntry(Path(cache_dir) / model.cache_folder / name, key, "corpus samples")

    def _label(self, max_len: int) -> str:
        return f"samples-seed{self.seed}-batch{self.batch}-len{max_len}"

    def _cache_file(self, cache_dir: Path, model: ModelHandle, max_len: int) -> Path:
        return self._cache_entry(cache_dir, model, max_len).path

    def shipped_file(self, model: ModelHandle, max_len: int) -> Path:
        """Where the package ships these samples, or would ship them (see
        :data:`SHIPPED_SAMPLES`): the shipped file named
        ``<model cache folder>--<label>-<16 hex digits>.json.gz`` whose stored key is
        these samples' key, else that name with the digits of the cache key."""
        key = self._cache_key(model, max_len)
        prefix = f"{model.cache_folder}--{self._label(max_len)}-"
        for candidate in sorted(SHIPPED_SAMPLES.glob(glob.escape(prefix) + "*.json.gz")):
            if _read_samples(candidate, key) is not None:
                return candidate
        return SHIPPED_SAMPLES / f"{prefix}{cache_key(key)}.json.gz"

    def _sample(
        self,
        model: ModelHandle,
        max_len: int,
        prefix: list[int],
        n_tokens: int,
        rows: list[list[int]],
        progress: bool,
    ) -> Iterator[list[list[int]]]:
        """Batches of rows sampled after the ``len(rows) // batch`` held, until ``n_tokens``."""
        stops = _stop_ids(model)
        start = prefix or [
            i for i in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id) if i is not None
        ][:1]
        if not start:
            raise CorpusError(
                f"the tokenizer of {model.name!r} has no BOS or EOS token to start sampling "
                "from; pass a text corpus instead"
            )
        n_new = max_len - len(prefix)
        generate = _hf_sampler(model, start, n_new, stops)
        have = sum(len(r) for r in rows)
        bar = tqdm(
            total=n_tokens, initial=min(have, n_tokens), unit="tok",
            desc=f"sampling corpus from {model.name}", disable=not progress,
        )
        batch_index = len(rows) // self.batch
        devices = [model.device] if model.device.type == "cuda" else []
        with bar, torch.random.fork_rng(devices=devices):
            while have < n_tokens:
                torch.manual_seed(self.seed * 1_000_003 + batch_index)
                batch_rows = []
                for row in generate(self.batch).tolist():
                    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                    batch_rows.append(prefix + row[:cut] if cut else [])
                    have += len(batch_rows[-1])
                bar.update(max(0, min(have, n_tokens) - bar.n))
                batch_index += 1
                yield batch_rows

    def __repr__(self) -> str:
        return f"ModelSamples(seed={self.seed}, batch={self.batch})"


def _stop_ids(model: ModelHandle) -> set[int]:
    stops = {model.tokenizer.eos_token_id}
    configured = getattr(getattr(model.hf_model, "generation_config", None), "eos_token_id", None)
    stops |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {int(s) for s in stops if s is not None}


def _hf_sampler(
    model: ModelHandle, start: list[int], n_new: int, stops: set[int]
) -> Callable[[int], torch.Tensor]:
    """``generate(rows) -> [rows, n_new]`` sampled token ids (after EOS: anything)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    source = getattr(model.hf_model.config, "name_or_path", None) or model.name
    kwargs: dict = {"dtype": SAMPLING_DTYPE}
    if model.name not in EMBEDDED_MODELS and model.revision is not None:
        kwargs["revision"] = model.revision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        sampler.to(model.device).eval()
    except Exception as error:  # any reload failure: fall back to the (slow) bridge
        if model.dtype != SAMPLING_DTYPE or model.open_edits:
            state = "edited" if model.open_edits else f"loaded in {model.dtype}"
            raise CorpusError(
                f"could not reload {source!r} to sample its text in float32 ({type(error).__name__}: "
                f"{error}), and {model.name} is {state}, so sampling through it would not give the "
                "checkpoint's text. Sample once from the checkpoint loaded unedited in float32 (the "
                "samples are cached and read by every dtype), or pass a text corpus"
            ) from None
        warnings.warn(
            f"could not reload {source!r} for sampling ({type(error).__name__}: {error}); "
            "sampling through the TransformerLens bridge without a key-value cache (slow)",
            stacklevel=3,
        )
        return _bridge_sampler(model, start, n_new)
    pad = model.tokenizer.pad_token_id
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new,
        min_new_tokens=0, eos_token_id=sorted(stops),
        pad_token_id=pad if pad is not None else sorted(stops)[0],
    )
    prompt = torch.tensor([start], device=model.device)

    @torch.no_grad()
    def generate(rows: int) -> torch.Tensor:
        ids = prompt.expand(rows, -1)
        out = sampler.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
        return out[:, ids.shape[1] :].cpu()

    return generate


def _bridge_sampler(
    model: ModelHandle, start: list[int], n_new: int
) -> Callable[[int], torch.Tensor]:
    @torch.no_grad()
    def generate(rows: int) -> torch.Tensor:
        ids = torch.tensor([start] * rows, device=model.device)
        for _ in range(n_new):
            probs = torch.softmax(model.bridge(ids)[:, -1].double(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs.cpu(), 1).to(ids.device)], dim=1)
        return ids[:, len(start) :].cpu()

    return generate


# =========================================================================== disk


def _check_rows(stored: dict) -> None:
    """Refuses stored samples that are not rows of token ids."""
    rows = stored["rows"]
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and all(isinstance(t, int) for t in r) for r in rows
    ):
        raise ValueError("'rows' is not a list of token id lists")


def _read_samples(path: Path, key: dict) -> list[list[int]] | None:
    """The rows stored at ``path`` (plain or gzipped JSON) if its key is ``key``, else None
    (a shipped file for another key, or none: nothing to warn about)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            payload = json.load(fh)
    except (OSError, ValueError, EOFError):
        return None
    if payload.get("key") != key:
        return None
    return payload.get("rows")


# =========================================================================== resolving
def resolve_corpus(corpus: object) -> "TextCorpus | ModelSamples":
    """The corpus object for a ``corpus=`` argument (see the module notes for the choices)."""
    if corpus is None:
        return ModelSamples()
    if isinstance(corpus, (TextCorpus, ModelSamples)):
        return corpus
    if isinstance(corpus, str) and corpus in HUB_DATASETS:
        return _hub_dataset(corpus)
    if isinstance(corpus, (str, os.PathLike)):
        return _text_files(Path(corpus))
    if isinstance(corpus, (list, tuple)):
        if not corpus:
            raise CorpusError("the corpus list is empty; pass at least one text")
        return _strings(corpus)
    raise CorpusError(
        f"corpus must be None (text sampled from the model), a path to a .txt file or a "
        f"folder of them, one of {sorted(HUB_DATASETS)}, a list of strings, or a "
        f"TextCorpus / ModelSamples; got {type(corpus).__name__}"
    )
