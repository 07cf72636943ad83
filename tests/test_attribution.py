"""Attribution patching (AtP, AtP*) against exact causal tracing, and the agreement measures.

AtP is the first-order Taylor expansion of exact tracing's indirect effect around the
corrupted run. With a small noise the clean and corrupted states are close and the
expansion's remainder, second order in their difference, is small beside the first-order
term: that is what the equality test checks, on both embedded models. At ROME's noise the
two differ, which a second test shows (so the first could fail).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import intattn_analysis as ia
from intattn_analysis.attribution import attribution_agreement
from intattn_analysis.tracing import Noise, TraceResult

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

FACT = ia.Fact(subject="Eiffel Tower", prompt="The {} is located in the city of", target_true="Paris",
               target_new="Rome")
SETTINGS = dict(kinds=("resid", "mlp", "attn"), tokens=["subject_last", "last"], samples=3, progress=False)
# An absolute noise std of 2e-4 moves the subject's embeddings by about 1% of their std on
# both models (SmolLM2's embedding std is about 0.06, Gemma-3's, scaled, about 0.03 x 25):
# the second-order remainder is then about 1% of the first-order term. 5% of the largest
# exact effect leaves room for a remainder five times that while a wrong gradient (wrong
# hook, sign, or a window summed wrongly) misses by the size of the effect itself.
SMALL_NOISE = Noise(2e-4, relative=False)
RELATIVE_TOLERANCE = 0.05


@pytest.fixture(params=["smollm2", "gemma3"])
def model(request):
    return request.getfixturevalue(request.param)


def layers_of(model) -> list[int]:
    last = model.n_layers - 1
    return [0, 2, last // 2, last]


def both(model, **kwargs) -> pd.DataFrame:
    """Exact and attribution IEs side by side, one row per site."""
    exact = ia.trace(model, FACT, **kwargs)
    estimate = ia.trace(model, FACT, method="attribution", **kwargs)
    keys = ["kind", "token", "layer"]
    table = pd.concat([exact.table.set_index(keys)["ie"].rename("exact"),
                       estimate.table.set_index(keys)["ie"].rename("atp")], axis=1)
    assert not table.isna().any().any()
    assert np.allclose(exact.table["p_corrupted"], estimate.table["p_corrupted"], rtol=0, atol=1e-6)
    return table


def test_attribution_is_exact_tracing_to_first_order(model):
    table = both(model, layers=layers_of(model), window=1, noise=SMALL_NOISE, **SETTINGS)
    scale = table["exact"].abs().max()
    assert scale > 1e-5  # the noise moves p(answer) measurably, so the comparison means something
    assert (table["atp"] - table["exact"]).abs().max() <= RELATIVE_TOLERANCE * scale


def test_a_windows_sum_is_not_its_first_order_effect(smollm2):
    # The approximation the module notes state: restoring the MLPs of layers 28 and 29
    # together holds layer 29's output, cutting the path from layer 28 through it, which
    # the per-layer gradient of layer 28 counts. Even at the small noise, where window 1
    # agrees (the test above), the window's sum misses by more than a quarter.
    last = smollm2.n_layers - 1
    kwargs = dict(SETTINGS, kinds=("mlp",), tokens=["last"], noise=SMALL_NOISE)
    table = both(smollm2, layers=[last], window=3, **kwargs)
    exact, atp = table["exact"].item(), table["atp"].item()
    assert abs(atp - exact) > 0.25 * abs(exact)


def test_attribution_differs_from_exact_tracing_at_roms_noise(smollm2):
    # At 3 x the embedding std, p(answer | corrupted) is near 0, where the softmax is flat:
    # the gradient there underestimates the effect of restoring the last token's residual
    # stream at the top layer (exact 0.60, AtP 0.06 when this test was written).
    table = both(smollm2, layers=[smollm2.n_layers - 1], window=1, noise=3.0, **SETTINGS)
    row = table.loc[("resid", table.index.get_level_values("token").max(), smollm2.n_layers - 1)]
    assert row["exact"] > 0.3 and row["atp"] < 0.5 * row["exact"]


def test_a_window_is_the_sum_of_its_layers(smollm2):
    kwargs = dict(kinds=("mlp", "attn"), tokens=["subject_last"], samples=2, noise=3.0, progress=False)
    per_layer = ia.trace(smollm2, FACT, method="attribution", window=1, **kwargs).table
    windowed = ia.trace(smollm2, FACT, method="attribution", window=3, layers=[4], **kwargs).table
    for kind in ("mlp", "attn"):
        expected = per_layer[(per_layer["kind"] == kind) & per_layer["layer"].isin([3, 4, 5])]["ie"].sum()
        got = windowed[windowed["kind"] == kind]["ie"].item()
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_graddrop_of_the_top_mlp_is_the_magnitude_of_atp(smollm2):
    # Nothing but the unembedding reads the last MLP's output, so cutting any layer's
    # gradient leaves its estimate as it was: AtP* there is |AtP|. A site lower down sees
    # its paths cut, and its AtP* differs from |AtP|.
    last = smollm2.n_layers - 1
    kwargs = dict(kinds=("mlp",), tokens=["last"], window=1, layers=[2, last], samples=2, progress=False)
    plain = ia.trace(smollm2, FACT, method="attribution", **kwargs).table.set_index("layer")["ie"]
    dropped = ia.trace(smollm2, FACT, method="attribution*", **kwargs).table.set_index("layer")["ie"]
    assert dropped[last] == pytest.approx(abs(plain[last]), rel=1e-9)
    assert dropped[2] != pytest.approx(abs(plain[2]), rel=1e-3)
    assert (dropped >= 0).all()


def test_methods_are_checked_and_keyed(smollm2, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        ia.trace(smollm2, FACT, method="gradient", progress=False)
    with pytest.raises(ValueError, match="no severed variant"):
        ia.trace(smollm2, FACT, method="attribution", severed="mlp", progress=False)
    kwargs = dict(kinds=("attn",), tokens=["last"], window=1, layers=[5], samples=2, cache_dir=tmp_path,
                  progress=False)
    exact = ia.trace(smollm2, FACT, **kwargs)
    estimate = ia.trace(smollm2, FACT, method="attribution", **kwargs)
    assert "method" not in exact.settings and estimate.settings["method"] == "attribution"
    assert exact.table["ie"].item() != estimate.table["ie"].item()  # not read from the exact trace's cache
    again = ia.trace(smollm2, FACT, method="attribution", **kwargs)
    assert again.table["ie"].item() == estimate.table["ie"].item()


# --------------------------------------------------------------------------- agreement
def synthetic(ies: dict[str, list[float]]) -> TraceResult:
    rows = []
    for fact, values in ies.items():
        for layer, ie in enumerate(values):
            rows.append({"fact": fact, "subject": fact, "kind": "attn" if layer % 2 else "mlp", "token": 3,
                         "token_text": " x", "token_class": "subject_last", "layer": layer, "p_clean": 0.9,
                         "p_corrupted": 0.1, "p_restored": 0.1 + ie, "ie": ie, "severed": "none"})
    return TraceResult.from_rows(rows, {"kinds": ["mlp", "attn"]}, [])


def test_agreement_measures():
    exact = synthetic({"a": [0.5, 0.1, 0.3, -0.2, 0.0, 0.4], "b": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    same_order = synthetic({"a": [1.0, 0.2, 0.6, -0.4, 0.0, 0.8], "b": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    reversed_b = synthetic({"a": [1.0, 0.2, 0.6, -0.4, 0.0, 0.8], "b": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]})
    per_fact, summary = attribution_agreement(exact, same_order, top_k=[2])
    assert list(per_fact[per_fact["kind"] == "all"]["spearman"]) == pytest.approx([1.0, 1.0])
    assert (per_fact["recall@2"] == 1.0).all()
    per_fact, summary = attribution_agreement(exact, reversed_b, top_k=[2])
    b = per_fact[(per_fact["fact"] == "b") & (per_fact["kind"] == "all")].iloc[0]
    assert b["spearman"] == pytest.approx(-1.0) and b["recall@2"] == 0.0
    overall = summary[(summary["kind"] == "all") & (summary["measure"] == "spearman")].iloc[0]
    assert overall["mean"] == pytest.approx(0.0) and overall["n_facts"] == 2
    assert overall["ci_low"] < 0 < overall["ci_high"]


def test_agreement_refuses_traces_of_different_sites():
    exact = synthetic({"a": [0.5, 0.1, 0.3]})
    other = synthetic({"a": [0.5, 0.1]})
    with pytest.raises(ValueError, match="missing from the estimate"):
        attribution_agreement(exact, other)


# --------------------------------------------------------------------------- experiment
def test_localization_stores_attribution_beside_exact_traces(smollm2, tmp_path):
    from intattn_analysis.experiments import localization
    from intattn_analysis.experiments.store import ResultStore

    scale = localization.LocalizationScale(n_facts=3, samples=2, star_facts=2)
    for method in ("exact", "attribution", "attribution*"):
        localization.run(smollm2, "builtin", scale, tmp_path, variants=("modules-window1",), method=method,
                         progress=False)
    store = ResultStore(tmp_path, localization.NAME)
    labels = sorted(store.rows()["unit"].str.rsplit("-", n=1).str[0].unique())
    assert labels == ["attribution-modules-window1-c000", "attribution-star-modules-window1-c000",
                      "modules-window1-c000"]
    tables = localization.summarise(store)
    agreement = tables["attribution_agreement"].set_index(["method", "kind", "measure"])
    assert set(tables["attribution_agreement"]["window"]) == {1}
    rho = agreement.loc[("attribution", "all", "spearman")]
    assert rho["n_facts"] == 3 and -1 <= rho["mean"] <= 1
    assert agreement.loc[("attribution*", "all", "spearman"), "n_facts"] == 2  # star_facts
    assert ("attribution*", "all", "sign_agreement") not in agreement.index  # a magnitude has no sign
    curves = tables["attribution_aie"]
    assert set(curves["method"]) == {"exact", "attribution", "attribution*"}
    # per compared method: exact and the estimate, x tokens x modules x layers
    assert len(curves) == 2 * 2 * 2 * 2 * smollm2.n_layers
    paired = tables["attribution_paired"].set_index(["kind", "measure"])
    assert (paired["n_facts"] == 2).all() and (paired["p_holm"] >= paired["p_value"]).all()
    row = paired.loc[("all", "spearman")]
    assert row["diff"] == pytest.approx(row["attribution*"] - row["attribution"])
    timing = tables["timing"].set_index("method")
    assert set(timing.index) == {"exact", "attribution", "attribution*"}
    assert timing["n_facts"].to_dict() == {"exact": 3, "attribution": 3, "attribution*": 2}
    assert timing.loc["exact", "seconds_per_fact"] > timing.loc["attribution", "seconds_per_fact"]
    # the exact window-1 yardstick stays out of the paper's tables
    assert tables["coverage"].empty and tables["aie"].empty


def test_localization_refuses_severed_attribution(smollm2, tmp_path):
    from intattn_analysis.experiments import localization

    with pytest.raises(ValueError, match="no attribution form"):
        localization.run(smollm2, "builtin", "ci", tmp_path, variants=("severed-mlp",), method="attribution")


def test_method_option_is_for_localization_only(tmp_path, capsys):
    from intattn_analysis import cli

    assert cli.main(["run", "alpha-sweep", "--method", "attribution", "--out", str(tmp_path)]) == 2
    assert "--method" in capsys.readouterr().err
