"""Keys and module targets shared by the editors.

A matrix's *key* is its input at the subject's last token (``o_proj``: the concatenated
heads, hook ``attn_key``; ``down_proj``: the MLP's hidden activation, hook ``mlp_key``),
averaged over the context prefixes with MEMIT's ``compute_ks`` weights
(:func:`intattn_analysis.targets.context_weights`). Its *value* is its output there.

On post-norm architectures (Gemma 2/3) a module's output goes through an RMSNorm before
it joins the residual stream, so a wanted residual change is not the module's own
target: :func:`module_space` converts one into the other by the exact projection onto the
norm's shell (see its docstring, and :mod:`intattn_analysis.editors.methods.closed_form` for
why the first-order inversion fails there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..architectures import hook
from ..loading import ModelHandle
from .result import EditError

__all__ = ["key_hook", "mean_over_contexts", "module_space", "post_norm", "value_hook"]


def key_hook(module: str, layer: int) -> str:
    return hook("attn_key" if module == "attn" else "mlp_key", layer)


def value_hook(module: str, layer: int) -> str:
    return hook("attn_value" if module == "attn" else "mlp_value", layer)


def post_norm(model: ModelHandle, module: str, layer: int) -> torch.nn.Module | None:
    spec = model.layer(layer)
    path = spec.attn_post_norm if module == "attn" else spec.mlp_post_norm
    if path is None:
        return None
    norm = model.hf_model.get_submodule(path)
    return getattr(norm, "original_component", None) or norm


@torch.no_grad()
def module_space(
    model: ModelHandle, module: str, layer: int, residual: Tensor, outputs: Tensor,
    weights: Tensor,
) -> Tensor:
    """The module-output change ``Δx`` whose post-norm output comes closest to changing
    the residual by ``residual`` (see the module notes); ``outputs`` are the module
    outputs per row (``len(weights)`` rows per fact, averaged with the context weights
    the keys take), ``residual`` one row per fact.

    The norm maps ``x`` to ``y = g ⊙ u`` with ``u = x / rms(x)``, so every output it can
    give lies on the shell ``{g ⊙ u : ||u||² = d}``. The wanted output is
    ``t = ȳ + R`` (``ȳ``: the current normed output averaged over the contexts). The
    closest point of the shell, ``argmin ||g ⊙ u − t||`` subject to ``||u||² = d``, is
    ``u* = g ⊙ t / (g² + μ)`` with the multiplier ``μ > −min g²`` that puts ``u*`` on the
    sphere (a one-dimensional monotone equation, solved by bisection in float64). Then
    ``Δx = rms(x) u* − x``, averaged over the prefixes, keeps the size of ``x`` and
    changes only its direction. Where ``t`` is on the shell the write is exact; where it
    is not (a residual target larger than the norm can express) the write goes as far as
    the norm allows and the later layers, which re-read ``h_L``, take up the rest.
    """
    norm = post_norm(model, module, layer)
    if norm is None:
        return residual
    d = outputs.shape[-1]
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones(d, device=outputs.device, dtype=outputs.dtype)
    gain = (norm(ones).double() * math.sqrt(1.0 + eps)).to(residual.device)
    x = outputs.double().to(residual.device)
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [rows, 1]
    normed = mean_over_contexts(gain * x / rms, weights)
    gt = gain * (normed + residual.double())
    g2 = gain.pow(2)

    def surplus(mu: Tensor) -> Tensor:  # ||u(mu)||² − d, decreasing in mu
        return (gt / (g2 + mu[:, None])).pow(2).sum(-1) - d

    # ||u(mu)|| <= ||g ⊙ t|| / mu for mu > 0, so mu = ||g ⊙ t|| / sqrt(d) is too large;
    # as mu falls to −min g² the norm grows without bound (unless g ⊙ t vanishes there)
    low = torch.full((gt.shape[0],), -float(g2.min()), dtype=torch.float64, device=gt.device)
    high = gt.norm(dim=-1) / math.sqrt(d) + 1e-12
    for _ in range(200):
        middle = (low + high) / 2
        long = surplus(middle) > 0
        low = torch.where(long, middle, low)
        high = torch.where(long, high, middle)
    shell = gt / (g2 + high[:, None])
    if not bool(torch.isfinite(shell).all()):
        raise EditError(
            f"the post-norm of {module} at layer {layer} could not be inverted (non-finite "
            "module target); check the model's norm weights and the edit targets"
        )
    size = mean_over_contexts(rms, weights)
    return size * shell - mean_over_contexts(x, weights)


def mean_over_contexts(x: Tensor, weights: Tensor) -> Tensor:
    """Per fact, the weighted mean of its rows (``len(weights)`` consecutive rows per
    fact, one per context), in float64."""
    w = weights.to(device=x.device, dtype=torch.float64)
    return (x.double().view(-1, len(w), x.shape[-1]) * w[:, None]).sum(1)

