"""Reading a causal trace: where attention and MLP carry a fact, and which layers to edit.

:func:`~intattn_analysis.tracing.trace` measures average indirect effects (AIE) per layer;
:meth:`~intattn_analysis.tracing.TraceResult.contributions` gives, at one token class, the
attention and MLP curves. This module turns those curves into the small summaries the
paper's argument rests on:

* :func:`layer_ranges`: for each module, the peak layer, the band of layers whose AIE is
  at least half the peak, and the AIE-weighted centre of mass;
* :func:`attention_share_by_depth`: the attention share ``sum AIE_attn / (sum AIE_attn +
  sum AIE_mlp)`` in the first, middle and last third of the network;
* :func:`early_attention_finding`: whether the paper's finding, that attention matters most
  in the earlier layers, holds for a trace, with the numbers that decide it;
* :func:`suggest_edit_layers`: the block of consecutive layers that carries the most
  combined (attention + MLP) effect, the natural MEMIT / IntAttn-Edit edit range.

All of them clip negative AIEs at 0 (a negative effect is no evidence that a module stores
the fact), the same convention as :func:`~intattn_analysis.tracing.balance`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

__all__ = [
    "DEPTH_BANDS",
    "attention_share_by_depth",
    "early_attention_finding",
    "layer_ranges",
    "suggest_edit_layers",
]

#: The three depth bands, as fractions of the number of layers.
DEPTH_BANDS = (("early", 0.0, 1 / 3), ("middle", 1 / 3, 2 / 3), ("late", 2 / 3, 1.0))


def _curves(contributions) -> dict[str, pd.Series]:
    """``{"attn": Series(layer -> clipped AIE), "mlp": ...}`` from a contributions table."""
    from .tracing import TraceResult

    if isinstance(contributions, TraceResult):
        contributions = contributions.contributions()
    needed = {"layer", "module", "aie"}
    if not needed <= set(getattr(contributions, "columns", ())):
        raise ValueError(
            "expected TraceResult.contributions() (columns layer, module, aie), got "
            f"{type(contributions).__name__}"
        )
    curves = {}
    for module in ("attn", "mlp"):
        part = contributions[contributions["module"] == module]
        if part.empty:
            raise ValueError(f"the contributions have no {module!r} rows; trace kinds attn and mlp")
        curves[module] = part.set_index("layer")["aie"].astype(float).clip(lower=0).sort_index()
    return curves


def layer_ranges(contributions, threshold: float = 0.5) -> pd.DataFrame:
    """Per module: where its AIE peaks and the layers that carry most of it.

    Columns: ``module``, ``peak_layer``, ``peak_aie``, ``band`` (first and last layer whose
    AIE is at least ``threshold`` x the peak; the band may contain dips), ``centre``
    (AIE-weighted mean layer) and ``total_aie`` (sum over the traced layers).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    rows = []
    for module, curve in _curves(contributions).items():
        total = float(curve.sum())
        peak_layer = int(curve.idxmax())
        strong = curve.index[curve >= threshold * curve.max()] if total > 0 else curve.index[:0]
        rows.append(
            {
                "module": module,
                "peak_layer": peak_layer,
                "peak_aie": float(curve.max()),
                "band": f"{int(strong.min())}-{int(strong.max())}" if len(strong) else "none",
                "centre": float((curve.index.to_numpy() * curve.to_numpy()).sum() / total)
                if total > 0
                else float("nan"),
                "total_aie": total,
            }
        )
    return pd.DataFrame(rows)


def _band_of(layer: int, n_layers: int) -> str:
    for name, low, high in DEPTH_BANDS:
        if low * n_layers <= layer < high * n_layers:
            return name
    return DEPTH_BANDS[-1][0]


def attention_share_by_depth(contributions, n_layers: int) -> pd.DataFrame:
    """Summed attention and MLP AIE, and the attention share, per third of the network.

    Rows ``early`` / ``middle`` / ``late`` (layers ``[0, L/3)``, ``[L/3, 2L/3)``,
    ``[2L/3, L)``, by window centre); columns ``layers`` (as ``first-last``), ``attn``,
    ``mlp``, ``attn_share``.
    """
    curves = _curves(contributions)
    layers = curves["attn"].index.intersection(curves["mlp"].index)
    rows = []
    for name, low, high in DEPTH_BANDS:
        inside = [l for l in layers if _band_of(int(l), n_layers) == name]
        attn = float(curves["attn"].loc[inside].sum()) if inside else 0.0
        mlp = float(curves["mlp"].loc[inside].sum()) if inside else 0.0
        rows.append(
            {
                "depth": name,
                "layers": f"{min(inside)}-{max(inside)}" if inside else "none",
                "attn": attn,
                "mlp": mlp,
                "attn_share": attn / (attn + mlp) if attn + mlp > 0 else float("nan"),
            }
        )
    return pd.DataFrame(rows).set_index("depth")


def early_attention_finding(contributions, n_layers: int) -> tuple[bool, str]:
    """Does attention matter most in the earlier layers, as the paper reports?

    The finding is taken to hold when attention's share of the combined AIE is higher in
    the early third of the network than in the middle and the late third, *and*
    attention's AIE-weighted centre of mass lies below the MLP's. Returns the verdict and
    a sentence with the numbers that decided it.
    """
    shares = attention_share_by_depth(contributions, n_layers)["attn_share"]
    ranges = layer_ranges(contributions).set_index("module")
    early_first = bool(shares["early"] > shares["middle"] and shares["early"] > shares["late"])
    attn_lower = bool(ranges.loc["attn", "centre"] < ranges.loc["mlp", "centre"])
    holds = early_first and attn_lower
    text = (
        f"attention share of the AIE: early {shares['early']:.2f}, middle "
        f"{shares['middle']:.2f}, late {shares['late']:.2f}; AIE-weighted centre layer: "
        f"attention {ranges.loc['attn', 'centre']:.1f}, MLP {ranges.loc['mlp', 'centre']:.1f} "
        f"(of {n_layers}); peak layer: attention {int(ranges.loc['attn', 'peak_layer'])}, "
        f"MLP {int(ranges.loc['mlp', 'peak_layer'])}"
    )
    return holds, text


def suggest_edit_layers(
    contributions, n: int = 5, *, candidates: Iterable[int] | None = None
) -> list[int]:
    """The ``n`` consecutive layers with the largest summed attention + MLP AIE.

    This is how MEMIT's edit range is chosen from a trace (the block around the causal
    peak at the last subject token), with the attention curve added since IntAttn-Edit
    writes both modules. ``candidates`` restricts the layers considered (default: every
    traced layer). Ties go to the earlier block.
    """
    curves = _curves(contributions)
    combined = curves["attn"].add(curves["mlp"], fill_value=0.0)
    layers = sorted(int(l) for l in combined.index)
    if candidates is not None:
        allowed = {int(l) for l in candidates}
        layers = [l for l in layers if l in allowed]
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if len(layers) < n:
        raise ValueError(f"asked for {n} edit layers but only {len(layers)} layers are available")
    best, best_sum = None, -np.inf
    for i in range(len(layers) - n + 1):
        block = layers[i : i + n]
        if block[-1] - block[0] != n - 1:
            continue  # not consecutive
        total = float(combined.loc[block].sum())
        if total > best_sum + 1e-12:
            best, best_sum = block, total
    if best is None:
        raise ValueError(f"no {n} consecutive layers among {layers}")
    return best
