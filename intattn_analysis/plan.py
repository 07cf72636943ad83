"""A paper-scale run planned before it is run: its units, the memory each needs, and its time.

``intattn plan --model ID_OR_DIR --experiment NAME`` works from the model's configuration
alone (a ``config.json``; no weights are read). The package ships the configurations of
its embedded models and of the paper's 7B models (:data:`SHIPPED_CONFIGS`), so that their
plans need nothing else.

* **Units.** A paper-scale run's units are those of the reference model's paper-scale run
  in the committed store (:data:`REFERENCE_MODEL`): the same batches, methods, alphas and
  facts per unit. The unit structure does not depend on the model, except where the facts
  are the ones a model knows (``localization``, and the known facts of ``sequential`` and
  ``outdated``): there the reference model's count stands in.
* **Memory** per unit, from the shapes (:func:`unit_memory`): the weights; the second
  moments the method keeps (float32, one matrix per edited layer and module) and the
  projector AlphaEdit adds; the float64 solve; a forward of
  :data:`~intattn_analysis.tracing.DEFAULT_TOKENS_PER_BATCH` tokens with its full-vocabulary
  logits; and the target optimisation's forward and backward. The weights, moments and
  projectors are exact (a test compares them with the tensors of the embedded models);
  activations are estimates, with the factors named in :func:`unit_memory`.
* **Time**, from measured per-unit costs scaled by FLOPs: each unit's seconds in the
  reference store, times the ratio of the two models' forward FLOPs per token, times the
  ratio of the reference machine's measured rate (:data:`REFERENCE_RATE`) to the device's
  (its peak for the dtype times :data:`UTILISATION`). An estimate to plan GPU-hours by,
  within a factor of about two, not a promise.

A plan whose largest unit does not fit the device's memory is refused, naming the unit, the
gigabytes it needs and the ways out (a smaller dtype, more devices, a larger device).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

__all__ = ["DEVICES", "Device", "ModelShape", "PlanDoesNotFit", "REFERENCE_MODEL", "REFERENCE_RATE",
           "SHIPPED_CONFIGS", "UTILISATION", "model_config", "plan", "reference_units", "summary", "unit_memory"]

#: The configurations the package ships (``<owner>--<name>.json``; no weights).
SHIPPED_CONFIGS = Path(__file__).parent / "data" / "configs"
#: The model whose committed paper-scale store gives a plan its units and measured seconds.
REFERENCE_MODEL = "smollm2-135m"
#: The reference machine's effective rate, FLOP/s: the 2-CPU-thread machine that computed
#: the committed store. Measured with ``benchmarks/bench_tracing.py``'s plain batched
#: forward and ``run_forward_backward`` on SmolLM2: 95 GFLOP/s for a forward of 80 tokens,
#: 176 GFLOP/s for 640 tokens. The units mix both sizes; 1.2e11 is between them.
REFERENCE_RATE = 1.2e11
#: The share of a GPU's peak FLOP/s the plan assumes for these workloads (short prompts,
#: float64 solves on the side): the ratio to plan by, not a measurement of this package.
UTILISATION = 0.3
GIB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Device:
    """A device a plan is checked against: its memory (GiB) and its peak dense FLOP/s per
    weight dtype, from the vendor's data sheets: tensor cores for bfloat16/float16, plain
    FP32 for float32 (the package leaves PyTorch's default, no TF32 matmuls)."""

    name: str
    memory_gib: float
    peak_flops: Mapping[str, float]


#: Devices by ``--device`` name (SXM parts, dense, without sparsity).
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("a100-40gb", 40, {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    Device("a100-80gb", 80, {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    Device("h100-80gb", 80, {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
)}


class PlanDoesNotFit(ValueError):
    """The largest unit of a plan needs more memory than the device has; ``table`` is the
    plan as it would be without the device's limit."""

    def __init__(self, message: str, table: "pd.DataFrame | None" = None) -> None:
        super().__init__(message)
        self.table = table


# =========================================================================== shapes
def model_config(model: str) -> dict:
    """The configuration of ``model``: a directory's ``config.json``, a ``config.json``
    path, or a shipped configuration by hub id or embedded name (:data:`SHIPPED_CONFIGS`).
    Multimodal configurations give their text model's (``text_config``)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = SHIPPED_CONFIGS / f"{model.replace('/', '--')}.json"
    if not path.is_file():
        shipped = sorted(p.stem.replace("--", "/") for p in SHIPPED_CONFIGS.glob("*.json"))
        raise ValueError(f"--model {model!r}: no config.json there and no shipped configuration of that name "
                         f"(shipped: {shipped}); give a directory holding the model's config.json")
    config = json.loads(path.read_text())
    return config.get("text_config") or config


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a decoder: its widths and counts (``attn_width`` is the
    attention output projection's input, ``n_heads * head_dim``)."""

    name: str
    model_type: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    norms_per_layer: int
    qk_norm: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any], name: str = "") -> "ModelShape":
        """The shape of a Llama-family configuration (Llama, Mistral, Qwen2, Gemma-3);
        another family is an error naming the ones planned."""
        kind = config.get("model_type", "")
        families = ("llama", "mistral", "qwen2", "gemma3_text", "gemma3")
        if kind not in families:
            raise ValueError(f"model_type {kind!r} is not planned; plans cover {list(families)}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in config]
        if missing:
            raise ValueError(f"the configuration of {name or 'the model'} lacks {missing}")
        d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        gemma = kind.startswith("gemma3")
        return cls(name=name, model_type=kind, n_layers=int(config["num_hidden_layers"]), d_model=d,
                   d_mlp=int(config["intermediate_size"]), n_heads=heads,
                   n_kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or d // heads), vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", gemma)),
                   qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
                   norms_per_layer=4 if gemma else 2, qk_norm=gemma)

    @property
    def attn_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attention = d * self.attn_width + 2 * d * kv + self.attn_width * d
        if self.qkv_bias:
            attention += self.attn_width + 2 * kv
        if self.qk_norm:
            attention += 2 * self.head_dim
        return attention + 3 * d * self.d_mlp + self.norms_per_layer * d

    @property
    def n_params(self) -> int:
        """Every parameter: embeddings (twice when the unembedding is not tied), layers,
        final norm."""
        embeddings = self.vocab * self.d_model * (1 if self.tied else 2)
        return embeddings + self.n_layers * self.layer_params + self.d_model

    @property
    def flops_per_token(self) -> float:
        """Forward FLOPs per token: two per weight of the layers and of the unembedding (the
        embedding lookup is free; attention scores over prompts of tens of tokens are left
        out)."""
        return 2.0 * (self.n_layers * self.layer_params + self.vocab * self.d_model)


# =========================================================================== memory
def unit_memory(shape: ModelShape, kind: str, method: str | None, hp=None, *,
                dtype: str = "float32") -> dict[str, float]:
    """Bytes one unit needs, by part (and ``total``):

    * ``weights``: every parameter at ``dtype``; for the ``moments`` kind in half precision,
      also every parameter in float32, since the default corpus is sampled from the float32
      checkpoint loaded beside the model (:class:`intattn_analysis.corpus.ModelSamples`);
    * ``moments``: the second moments the edit keeps, float32: one ``d_mlp``-square matrix
      per edited MLP layer (MEMIT, IntAttn-Edit, PMET, AlphaEdit, ROME) and one
      ``attn_width``-square matrix per edited attention layer (IntAttn-Edit, PMET), plus
      AlphaEdit's projector (one ``d_mlp`` square per layer);
    * ``solve``: three float64 matrices of the widest edited key (the moments, the system
      and its factor);
    * ``optimizer``: FT-L and FT-M's tuned matrix per layer (the MLP's output projection, or
      attention's with ``module="attn"``) four more times at ``dtype``: its gradient, two
      Adam moments and the copy kept to restore it;
    * ``forward``: a forward of :data:`~intattn_analysis.tracing.DEFAULT_TOKENS_PER_BATCH`
      tokens: per token, the residual and attention output (4 x d_model) and the MLP's
      hidden state (2 x d_mlp) at ``dtype``, and float32 logits over the vocabulary;
    * ``targets``: the target optimisation's forward and backward over each fact's prompts
      (``n_context_templates + 1`` of them, 32 tokens each), keeping every layer's
      activations for the backward (6 x d_model + 3 x d_mlp per token and layer) and the
      logits and their gradient.
    """
    from .tracing import DEFAULT_TOKENS_PER_BATCH

    width = _BYTES[dtype]
    parts = {"weights": shape.n_params * width, "moments": 0.0, "solve": 0.0, "optimizer": 0.0, "targets": 0.0}
    if kind == "moments" and dtype != "float32":
        parts["weights"] += shape.n_params * 4  # the float32 sampler of the corpus text
    tokens = DEFAULT_TOKENS_PER_BATCH
    parts["forward"] = tokens * ((4 * shape.d_model + 2 * shape.d_mlp) * width + 4 * shape.vocab)
    if kind in ("edit", "round") and method is not None and hp is not None:
        layers = len(getattr(hp, "layers", ()) or ())
        if method in ("memit", "intattn", "pmet", "alphaedit", "rome"):
            parts["moments"] = layers * shape.d_mlp ** 2 * 4
            widest = shape.d_mlp
            if method in ("intattn", "pmet"):
                parts["moments"] += layers * shape.attn_width ** 2 * 4
                widest = max(widest, shape.attn_width)
            if method == "alphaedit":
                parts["moments"] += layers * shape.d_mlp ** 2 * 4
            parts["solve"] = 3 * widest ** 2 * 8
        if method in ("ft-l", "ft-m"):
            inner = shape.attn_width if getattr(hp, "module", "mlp") == "attn" else shape.d_mlp
            parts["optimizer"] = layers * shape.d_model * inner * width * 4
        prompts = int(getattr(hp, "n_context_templates", 5) or 5) + 1
        z_tokens = prompts * 32
        per_token = shape.n_layers * (6 * shape.d_model + 3 * shape.d_mlp) * width + 2 * 4 * shape.vocab
        parts["targets"] = z_tokens * per_token
    parts["total"] = sum(parts.values())
    return parts


# =========================================================================== plan
def reference_units(experiment: str, store_root) -> pd.DataFrame:
    """The reference model's paper-scale units of ``experiment``: kind, method, facts and
    measured seconds of each."""
    from .experiments.store import KEY_FIELD, ResultStore

    rows = []
    for uid, first in ResultStore(store_root, experiment).first_rows().items():
        if first.get("model") != REFERENCE_MODEL:
            continue
        key = first.get(KEY_FIELD, {})
        kind = key.get("unit") or ("trace" if "variant" in key else "other")
        rows.append({"unit": uid, "kind": kind, "method": key.get("method") if kind != "trace" else
                     key.get("method", "exact"), "dataset": first.get("dataset"),
                     "n_facts": key.get("rounds_of") or key.get("n_facts") or key.get("batch_size"),
                     "seconds": first.get("seconds")})
    return pd.DataFrame(rows, columns=["unit", "kind", "method", "dataset", "n_facts", "seconds"])


def plan(model: str, experiment: str, *, dtype: str = "float32", device: str | None = None,
         memory_gib: float | None = None, store_root=None, units: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper-scale plan of ``experiment`` on ``model`` (a configuration, see
    :func:`model_config`): one row per kind of unit (dataset, kind, method, facts per
    unit), with
    the number of units, the GiB one unit needs (by part and in all), the reference
    model's measured hours for those units, and the estimated hours on ``device`` (or, with
    no device, on the reference machine). Raises :class:`PlanDoesNotFit` when a unit needs
    more than the device's memory (or ``memory_gib``). ``units``: the reference units
    already read (:func:`reference_units`), for several plans of one experiment."""
    from .experiments import experiment as experiment_module
    from .hparams import hparams_for
    from .plots import results_dir

    experiment_module(experiment)  # the name is checked first
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
    if device is not None and device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)} (or give memory_gib), got {device!r}")
    shape = ModelShape.from_config(model_config(model), model)
    reference = ModelShape.from_config(model_config(REFERENCE_MODEL), REFERENCE_MODEL)
    root = Path(store_root) if store_root is not None else results_dir() / "paper" / "store"
    units = reference_units(experiment, root) if units is None else units
    if units.empty:
        raise ValueError(f"the reference store {root} holds no {REFERENCE_MODEL} units of {experiment}; run "
                         f"`intattn run {experiment} --model {REFERENCE_MODEL} --scale paper` first")
    rate = DEVICES[device].peak_flops[dtype] * UTILISATION if device else REFERENCE_RATE
    scale = shape.flops_per_token / reference.flops_per_token * REFERENCE_RATE / rate
    rows = []
    for (dataset, kind, method, n_facts), group in units.groupby(["dataset", "kind", "method", "n_facts"],
                                                                 dropna=False, sort=True):
        hp = None
        if isinstance(method, str) and kind in ("edit", "round"):
            hp = hparams_for(model, method, n_layers=shape.n_layers)
        memory = unit_memory(shape, kind, method if isinstance(method, str) else None, hp, dtype=dtype)
        seconds = pd.to_numeric(group["seconds"], errors="coerce")
        rows.append({"dataset": dataset, "kind": kind, "method": method if isinstance(method, str) else "",
                     "n_facts": None if pd.isna(n_facts) else int(n_facts), "units": len(group),
                     **{f"{part}_gib": value / GIB for part, value in memory.items()},
                     # units without a measured time (exact traces, assembled from a per-fact cache)
                     # take their group's mean; a group with none timed has no estimate
                     "reference_hours": seconds.mean() * len(group) / 3600, "timed_units": int(seconds.notna().sum()),
                     "hours": seconds.mean() * len(group) * scale / 3600})
    rows.extend(_moments_rows(shape, model, sorted({m for m in units["method"] if isinstance(m, str)}), dtype, rate))
    table = pd.DataFrame(rows)
    limit = memory_gib if memory_gib is not None else DEVICES[device].memory_gib if device else None
    if limit is not None:
        worst = table.loc[table["total_gib"].idxmax()]
        sampler = ("give the second moments a text corpus (then no float32 copy of the model samples one), "
                   if worst["kind"] == "second moments" and dtype != "float32" else "")
        if worst["total_gib"] > limit:
            raise PlanDoesNotFit(
                f"{experiment} on {model} in {dtype}: the {worst['kind']} unit"
                f"{' of ' + worst['method'] if worst['method'] else ''} needs {worst['total_gib']:.1f} GiB "
                f"(weights {worst['weights_gib']:.1f}, moments {worst['moments_gib']:.1f}, solve "
                f"{worst['solve_gib']:.1f}, optimizer {worst['optimizer_gib']:.1f}, forward {worst['forward_gib']:.1f}, "
                f"targets {worst['targets_gib']:.1f}) "
                f"and {device if memory_gib is None and device else 'the device'} has {limit:g} GiB; "
                f"{'use --dtype bfloat16, ' if dtype == 'float32' else ''}{sampler}"
                "shard the model over more devices (load_model(n_devices=...)) or use a larger device", table)
    return table


def _moments_rows(shape: ModelShape, model: str, methods, dtype: str, rate: float) -> list[dict]:
    """One row per corpus size the methods' second moments need: the forward over the
    corpus sample (``mom2_n_tokens``), once per model and cached for every later run. Its
    hours are forward FLOPs at the device's rate; where the corpus is sampled from the
    model (the offline default), sampling it costs at least as much again."""
    from .editors import EDITORS
    from .hparams import hparams_for

    sizes: dict[int, list[str]] = {}
    for method in methods:
        # a trace's method (exact, attribution) edits nothing; fine-tuning reads no moments
        if method not in EDITORS or EDITORS[method].moments is None:
            continue
        hp = hparams_for(model, method, n_layers=shape.n_layers)
        tokens = getattr(hp, "mom2_n_tokens", None)
        if tokens:
            sizes.setdefault(int(tokens), []).append(method)
    rows = []
    for tokens, named in sorted(sizes.items()):
        memory = unit_memory(shape, "moments", None, dtype=dtype)
        rows.append({"dataset": "corpus", "kind": "second moments", "method": ", ".join(named), "n_facts": None,
                     "units": 1,
                     **{f"{part}_gib": value / GIB for part, value in memory.items()},
                     "reference_hours": float("nan"), "timed_units": 0,
                     "hours": tokens * shape.flops_per_token / rate / 3600, "corpus_tokens": tokens})
    return rows


def summary(table: pd.DataFrame) -> dict[str, float]:
    """A plan's totals: units, the largest unit's GiB, the estimated hours (of the units
    that have an estimate) and ``untimed``, the units without one."""
    timed = table["hours"].notna()
    return {"units": int(table["units"].sum()), "peak_gib": float(table["total_gib"].max()),
            "hours": float(table.loc[timed, "hours"].sum()), "untimed": int(table.loc[~timed, "units"].sum())}
