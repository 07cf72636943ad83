"""Noise written into a model's weights for the length of a ``with`` block, for tests that
need a model whose answers changed."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch


@contextmanager
def noisy_mlps(model, layers: Iterable[int] = range(2, 6), std: float = 0.5, seed: int = 0):
    """Add Gaussian noise of ``std`` (far above the weights' own size, so it wrecks these
    layers) to the MLP output weights of ``layers``; the weights are copied back on exit,
    whatever happened inside."""
    weights = [model.weight("mlp", layer) for layer in layers]
    saved = [w.detach().clone() for w in weights]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn(w.shape, generator=generator) * std)
        yield model
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
