"""Model access: how the package reads a model's activations and runs part of a forward.

Causal tracing (:mod:`intattn_analysis.tracing`), the edit targets
(:mod:`intattn_analysis.targets`), the key statistics (:mod:`intattn_analysis.covariance`)
and the metrics (:mod:`intattn_analysis.metrics`) all work on a model through the hooks of
its TransformerLens bridge. What they share lives here, once:

* **Hook names.** Per-layer names come from :func:`hook` (the vocabulary of
  :mod:`intattn_analysis.architectures`, re-exported here). :data:`FINAL_NORM_HOOK` is the
  final norm's output, the input of the unembedding; :func:`attention_key_hook` and
  :func:`attention_value_hook` name the attention keys and values, which seed the
  key-value cache of a resumed forward.
* **Reading activations.** :func:`read_hooks` runs one forward and returns what the named
  hooks saw, stopping the forward (with :class:`StopForward`) as soon as the last of them
  has fired; :func:`key_value_hooks` and :func:`key_values` name and collect the keys and
  values of a range of blocks.
* **Writing activations.** :func:`noise_draws` draws a fact's seeded subject noise and
  :func:`noise_hook` adds it to a span of positions (the corruption of causal tracing and
  of attribution patching); :func:`gradient_node_hook` makes an activation a node whose
  gradient attribution patching reads; :func:`overwrite_hook` writes given values at given
  ``(row, position)`` pairs (the restores of causal tracing).
* **Resuming a forward.** A forward can start at block ``start`` from a stored residual
  stream (``bridge(resid, start_at_layer=start)``, with the blocks below skipped by
  :func:`blocks_skipped`) and, given the keys and values of earlier positions, at a later
  position (:func:`prefix_kwargs`, :func:`padded_prefix_kwargs`). :func:`resume_engine`
  checks once per model which of these shortcuts reproduce a full forward;
  :func:`resumed_logits` and :func:`resume` run the resumed forward.
* **Backward passes in float16.** :func:`initial_loss_scale` is the factor a loss is
  multiplied by before a backward pass through a float16 model (and each gradient
  divided by after it), so that small gradients do not flush to zero.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .architectures import HOOKS, OPTIONAL_HOOKS, hook
from .loading import ModelHandle

__all__ = [
    "FINAL_NORM_HOOK",
    "HOOKS",
    "KEY_HOOKS",
    "OPTIONAL_HOOKS",
    "ResumeEngine",
    "StopForward",
    "attention_key_hook",
    "attention_value_hook",
    "blocks_skipped",
    "cache_keyword",
    "initial_loss_scale",
    "hook",
    "gradient_node_hook",
    "keep_last_position",
    "key_value_hooks",
    "key_values",
    "noise_draws",
    "noise_hook",
    "overwrite_hook",
    "padded_prefix_kwargs",
    "prefix_kwargs",
    "read_hooks",
    "resume",
    "resume_engine",
    "resumed_logits",
]

# =========================================================================== hook names
#: The final norm's output, which the unembedding reads: a hook here can cut the
#: positions that are unembedded. Not every bridge has it; check ``hook_dict`` first.
FINAL_NORM_HOOK = hook("final_norm")
#: The attention key hooks, in the order they are tried (keys of
#: :data:`~intattn_analysis.architectures.OPTIONAL_HOOKS`): after the rotary embedding
#: where the model has one, else the plain keys.
KEY_HOOKS: tuple[str, ...] = ("attn_rot_k", "attn_k")


def attention_key_hook(model: ModelHandle, layer: int) -> str:
    """The hook that sees the attention keys of block ``layer`` as the key-value cache
    holds them (``[batch, pos, kv_heads, d_head]``, after any rotary embedding).

    Raises ``KeyError`` where the bridge has none of :data:`KEY_HOOKS` at that layer.
    """
    for name in KEY_HOOKS:
        full = hook(name, layer)
        if full in model.bridge.hook_dict:
            return full
    templates = tuple(OPTIONAL_HOOKS[n] for n in KEY_HOOKS)
    raise KeyError(f"no attention key hook among {templates} at layer {layer}")


def attention_value_hook(layer: int) -> str:
    """The hook that sees the attention values of block ``layer``
    (``[batch, pos, kv_heads, d_head]``)."""
    return hook("attn_v", layer)


def key_value_hooks(model: ModelHandle, layers: Iterable[int]) -> list[str]:
    """The key hooks of ``layers``, then their value hooks: what a forward must record
    so that a later forward can resume after its positions (see :func:`key_values`)."""
    layers = list(layers)
    return [*(attention_key_hook(model, l) for l in layers), *(attention_value_hook(l) for l in layers)]


def key_values(
    model: ModelHandle, activations, layers: Iterable[int]
) -> list[tuple[Tensor, Tensor]]:
    """``[(keys, values), ...]`` of ``layers`` taken from ``activations`` (a mapping from
    hook name to tensor, such as an activation cache or :func:`read_hooks`' result that
    recorded :func:`key_value_hooks`), in the order :func:`prefix_kwargs` reads them."""
    return [(activations[attention_key_hook(model, l)], activations[attention_value_hook(l)]) for l in layers]


# =========================================================================== reading
class StopForward(Exception):
    """Raised from a hook once everything a forward was run for has been seen: it ends
    the forward there, so that the layers above and the unembedding never run. The code
    that started the forward catches it."""


@torch.no_grad()
def read_hooks(model: ModelHandle, ids: Tensor, names: Sequence[str], select=None) -> dict[str, Tensor]:
    """``{name: select(activation)}`` for the hooks ``names`` in one forward of ``ids``,
    stopped as soon as every hook has fired (``select`` defaults to the whole tensor).

    Raises ``RuntimeError`` naming the hooks that did not fire (a name the bridge does
    not have, or a hook the forward never reaches).
    """
    out: dict[str, Tensor] = {}
    wanted = set(names)

    def reader(name: str):
        def read(x: Tensor, hook=None) -> Tensor:
            out[name] = (x if select is None else select(x)).detach().clone()
            if len(out) == len(wanted):  # the rest of the forward is not needed
                raise StopForward
            return x

        return read

    try:
        with model.bridge.hooks(fwd_hooks=[(n, reader(n)) for n in wanted]):
            model.bridge(ids)
    except StopForward:
        pass
    missing = wanted - set(out)
    if missing:
        raise RuntimeError(f"hooks {sorted(missing)} did not fire during the forward")
    return out


# =========================================================================== writing
def noise_draws(
    fact, samples: int, n_tokens: int, d_model: int, seed: int, std: float
) -> Tensor:
    """The ``[samples, n_tokens, d_model]`` noise added to one fact's subject embeddings.

    Drawn on the CPU in float32 from a generator seeded with ``seed`` and the fact's key,
    so the same fact gets the same noise whatever else is traced, on any device.
    """
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(fact.key, 16)) % 2**63)
    return torch.randn(samples, n_tokens, d_model, generator=generator) * std


def noise_hook(noise: Tensor, start: int, end: int):
    """A ``hook_embed`` hook adding ``noise`` ([batch, end-start, d_model]) to positions
    ``start:end`` of every row: the corruption of the subject in causal tracing."""

    def add_noise(x: Tensor, hook=None) -> Tensor:
        x = x.clone()
        x[:, start:end] += noise.to(x.device, x.dtype)
        return x

    return add_noise


def overwrite_hook(rows: Tensor, positions: Tensor, values: Tensor):
    """A hook writing ``values[i]`` at batch row ``rows[i]``, position ``positions[i]``
    (the activation is copied first): how causal tracing restores clean states, or holds
    corrupted ones, at chosen sites."""

    def overwrite(x: Tensor, hook=None) -> Tensor:
        x = x.clone()
        x[rows, positions] = values.to(x.dtype)
        return x

    return overwrite


class _GatedGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``gates[key]`` (1 when absent),
    read when the backward runs, so one forward serves backwards with different gates."""

    @staticmethod
    def forward(ctx, x: Tensor, gates: dict, key) -> Tensor:
        ctx.gates, ctx.key = gates, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.gates.get(ctx.key, 1.0), None, None


def gradient_node_hook(nodes: dict, name: str, gates: dict | None = None, gate_key=None):
    """A hook that makes the activation at ``name`` a node of attribution patching.

    The activation ``a`` is replaced by ``n + (a - a.detach())``, where ``n`` is a detached
    copy of ``a`` that requires a gradient, stored as ``nodes[name]``. The forward is
    unchanged (``a - a.detach()`` is exactly zero), ``n.grad`` after a backward is the
    gradient of the metric with respect to the activation, and the gradient still flows
    on into the computation that produced ``a``. With ``gates``, the gradient flowing into
    that computation is multiplied by ``gates[gate_key]`` when the backward runs: 0 cuts
    the module off the backward pass (AtP*'s GradDrop) without a new forward.
    """

    def node(a: Tensor, hook=None) -> Tensor:
        n = a.detach().requires_grad_(True)
        nodes[name] = n
        upstream = a - a.detach()
        if gates is not None:
            upstream = _GatedGradient.apply(upstream, gates, gate_key)
        return n + upstream

    return node


def keep_last_position(x: Tensor, hook=None) -> Tensor:
    """A :data:`FINAL_NORM_HOOK` hook keeping the last position only, so that the
    unembedding runs on one position per row."""
    # The unembedding of one position; contiguous, since a strided input to a large
    # matmul is an order of magnitude slower on CPU.
    return x[:, -1:].contiguous()


# =========================================================================== resuming
@contextmanager
def blocks_skipped(bridge, below: int) -> Iterator[None]:
    """Make blocks ``0 .. below-1`` return their input unchanged for the duration.

    ``start_at_layer`` discards what those blocks compute; skipping them saves the work.
    ``object.__setattr__`` puts the override on the bridge block itself (the bridge's own
    ``__setattr__`` would forward it to the wrapped Hugging Face layer).
    """
    skipped = []
    try:
        for block in list(bridge.blocks)[:below]:
            object.__setattr__(block, "forward", _pass_through)
            skipped.append(block)
        yield
    finally:
        for block in skipped:
            object.__delattr__(block, "forward")


def _pass_through(*args: Any, **kwargs: Any) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def cache_keyword(model: ModelHandle) -> str:
    """The keyword under which the Hugging Face model takes a key-value cache: ``cache``
    in recent versions of transformers, ``past_key_values`` before."""
    parameters = inspect.signature(model.hf_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass(frozen=True)
class ResumeEngine:
    """Which shortcuts of a resumed forward a model's bridge supports (checked once per
    model by :func:`resume_engine`).

    Attributes:
        skip_blocks: the blocks below the start layer may be skipped
            (:func:`blocks_skipped`) rather than run and discarded.
        prefix_cache: a forward may start at a later position, reading the keys and
            values of the earlier ones from a cache (:func:`prefix_kwargs`).
        cache_kwarg: the Hugging Face keyword for a key-value cache (:func:`cache_keyword`).
        last_position_hook: :data:`FINAL_NORM_HOOK` exists, so the unembedding can be cut
            to the positions that are needed.
    """

    skip_blocks: bool
    prefix_cache: bool
    cache_kwarg: str  # the HF keyword for a key/value cache ("cache" or "past_key_values")
    last_position_hook: bool


_ENGINES: "weakref.WeakKeyDictionary[Any, ResumeEngine]" = weakref.WeakKeyDictionary()


def prefix_kwargs(
    model: ModelHandle,
    engine: ResumeEngine,
    kv: Sequence[tuple[Tensor, Tensor]],  # per layer [samples, pos, kv_heads, d_head]
    rows: Tensor,  # [batch] noise sample of each row
    t0: int,
) -> dict:
    """Keyword arguments that make a forward over positions ``t0..`` see ``kv[:, :t0]``.

    ``kv`` holds one ``(keys, values)`` pair per layer (:func:`key_values`); row ``i`` of
    the forward reads the stored row ``rows[i]``. The cache goes to the Hugging Face model
    (which derives position ids and the causal mask from its length) and, as
    ``layer_past``, to the bridge's attention components, which are the ones that read and
    extend it.
    """
    from transformers import DynamicCache

    data = [(k[rows, :t0].transpose(1, 2), v[rows, :t0].transpose(1, 2)) for k, v in kv]
    cache = DynamicCache(ddp_cache_data=data, config=model.hf_model.config)
    return {engine.cache_kwarg: cache, "layer_past": cache}


def padded_prefix_kwargs(
    model: ModelHandle, engine: ResumeEngine, kv, index: Tensor, first: Tensor, lengths: Tensor, t0: int, w: int
) -> dict:
    """Keyword arguments for a resumed forward whose row ``i`` continues after its own
    ``first[i]`` stored positions, for rows of different prefix lengths.

    ``kv`` holds the keys and values of the blocks the forward runs (the blocks above the
    start layer, as :func:`key_values` returns them), row ``index[i]`` for forward row
    ``i``. Each row's keys and values sit at the right end of ``t0`` slots, the slots
    before them masked out, and positions count on from ``first[i]``; ``lengths[i]`` of
    the ``w`` positions of the forward's row ``i`` are real, the rest padding.
    """
    from transformers import DynamicCache

    slot = torch.arange(t0, device=index.device)[None, :] - (t0 - first[:, None])  # [rows, t0]
    real = slot >= 0
    source = slot.clamp(min=0)
    data = [
        (k[index[:, None], source].transpose(1, 2), v[index[:, None], source].transpose(1, 2))
        for k, v in kv
    ]
    # ``kv`` holds the blocks above the start layer only; the skipped blocks below get
    # a placeholder of the same length, never read, so that the cache has one entry per
    # layer
    data = [data[0]] * (model.n_layers - len(data)) + data
    cache = DynamicCache(ddp_cache_data=data, config=model.hf_model.config)
    suffix_real = torch.arange(w, device=index.device)[None, :] < lengths[:, None]
    mask = torch.cat([real, suffix_real], dim=1).long()
    positions = first[:, None] + torch.arange(w, device=index.device)[None, :]
    return {engine.cache_kwarg: cache, "layer_past": cache, "attention_mask": mask,
            "position_ids": positions}


@torch.no_grad()
def resumed_logits(
    model: ModelHandle,
    engine: ResumeEngine,
    resid: Tensor,
    start: int,
    t0: int,
    kv: Sequence[tuple[Tensor, Tensor]] | None,
    rows: Tensor,
    fwd_hooks: list,
) -> Tensor:
    """Logits ``[batch, pos', vocab]`` of a forward resumed at block ``start``, position ``t0``.

    ``resid`` is the residual stream entering block ``start`` at positions ``t0..``; with
    ``t0 > 0`` the earlier positions are read from ``kv`` (:func:`prefix_kwargs`). Where
    ``engine.last_position_hook`` holds, only the last position is unembedded
    (``pos' = 1``).
    """
    kwargs = prefix_kwargs(model, engine, kv, rows, t0) if t0 > 0 else {}
    hooks = list(fwd_hooks)
    if engine.last_position_hook:
        hooks.append((FINAL_NORM_HOOK, keep_last_position))
    with blocks_skipped(model.bridge, start if engine.skip_blocks else 0):
        with model.bridge.hooks(fwd_hooks=hooks):
            return model.bridge(resid, start_at_layer=start, **kwargs)


def resume(model: ModelHandle, resid: Tensor, start: int, hooks: list, prefix: dict | None = None) -> Tensor:
    """Run blocks ``start..`` (and the unembedding) on ``resid``; blocks below ``start``
    are skipped rather than run and discarded. ``prefix`` holds the keyword arguments
    that let the positions of ``resid`` attend to stored earlier positions
    (:func:`padded_prefix_kwargs`). With ``start`` past the last block only the final
    norm and the unembedding run."""
    with model.bridge.hooks(fwd_hooks=hooks):
        if start >= model.n_layers:
            # nothing left to run but the final norm and the unembedding
            return model.bridge.unembed(model.bridge.ln_final(resid))
        with blocks_skipped(model.bridge, start):
            return model.bridge(resid, start_at_layer=start, **(prefix or {}))


@torch.no_grad()
def resume_engine(model: ModelHandle, ids: Tensor) -> ResumeEngine:
    """Check on ``ids`` which shortcuts give the same logits as a full forward.

    The first :class:`ResumeEngine`, fastest first, whose resumed forward (at the middle
    layer and the last two positions) reproduces the full forward's last logits to 1e-3
    is kept per model; where that is not the one with every shortcut a ``RuntimeWarning``
    says so. Raises ``RuntimeError`` where not even a plain resumed forward reproduces a
    full one.
    """
    known = _ENGINES.get(model.bridge)
    if known is not None:
        return known
    cache_kwarg = cache_keyword(model)
    n_layers = model.n_layers
    names = {hook("resid_pre", l) for l in range(n_layers)}
    try:
        names |= set(key_value_hooks(model, range(n_layers)))
        has_kv = all(n in model.bridge.hook_dict for n in names)
    except KeyError:
        has_kv = False
    logits, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    reference = logits[:, -1]
    kv = key_values(model, cache, range(n_layers)) if has_kv else None
    last_hook = FINAL_NORM_HOOK in model.bridge.hook_dict
    candidates = [
        ResumeEngine(True, True, cache_kwarg, last_hook),
        ResumeEngine(True, False, cache_kwarg, last_hook),
        ResumeEngine(False, False, cache_kwarg, False),
    ]
    engine = next((e for e in candidates if _engine_works(model, e, cache, kv, reference)), None)
    if engine is None:
        raise RuntimeError(
            f"tracing {model.name}: bridge(resid, start_at_layer=...) does not reproduce a full "
            "forward; the batched engine cannot run on this model"
        )
    if engine != candidates[0]:
        warnings.warn(
            f"tracing {model.name}: the bridge does not support every shortcut of the batched "
            f"engine (using skip_blocks={engine.skip_blocks}, prefix_cache={engine.prefix_cache}); "
            "results are the same, only slower",
            RuntimeWarning,
            stacklevel=3,
        )
    _ENGINES[model.bridge] = engine
    return engine


def _engine_works(model: ModelHandle, engine: ResumeEngine, cache, kv, reference: Tensor) -> bool:
    """Whether a forward resumed at the middle layer and the last two positions (or all
    positions, without the prefix cache) gives the full forward's last logits."""
    n_tokens = cache[hook("resid_pre", 0)].shape[1]
    start, t0 = model.n_layers // 2, max(n_tokens - 2, 0)
    if engine.prefix_cache and (kv is None or t0 == 0):
        return False
    first = t0 if engine.prefix_cache else 0
    rows = torch.zeros(1, dtype=torch.long, device=reference.device)
    resid = cache[hook("resid_pre", start)][:, first:]
    try:
        out = resumed_logits(model, engine, resid, start, first, kv, rows, [])
    except Exception:  # a shortcut this bridge does not support: the caller tries the next
        return False
    return bool(torch.allclose(out[:, -1], reference, rtol=0, atol=1e-3))


# =========================================================================== backward passes
#: The loss scale a float16 model's backward passes start at (halved on each overflow):
#: float16's smallest normal number is 6e-5, and the gradients of a target's loss with
#: respect to a residual stream of small weights fall below it and flush to zero, so the
#: loss is scaled up before the backward pass and the float32 gradient scaled down after
#: it (by a power of two: exactly). bfloat16 and float32 share float32's exponent range
#: and need no scale.
FLOAT16_LOSS_SCALE = 2.0 ** 14


def initial_loss_scale(dtype: torch.dtype) -> float:
    """The loss scale a backward pass through a model of ``dtype`` starts at:
    :data:`FLOAT16_LOSS_SCALE` for float16, 1 otherwise."""
    return FLOAT16_LOSS_SCALE if dtype == torch.float16 else 1.0
