"""The slow one-site-per-forward reference of causal tracing, for checking the batched engine.

:func:`reference_trace` computes the same rows as :func:`intattn_analysis.tracing.trace`
the plain way, ROME's loop: each restore site is one full forward of the prompt from its
tokens, batched over the noise draws, with hooks that add the noise to ``hook_embed`` and
write the clean values back. It shares with the engine only the definitions of the
experiment (the subject's token span, the token classes, the answer token and the noise
draws) and none of its machinery, so an agreement between the two checks the engine's
batching, resuming and windowing rather than repeating them. The test suite compares the
two to 1e-5 and ``benchmarks/bench_tracing.py`` times them side by side.

It runs one forward per (kind, token, layer) site: use :func:`~intattn_analysis.tracing.trace`
for real work.
"""

from __future__ import annotations

import torch

from intattn_analysis.architectures import hook
from intattn_analysis.predictions import first_answer_token
from intattn_analysis.tracing import (
    KINDS,
    TOKEN_CLASSES,
    Noise,
    noise_draws,
    subject_span,
    token_classes,
)

__all__ = ["HOOK_OF_KIND", "reference_trace"]

HOOK_OF_KIND = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}
"""The hook (see :func:`~intattn_analysis.architectures.hook`) whose output each kind of
trace restores: the residual stream entering a block, the MLP's output, attention's output."""


def _set_positions(position, values):
    """A hook writing ``values`` ([batch or 1, d_model]) at ``position`` of every row."""

    def write(x, hook=None):
        x = x.clone()
        x[:, position] = values
        return x

    return write


def _add_noise(noise, start, end):
    """A hook adding ``noise`` ([rows, end - start, d_model]) to positions ``start:end``."""

    def add(x, hook=None):
        x = x.clone()
        x[:, start:end] = x[:, start:end] + noise
        return x

    return add


@torch.no_grad()
def _p_answer(bridge, ids, answer, fwd_hooks):
    """The probability of token ``answer`` after the last position of every row of ``ids``."""
    logits = bridge.run_with_hooks(ids, fwd_hooks=fwd_hooks)
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer]


@torch.no_grad()
def reference_trace(
    model,
    facts,
    *,
    kinds=KINDS,
    tokens=TOKEN_CLASSES,
    layers=None,
    window=10,
    samples=10,
    noise=3.0,
    severed=None,
    seed=0,
):
    """Causal-trace ``facts`` on ``model`` one restore site per forward.

    The arguments mean what they mean for :func:`~intattn_analysis.tracing.trace` (same
    defaults, except that ``kinds`` defaults to all three kinds even when ``severed`` is
    set); there is no batching, caching or progress bar, and facts whose first answer
    token is not the clean run's top-1 prediction are always left out.

    Returns:
        ``(rows, skipped)``: ``rows`` is a list of dicts ``{fact, kind, token, layer,
        p_clean, p_corrupted, p_restored, ie}``, one per (fact, kind, token, layer), the
        columns of :meth:`TraceResult.to_dataframe
        <intattn_analysis.tracing.TraceResult.to_dataframe>` that the engine computes;
        ``skipped`` lists the keys of the facts left out.
    """
    bridge, n_layers = model.bridge, model.n_layers
    layers = range(n_layers) if layers is None else layers
    tokens = TOKEN_CLASSES if tokens == "all" else [tokens] if isinstance(tokens, str) else tokens
    std = Noise.of(noise).std(model)
    rows, skipped = [], []
    for fact in facts:
        ids = torch.tensor(model.tokenize(fact.text), device=model.device)
        start, end = subject_span(model, fact)
        answer = first_answer_token(model, fact.target_true)
        states = {hook(name, l) for name in HOOK_OF_KIND.values() for l in range(n_layers)}
        logits, clean = bridge.run_with_cache(ids, names_filter=lambda n: n in states)
        probs = torch.softmax(logits[0, -1].float(), dim=-1)
        if int(probs.argmax()) != answer:
            skipped.append(fact.key)
            continue
        p_clean = float(probs[answer])

        batch = ids.expand(samples, -1)
        noise = noise_draws(fact, samples, end - start, model.d_model, seed, std)
        noise_hook = (hook("embed"), _add_noise(noise, start, end))
        with bridge.hooks(fwd_hooks=[noise_hook]):
            logits, corrupted = bridge.run_with_cache(batch, names_filter=lambda n: n in states)
        p_corrupted = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer].double().mean().item()

        classes = token_classes(ids.shape[1], start, end)
        positions = [t for t, c in enumerate(classes) if c in tokens]
        for kind in kinds:
            for t in positions:
                for layer in layers:
                    if kind == "resid":
                        restored = [layer]
                    else:
                        # ROME: layers max(0, l - w//2) .. min(L, l - (-w//2)) - 1
                        first = max(0, layer - window // 2)
                        restored = range(first, min(n_layers, layer - (-window // 2)))
                    hooks = [noise_hook]
                    for j in restored:
                        name = hook(HOOK_OF_KIND[kind], j)
                        hooks.append((name, _set_positions(t, clean[name][0, t])))
                    if severed:
                        for j in range(layer, n_layers):
                            name = hook(HOOK_OF_KIND[severed], j)
                            hooks.append((name, _set_positions(t, corrupted[name][:, t])))
                    p_restored = _p_answer(bridge, batch, answer, hooks).double().mean().item()
                    rows.append(
                        dict(
                            fact=fact.key, kind=kind, token=t, layer=layer, p_clean=p_clean,
                            p_corrupted=p_corrupted, p_restored=p_restored,
                            ie=p_restored - p_corrupted,
                        )
                    )
    return rows, skipped
