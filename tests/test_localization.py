"""Summaries of a trace (layer ranges, attention share by depth, edit layers) and the
localization figures, on synthetic contributions with known answers."""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

import intattn_analysis as ia
from intattn_analysis import plots
from intattn_analysis.tracing import TraceResult


def contributions(attn: list[float], mlp: list[float]) -> pd.DataFrame:
    rows = []
    for layer, (a, m) in enumerate(zip(attn, mlp)):
        rows.append({"layer": layer, "module": "attn", "aie": a, "ci_low": a, "ci_high": a, "n_facts": 1})
        rows.append({"layer": layer, "module": "mlp", "aie": m, "ci_low": m, "ci_high": m, "n_facts": 1})
    return pd.DataFrame(rows)


# Nine layers: attention strong early, MLP strong late.
ATTN = [0.4, 0.5, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, -0.2]
MLP = [0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.6, 0.5, 0.4]


def test_layer_ranges_peak_band_and_centre():
    table = ia.layer_ranges(contributions(ATTN, MLP)).set_index("module")
    assert table.loc["attn", "peak_layer"] == 1
    assert table.loc["attn", "band"] == "0-2"  # >= 0.25: layers 0, 1, 2
    assert table.loc["mlp", "peak_layer"] == 6
    assert table.loc["mlp", "band"] == "5-8"
    # negative AIE (layer 8) is clipped: centre of 0.4, 0.5, 0.3, 0.1 at layers 0-3
    # (float64 sums and a ratio of a few numbers: ~1e-16, so approx's default rel 1e-6)
    assert table.loc["attn", "centre"] == pytest.approx((0.5 + 0.6 + 0.3) / 1.3)
    assert table.loc["attn", "total_aie"] == pytest.approx(1.3)


def test_attention_share_by_depth_and_finding():
    shares = ia.attention_share_by_depth(contributions(ATTN, MLP), n_layers=9)
    assert list(shares.index) == ["early", "middle", "late"]
    assert shares.loc["early", "layers"] == "0-2"
    # float64 ratios of sums of a few numbers: ~1e-16, within approx's default rel 1e-6
    assert shares.loc["early", "attn_share"] == pytest.approx(1.2 / 1.3)
    assert shares.loc["late", "attn_share"] == pytest.approx(0.0)
    holds, text = ia.early_attention_finding(contributions(ATTN, MLP), n_layers=9)
    assert holds and "early 0.92" in text
    holds, _ = ia.early_attention_finding(contributions(MLP, ATTN), n_layers=9)
    assert not holds


def test_suggest_edit_layers_takes_the_strongest_block():
    assert ia.suggest_edit_layers(contributions(ATTN, MLP), 3) == [6, 7, 8]  # 1.5 (clipped -0.2)
    assert ia.suggest_edit_layers(contributions(ATTN, MLP), 2, candidates=range(4)) == [0, 1]
    with pytest.raises(ValueError, match="only 9 layers"):
        ia.suggest_edit_layers(contributions(ATTN, MLP), 10)
    with pytest.raises(ValueError, match="positive integer"):
        ia.suggest_edit_layers(contributions(ATTN, MLP), 0)


def test_bad_contributions_are_named():
    with pytest.raises(ValueError, match="columns layer, module, aie"):
        ia.layer_ranges(pd.DataFrame({"x": [1]}))
    only_mlp = contributions(ATTN, MLP).query("module == 'mlp'")
    with pytest.raises(ValueError, match="no 'attn' rows"):
        ia.layer_ranges(only_mlp)
    with pytest.raises(ValueError, match="threshold"):
        ia.layer_ranges(contributions(ATTN, MLP), threshold=0)


def test_sample_by_relation_is_round_robin():
    facts = ia.load_facts("builtin")
    chosen = ia.sample_by_relation(facts, 25)
    relations = sorted({f.relation for f in facts})
    assert [f.relation for f in chosen[: len(relations)]] == relations
    assert len(chosen) == 25 and len({f.key for f in chosen}) == 25
    assert ia.sample_by_relation(facts, None) == facts
    assert len(ia.sample_by_relation(facts[:3], 10)) == 3
    with pytest.raises(ValueError, match="positive integer"):
        ia.sample_by_relation(facts, 0)


def synthetic_trace(severed: str = "none") -> TraceResult:
    fact = ia.Fact(subject="Eiffel Tower", prompt="The {} is in", target_true="Paris", target_new="Rome")
    rows = []
    tokens = [(1, " Eiff", "subject_first"), (2, "el Tower", "subject_last"), (3, " is", "further"), (4, " in", "last")]
    for kind in ("resid", "mlp", "attn"):
        for token, text, cls in tokens:
            for layer in range(4):
                p = 0.1 + 0.1 * layer if cls == "subject_last" else 0.05
                rows.append({
                    "fact": fact.key, "subject": fact.subject, "kind": kind, "token": token,
                    "token_text": text, "token_class": cls, "layer": layer, "p_clean": 0.8,
                    "p_corrupted": 0.05, "p_restored": p, "ie": p - 0.05, "severed": severed,
                })
    settings = {"model": "toy@0", "kinds": ["resid", "mlp", "attn"], "window": 2, "samples": 1}
    return TraceResult.from_rows(rows, settings, [fact])


def test_figures_draw_and_save(tmp_path):
    result = synthetic_trace()
    fig = plots.plot_trace_heatmaps(result)
    assert len(fig.axes) == 6  # three heatmaps, three colour bars
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[1] == "'el Tower'*" and labels[2] == "' is'"
    fig = plots.plot_aie_curves({"toy": result})
    assert len(fig.axes) == 2
    fig = plots.plot_severed(result, {"mlp": synthetic_trace("mlp")})
    assert len(fig.axes[0].lines) == 3  # two curves and the zero line
    alphas = ia.balance(result.contributions(), layers=[0, 1, 2, 3])
    fig = plots.plot_alphas({"toy": alphas}, {"toy": [1, 2]})
    paths = plots.save_figure(fig, "alphas", tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="not in this result"):
        plots.plot_trace_heatmaps(result, "0000")
    assert math.isfinite(alphas.global_alpha)
