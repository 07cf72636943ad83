"""Attribution patching: every site's indirect effect from one corrupted forward and backward.

Exact causal tracing (:mod:`intattn_analysis.tracing`) runs one restored forward per site
and noise draw. Attribution patching (AtP; Nanda 2023, "Attribution patching: activation
patching at industrial scale") estimates all of them at once from a first-order Taylor
expansion of the metric around the corrupted run:

    IE(site) ~ (a_clean - a_corrupted) . d p(answer) / d a  at the corrupted run,

for every activation ``a`` the site restores. The corrupted run is the one exact tracing
uses (the same subject noise, the same draws, :func:`~intattn_analysis.tracing.noise_draws`),
so the two methods estimate the same quantity, ``p(answer | restored) - p(answer |
corrupted)`` averaged over draws, and their rows share one table format.

Cost per fact: the clean forward (which exact tracing also runs), one corrupted forward
over the noise draws with the autograd graph kept, and one backward. The sites are

* ``resid`` at ``(t, l)``: ``blocks.{l}.hook_resid_pre`` at token ``t``, one layer;
* ``attn`` / ``mlp`` at ``(t, l)``: the module outputs at token ``t`` over the window
  :func:`~intattn_analysis.tracing.window_layers` around ``l``.

**A window's estimate is the sum of the per-layer estimates in it, and that is an
approximation even to first order.** Each per-layer gradient counts every path from the
layer to the answer, including those through the later layers of the window at the same
token; the exact restore holds those layers at their clean values and so cuts those
paths. The sum therefore counts the paths inside the window that the restore removes.
Recovering the window's own first-order term would take one backward per window. The
approximation is measured twice: with a small noise, where the expansion itself holds, the
sum can be off by a third of the window's effect at the top of SmolLM2 (the test suite
records the case), and at ROME's noise by comparing the agreement with exact tracing at
window 1 and at the notebooks' windows (:func:`attribution_agreement`).

``method="attribution*"`` adds GradDrop from AtP* (Kramar et al. 2024, "AtP*: An efficient
and scalable method for localizing LLM behaviour to components", arXiv 2403.00745). A
site's first-order effect is a sum over paths, and paths of opposite sign can cancel, so
that AtP reports a small effect where patching finds a large one. GradDrop repeats the
backward once per layer ``g`` with the gradient into layer ``g``'s attention and MLP
computation cut (the residual stream still carries it past them), and reports the mean
over ``g`` of the absolute estimates: a *magnitude*, which a cancelling pair cannot hide.
It costs one backward per layer on the same forward (the cut is a gate read during the
backward, :func:`~intattn_analysis.model_access.gradient_node_hook`). AtP*'s other fix,
recomputing the attention softmax exactly when a query or key is patched (the "QK fix"),
applies to query and key nodes; the sites here are module outputs and residual states,
whose route into later attention scores passes through every layer in between, so it is
not part of ``attribution*``.

Attribution estimates have no severed variant (ROME's frozen-module experiment restores
one state while holding others, which is not a first-order quantity); asking for one is
an error.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .architectures import hook
from .loading import ModelHandle
from .model_access import (FINAL_NORM_HOOK, gradient_node_hook, initial_loss_scale, keep_last_position,
                           noise_draws, noise_hook)

__all__ = ["ATTRIBUTION_METHODS", "METHODS", "attribution_agreement", "attribution_curves", "attribution_estimates",
           "check_method"]

#: Every ``method`` :func:`~intattn_analysis.tracing.trace` accepts; ``"exact"`` is the default.
METHODS: tuple[str, ...] = ("exact", "attribution", "attribution*")
ATTRIBUTION_METHODS: tuple[str, ...] = METHODS[1:]


def check_method(method, allowed: Sequence[str] = METHODS, field: str = "method") -> str:
    """``method`` when it is one of ``allowed``; otherwise an error naming the field and
    the choices."""
    if method not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {method!r}")
    return method
#: The hook of each kind's activation (the keys of ``tracing.KIND_HOOK``).
_KIND_HOOK = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}


def attribution_estimates(model: ModelHandle, run, settings, sites: Sequence, method: str) -> tuple[Tensor, Tensor]:
    """``(ie, p_corrupted)``: the estimated indirect effect of each of ``sites``
    (``[n_sites]`` float64, averaged over the noise draws) and the corrupted run's
    ``p(answer)`` per draw, for one prepared fact whose clean run is done (``run`` and
    ``sites`` as :mod:`intattn_analysis.tracing` builds them)."""
    check_method(method, ATTRIBUTION_METHODS)
    n_layers = model.n_layers
    kinds = sorted({site.kind for site in sites}, key=list(_KIND_HOOK).index)
    start, end = run.span
    noise = noise_draws(run.fact, settings.samples, end - start, model.d_model, settings.seed, settings.noise_std)
    nodes: dict[str, Tensor] = {}
    gates: dict[int, float] = {}
    hooks = [(hook("embed"), noise_hook(noise, start, end))]
    wanted = {hook(_KIND_HOOK[k], l) for k in kinds for l in range(n_layers)}
    for layer in range(n_layers):
        for name in ("attn_out", "mlp_out", "resid_pre"):
            gated = method == "attribution*" and name != "resid_pre"  # GradDrop's cut per layer
            if gated or hook(name, layer) in wanted:
                hooks.append((hook(name, layer), gradient_node_hook(nodes, hook(name, layer), gates if gated else None,
                                                                    layer)))
    if FINAL_NORM_HOOK in model.bridge.hook_dict:
        hooks.append((FINAL_NORM_HOOK, keep_last_position))  # unembed the last position only
    ids = run.ids.expand(settings.samples, -1)
    with torch.enable_grad(), model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge(ids)
        probs = torch.softmax(logits[:, -1].float(), dim=-1)[:, run.answer]
        metric = probs.sum()  # each draw's p depends on its own row only
        names = sorted(wanted)
        inputs = [nodes[name] for name in names]
        deltas = {name: (run.clean[name] - nodes[name].detach()).double() for name in names}
        scaling = {"scale": initial_loss_scale(model.dtype)}

        def gradients(retain: bool) -> list[Tensor]:
            """The metric's gradients (float64). In float16 the metric is scaled first so
            that small gradients do not flush to zero, each gradient scaled back (exactly:
            a power of two), and an overflow retried at half the scale."""
            while True:
                scale = scaling["scale"]
                grads = torch.autograd.grad(metric * scale if scale != 1 else metric, inputs,
                                            retain_graph=retain or scale > 1)
                if all(bool(torch.isfinite(grad).all()) for grad in grads):
                    return [grad.double() / scale for grad in grads]
                if scale <= 1:
                    way_out = ("load the model in bfloat16 or float32" if model.dtype == torch.float16 else
                               "the forward itself is not finite: check the model's weights and the noise level")
                    raise FloatingPointError(
                        f"attribution patching of {model.name} in {model.dtype} gave a non-finite gradient; {way_out}")
                scaling["scale"] = scale / 2

        def per_site(grads: Sequence[Tensor]) -> Tensor:
            """``[n_sites]``: each site's first-order estimate, averaged over draws."""
            terms = {name: (deltas[name] * grad).sum(-1) for name, grad in zip(names, grads)}
            estimates = torch.zeros(len(sites), dtype=torch.float64)
            for i, site in enumerate(sites):
                total = sum(terms[hook(_KIND_HOOK[site.kind], j)][:, site.token] for j in site.restored)
                estimates[i] = total.mean()
            return estimates

        plain = per_site(gradients(retain=method == "attribution*"))
        if method == "attribution":
            estimates = plain
        else:
            magnitude = torch.zeros(len(sites), dtype=torch.float64)
            for dropped in range(n_layers):
                gates.clear()
                gates[dropped] = 0.0
                magnitude += per_site(gradients(retain=dropped < n_layers - 1)).abs()
            gates.clear()
            estimates = magnitude / n_layers
    return estimates, probs.detach()


# =========================================================================== agreement
def attribution_agreement(exact, estimate, *, top_k: Sequence[int] = (5, 10),
                          magnitude: bool | None = None) -> "tuple":
    """How well ``estimate`` (a :class:`~intattn_analysis.tracing.TraceResult` of an
    attribution method) agrees with ``exact`` (exact tracing of the same facts, kinds,
    tokens, layers, window, draws and noise).

    Per fact, over its sites (every kind, token and layer the two traces share):

    * ``spearman``: the rank correlation of the estimated and the exact indirect effects;
    * ``recall@k``: the share of the exact top-``k`` sites (largest IE) among the
      estimate's top ``k``;
    * ``sign_agreement``: the share of sites whose IEs have the same sign.

    ``magnitude`` compares the estimate with the exact effects' absolute values, and
    leaves sign agreement out (NaN): what an estimate of magnitude, AtP*'s, can be held
    to. By default it is on for ``method="attribution*"`` traces and off otherwise.

    Returns ``(per_fact, summary)``: one row per fact, and the mean of each measure over
    facts with a 95% normal interval (``ci_low``/``ci_high``), per kind and over all kinds.
    A fact whose sites differ between the two traces is an error naming it.
    """
    import pandas as pd

    from .intervals import normal_interval

    if magnitude is None:
        magnitude = estimate.settings.get("method") == "attribution*"
    keys = ["fact", "kind", "token", "layer"]
    left = exact.table.set_index(keys)["ie"].rename("exact")
    if magnitude:
        left = left.abs()
    right = estimate.table.set_index(keys)["ie"].rename("estimate")
    if not left.index.is_unique or not right.index.is_unique:
        raise ValueError("each trace must hold one row per (fact, kind, token, layer)")
    joined = pd.concat([left, right], axis=1, join="outer")
    unmatched = joined[joined.isna().any(axis=1)]
    if len(unmatched):
        fact, kind, token, layer = unmatched.index[0]
        side = "estimate" if pd.isna(unmatched.iloc[0]["estimate"]) else "exact trace"
        raise ValueError(
            f"{len(unmatched)} site(s) are in one trace only, e.g. fact {fact} {kind} token {token} layer "
            f"{layer} is missing from the {side}; trace the same facts with the same kinds, tokens and layers")
    rows = []
    for scope, part in [("all", joined), *((k, g) for k, g in joined.groupby(level="kind"))]:
        for fact, sites in part.groupby(level="fact", sort=False):
            row = {"fact": fact, "kind": scope, "sites": len(sites),
                   "spearman": _spearman(sites["exact"].to_numpy(), sites["estimate"].to_numpy()),
                   "sign_agreement": float("nan") if magnitude else
                   float((np.sign(sites["exact"]) == np.sign(sites["estimate"])).mean())}
            for k in top_k:
                row[f"recall@{k}"] = _recall(sites["exact"].to_numpy(), sites["estimate"].to_numpy(), k)
            rows.append(row)
    per_fact = pd.DataFrame(rows)
    measures = ["spearman", "sign_agreement", *(f"recall@{k}" for k in top_k)]
    long = per_fact.melt(id_vars=["fact", "kind"], value_vars=measures, var_name="measure")
    long = long.dropna(subset=["value"])
    summary = long.groupby(["kind", "measure"], sort=False)["value"].agg(mean="mean", sem="sem", n_facts="count")
    summary = summary.reset_index()
    summary["ci_low"], summary["ci_high"] = normal_interval(summary["mean"], summary["sem"])
    return per_fact, summary[["kind", "measure", "mean", "ci_low", "ci_high", "n_facts"]]


def attribution_curves(exact, estimate, tokens: Sequence[str] = ("subject_last", "last")):
    """The attention and MLP AIE curves of ``exact`` and ``estimate`` side by side: one
    row per (method, token, module, layer) with the AIE and its 95% interval over facts
    (:meth:`~intattn_analysis.tracing.TraceResult.contributions`), ``method`` being
    ``"exact"`` or the estimate's method, and ``window`` the traces' window."""
    import pandas as pd

    parts = []
    for result in (exact, estimate):
        method = result.settings.get("method", "exact")
        for token in tokens:
            parts.append(result.contributions(token).assign(method=method, token=token,
                                                            window=int(result.settings["window"])))
    table = pd.concat(parts, ignore_index=True)
    return table[["method", "window", "token", "module", "layer", "aie", "ci_low", "ci_high", "n_facts"]]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); NaN when either side is constant."""
    import pandas as pd

    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _recall(exact: np.ndarray, estimate: np.ndarray, k: int) -> float:
    """Share of the exact top-``k`` sites among the estimate's top ``k`` (ties by order)."""
    k = min(k, len(exact))
    top_exact = set(np.argsort(-exact, kind="stable")[:k])
    top_estimate = set(np.argsort(-estimate, kind="stable")[:k])
    return len(top_exact & top_estimate) / k
