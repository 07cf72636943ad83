"""Causal tracing: the batched engine against the one-site-per-forward reference, and the API.

The equality tests run on both embedded models with two facts, three noise draws and a few
layers and tokens, so that every path of the engine is exercised (windows, severed runs,
batches that split a site's noise draws, forwards resumed at a late token and layer).
"""

from __future__ import annotations

import json
import types
import warnings

import pandas as pd
import pytest
import torch

import intattn_analysis as ia
from intattn_analysis import tracing
from intattn_analysis.tracing import Noise, TraceResult, balance, trace
from intattn_analysis.tracing_reference import reference_trace

# Engine and reference run the same float32 model on different batch shapes (the engine also
# resumes at a late layer and token), so their logits differ by summation order alone. A
# probability moves by at most 2p(1 - p) max|dl| <= max|dl|/2, so 1e-5 holds while the
# logits (|l| up to ~30, ulp 2e-6) differ by less than 2e-5, about ten ulps (seen: 3e-7).
TOLERANCE = 1e-5
NUMBERS = ["p_clean", "p_corrupted", "p_restored", "ie"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(params=["smollm2", "gemma3"])
def model(request):
    return request.getfixturevalue(request.param)


def make_fact(subject, answer, new="Rome", prompt="The {} is located in the city of"):
    return ia.Fact(subject=subject, prompt=prompt, target_true=answer, target_new=new)


KNOWN = [make_fact("Eiffel Tower", "Paris"), make_fact("Colosseum", "Rome", new="Paris")]
WRONG = make_fact("Eiffel Tower", "London")  # the models answer Paris


def lens_hooks(bridge) -> int:
    """Hooks on the bridge's hook points (TransformerLens level)."""
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in bridge.hook_dict.values())


def torch_hooks(bridge) -> int:
    """Forward hooks at the torch level (the bridge keeps a fixed set of its own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bridge.modules())


def compare(result: TraceResult, reference_rows) -> float:
    engine = result.to_dataframe().set_index(["fact", "kind", "token", "layer"]).sort_index()
    reference = pd.DataFrame(reference_rows)
    reference = reference.set_index(["fact", "kind", "token", "layer"]).sort_index()
    assert list(engine.index) == list(reference.index)
    return float((engine[NUMBERS] - reference[NUMBERS]).abs().max().max())


# --------------------------------------------------------------------------- equality
def configs(n_layers: int):
    last = n_layers - 1
    return {
        "windowed": dict(
            # window 4 at layer 1 is cut at layer 0; at last - 1 it ends at the last layer
            kinds=("resid", "mlp", "attn"), layers=[1, last - 1], window=4,
            tokens=["subject_first", "last"],
        ),
        "severed_mlp": dict(
            kinds=("resid",), layers=[1, last - 1], severed="mlp", tokens=["subject_last"]
        ),
        "severed_attn": dict(
            kinds=("resid",), layers=[2], severed="attn", tokens=["subject_middle", "last"]
        ),
    }


@pytest.mark.parametrize("name", ["windowed", "severed_mlp", "severed_attn"])
def test_engine_equals_reference(model, name):
    settings = configs(model.n_layers)[name]
    facts = KNOWN + [WRONG]
    reference_rows, reference_skipped = reference_trace(model, facts, samples=3, **settings)
    # 2 rows < 3 noise draws: a site's draws straddle forwards; 8 rows: a few sites each.
    for batch_size in (2 if settings.get("severed") else 8, None):
        result = trace(
            model, facts, samples=3, batch_size=batch_size, progress=False, **settings
        )
        assert compare(result, reference_rows) < TOLERANCE, (name, batch_size)
        assert result.n_skipped == 1 and result.skipped[0] is WRONG
        assert [f.key for f in result.skipped] == reference_skipped
        assert "is not the answer" in result.skip_reasons[0]
        assert set(result.table["severed"]) == {settings.get("severed") or "none"}
    assert lens_hooks(model.bridge) == 0


def test_engine_equals_reference_on_every_token_at_late_layers(smollm2):
    # Many restore sites per forward, starting at many different tokens and layers.
    settings = dict(kinds=("resid", "attn"), layers=[29], window=3, tokens="all")
    reference_rows, _ = reference_trace(smollm2, KNOWN[:1], samples=2, **settings)
    result = trace(smollm2, KNOWN[:1], samples=2, batch_size=7, progress=False, **settings)
    assert compare(result, reference_rows) < TOLERANCE
    classes = result.table.drop_duplicates("token").set_index("token")["token_class"].to_dict()
    assert classes == {1: "subject_first", 2: "subject_middle", 3: "subject_last", 4: "further",
                       5: "further", 6: "further", 7: "further", 8: "further", 9: "last"}


def test_schedule_covers_every_row_once_within_the_batch_size():
    sites = [
        tracing.Site(kind, t, l, r.start, r)
        for kind in ("resid", "attn")
        for t in (2, 5)
        for l in range(12)
        for r in [range(l, l + 1) if kind == "resid" else tracing.window_layers(l, 4, 12)]
    ]
    for batch_size in (1, 2, 3, 7, 30, 1000):
        chunks = tracing._schedule(sites, 3, batch_size, 12, 8)
        rows = sorted(row for chunk in chunks for row in chunk)
        assert rows == [(i, s) for i in range(len(sites)) for s in range(3)]
        assert all(0 < len(chunk) <= batch_size for chunk in chunks)
        if batch_size >= 3:  # noise draws of a site stay in one forward
            assert all(len({s for i, s in chunk}) == 3 or len(chunk) % 3 == 0 for chunk in chunks)


def test_restoring_a_state_the_noise_cannot_reach_has_no_effect(smollm2):
    # Layer 0, after the subject: the embedding there is not noised, so IE is 0 (up to
    # the rounding of a different batch). Both probabilities are p_corrupted ~ 0.007, so
    # |IE| <= 2p max|dl| ~ 0.015 max|dl| stays below 1e-6 for logit gaps up to ~7e-5.
    result = trace(smollm2, KNOWN[:1], kinds=("resid",), layers=[0], tokens=["further"],
                   samples=2, progress=False)
    assert result.table["ie"].abs().max() < 1e-6


# --------------------------------------------------------------------------- hooks
def test_hooks_do_not_leak_after_an_exception(smollm2, monkeypatch):
    tokens = torch.tensor(smollm2.tokenize(KNOWN[0].text))
    with torch.no_grad():
        before_logits = smollm2.bridge(tokens)
    before = torch_hooks(smollm2.bridge)

    def failing_hook(rows, positions, values):
        def fail(x, hook=None):
            raise RuntimeError("boom mid-forward")

        return fail

    monkeypatch.setattr(tracing, "overwrite_hook", failing_hook)
    with pytest.raises(RuntimeError, match="boom mid-forward"):
        trace(smollm2, KNOWN[:1], layers=[20], tokens="last", samples=2, progress=False)
    assert lens_hooks(smollm2.bridge) == 0 and torch_hooks(smollm2.bridge) == before
    for block in smollm2.bridge.blocks:
        assert "forward" not in vars(block)  # skipped blocks are restored
        assert getattr(block, "_start_at_layer_idx", None) is None
    with torch.no_grad():  # bit for bit: the same forward on the same weights, hooks gone
        torch.testing.assert_close(smollm2.bridge(tokens), before_logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kinds=("resid", "ffn")), "unknown kind 'ffn'"),
        (dict(tokens=["subject_last", "object"]), "unknown token class 'object'"),
        (dict(tokens="before"), "'before' is not traced"),
        (dict(tokens=[]), "empty list"),
        (dict(window=31), "window=31 is larger than the model's 30 layers"),
        (dict(window=0), "window must be a positive integer"),
        (dict(severed="ffn"), "severed must be one of"),
        (dict(severed="mlp", kinds=("resid", "mlp")), "restores the residual stream only"),
        (dict(layers=[0, 30]), r"layer 30 is outside the model; layers must be in \[0, 29\]"),
        (dict(samples=0), "samples must be a positive integer"),
        (dict(noise=-1.0), "noise scale must be a positive number"),
        (dict(noise="big"), "noise must be a positive number"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
    ],
)
def test_bad_settings_raise_clear_errors(smollm2, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trace(smollm2, KNOWN, progress=False, **kwargs)


def test_no_facts_or_no_known_facts_raise(smollm2):
    with pytest.raises(ValueError, match="facts is empty"):
        trace(smollm2, [], progress=False)
    with pytest.raises(ValueError, match="none of the 1 facts is answered correctly.*London"):
        trace(smollm2, [WRONG], progress=False)
    with pytest.raises(ValueError, match=r"facts\[0\] must be a Fact"):
        trace(smollm2, ["The Eiffel Tower is in"], progress=False)


def test_a_fact_without_target_true_is_skipped(smollm2):
    unknown = ia.Fact(subject="Eiffel Tower", prompt="The {} is located in the city of",
                      target_true=None, target_new="Rome")
    result = trace(smollm2, [KNOWN[0], unknown], kinds=("resid",), layers=[29], tokens="last",
                   samples=1, progress=False)
    assert result.n_skipped == 1 and result.skip_reasons == ("no target_true",)


def test_subject_span_and_empty_subject(smollm2, gemma3):
    fact = KNOWN[0]
    for handle, expected in ((smollm2, (1, 4)), (gemma3, (2, 4))):  # Gemma adds a BOS
        start, end = tracing.subject_span(handle, fact)
        assert (start, end) == expected
        ids = handle.tokenize(fact.text)[0][start:end]
        assert handle.tokenizer.decode(ids).strip() == "Eiffel Tower"
    at_start = make_fact("Paris", "France", prompt="{} is the capital of")
    assert tracing.subject_span(smollm2, at_start)[0] == 0
    assert tracing.subject_span(gemma3, at_start)[0] == 1
    # A tokenizer under which the subject adds no token.
    stub = types.SimpleNamespace(tokenize=lambda text: [[5, 6, 7]])
    with pytest.raises(ValueError, match="covers no tokens"):
        tracing.subject_span(stub, fact)


def test_token_classes():
    assert tracing.token_classes(8, 1, 4) == [
        None, "subject_first", "subject_middle", "subject_last",
        "further", "further", "further", "last",
    ]
    assert tracing.token_classes(4, 0, 1) == ["subject_last", "further", "further", "last"]
    assert tracing.token_classes(3, 1, 3) == [None, "subject_first", "subject_last"]


def test_noise_scales_and_draws(gemma3):
    assert Noise(0.1, relative=False).std(gemma3) == 0.1  # an absolute std is returned as given
    # exact: Noise.std is this very product, 3.0 times the cached embedding_std
    assert Noise.of(3.0).std(gemma3) == 3 * tracing.embedding_std(gemma3)
    # Gemma scales its embeddings by sqrt(d_model): the std is measured after that. The
    # scale is float32(sqrt(640)) (rel. 4e-8 off), and both stds accumulate in float64 and
    # round to float32 once (6e-8 each), so the two sides agree to ~2e-7: rel 1e-6.
    weight = gemma3.hf_model.get_input_embeddings().weight
    assert tracing.embedding_std(gemma3) == pytest.approx(float(weight.std()) * 640**0.5, rel=1e-6)
    # bit for bit: the same seeded CPU generator; another seed or fact key draws other noise
    a = tracing.noise_draws(KNOWN[0], 3, 2, 8, seed=0, std=1.0)
    assert torch.equal(a, tracing.noise_draws(KNOWN[0], 3, 2, 8, seed=0, std=1.0))
    assert not torch.equal(a, tracing.noise_draws(KNOWN[0], 3, 2, 8, seed=1, std=1.0))
    assert not torch.equal(a, tracing.noise_draws(KNOWN[1], 3, 2, 8, seed=0, std=1.0))


def test_embedding_std_of_scaled_and_other_embedding_modules():
    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    class Shifted(torch.nn.Embedding):  # not a scaled lookup: every id is embedded
        def forward(self, ids):
            return super().forward(ids) * 2.0 + 1.0

    for module in (Scaled(100, 8), Shifted(100, 8)):
        handle = types.SimpleNamespace(
            hf_model=types.SimpleNamespace(get_input_embeddings=lambda m=module: m),
            bridge=torch.nn.Module(),
        )
        with torch.no_grad():
            expected = float(module(torch.arange(100)).double().std())
        # Scaled: factor exactly 2 and a float32 variance (rel. 6e-8); Shifted: float64 sums
        # of the same float32 values (~1e-15). rel 1e-6 is ten times the larger.
        assert tracing.embedding_std(handle, chunk=7) == pytest.approx(expected, rel=1e-6)


def test_absolute_noise_is_recorded(smollm2):
    result = trace(smollm2, KNOWN[0], kinds=("resid",), layers=[29], tokens="last", samples=1,
                   noise=Noise(0.5, relative=False), progress=False)
    assert result.settings["noise"] == {"scale": 0.5, "relative": False, "std": 0.5}


# --------------------------------------------------------------------------- results
def synthetic_result(ies: dict) -> TraceResult:
    """A result with given IEs: {(fact, kind, token_class, layer): [ie per token]}."""
    rows = []
    for (fact, kind, token_class, layer), values in ies.items():
        for token, ie in enumerate(values):
            rows.append(dict(fact=fact, subject=fact, kind=kind, token=token, token_text="x",
                             token_class=token_class, layer=layer, p_clean=0.9, p_corrupted=0.1,
                             p_restored=0.1 + ie, ie=ie, severed="none"))
    settings = {"kinds": ["resid", "mlp", "attn"]}
    return TraceResult.from_rows(rows, settings, [])


def test_average_indirect_effect_and_contributions():
    result = synthetic_result({
        ("a", "mlp", "subject_last", 0): [0.2],
        ("b", "mlp", "subject_last", 0): [0.4],
        ("c", "mlp", "subject_last", 0): [0.9],
        ("a", "attn", "subject_last", 0): [0.1],
        ("b", "attn", "subject_last", 0): [0.3],
        ("a", "mlp", "subject_middle", 0): [0.0, 1.0],  # averaged within the fact first
        ("b", "mlp", "subject_middle", 0): [0.5],
    })
    aie = result.average_indirect_effect()
    row = aie[(aie.kind == "mlp") & (aie.token_class == "subject_last")].iloc[0]
    values = torch.tensor([0.2, 0.4, 0.9], dtype=torch.float64)
    sem = float(values.std() / 3**0.5)
    # float64 means and stds of a few numbers (pandas there, torch here) agree to ~1e-16:
    # pytest.approx's default rel 1e-6 is ample
    assert row.aie == pytest.approx(0.5) and row.n_facts == 3
    assert row.ci_low == pytest.approx(0.5 - 1.96 * sem)
    assert row.ci_high == pytest.approx(0.5 + 1.96 * sem)
    middle = aie[(aie.kind == "mlp") & (aie.token_class == "subject_middle")].iloc[0]
    assert middle.aie == pytest.approx(0.5) and middle.n_facts == 2
    contributions = result.contributions("subject_last")
    assert list(contributions.columns) == ["layer", "module", "aie", "ci_low", "ci_high", "n_facts"]
    by_module = contributions.set_index("module")["aie"].to_dict()
    assert by_module == pytest.approx({"attn": 0.2, "mlp": 0.5})
    with pytest.raises(ValueError, match="token class 'last' was not traced"):
        result.contributions("last")


def contributions_frame(values: dict) -> pd.DataFrame:
    return pd.DataFrame(
        [dict(layer=l, module=m, aie=v, ci_low=v, ci_high=v) for l, pair in values.items()
         for m, v in zip(("attn", "mlp"), pair)]
    )


def test_balance_formula_and_modes():
    frame = contributions_frame({3: (0.1, 0.3), 4: (0.2, 0.2), 5: (0.6, 0.2)})
    # ratios of float64 sums of a few numbers: ~1e-16, within approx's default rel 1e-6;
    # a fixed alpha is returned as given, so those compare exactly
    alphas = balance(frame)
    assert alphas == pytest.approx({3: 0.25, 4: 0.5, 5: 0.75}) and alphas.notes == []
    assert balance(frame, layers=[3, 4]) == pytest.approx({3: 0.25, 4: 0.5})
    assert balance(frame, mode="global") == pytest.approx(0.9 / 1.6)
    assert balance(frame, layers=[3], mode="global") == pytest.approx(0.25)
    assert alphas.global_alpha == pytest.approx(0.9 / 1.6)
    assert balance(0.3, layers=[4, 3]) == {3: 0.3, 4: 0.3}
    assert balance(0.0, mode="global") == 0.0


def test_balance_clips_negative_and_falls_back_without_evidence():
    frame = contributions_frame({0: (-0.05, 0.2), 1: (0.3, 0.1), 2: (1e-5, -1e-3)})
    with pytest.warns(tracing.BalanceWarning, match="clipped"):
        alphas = balance(frame)
    # clipping gives exactly 0 and the no-evidence fallback exactly 0.5; the ratios are
    # float64 on a few numbers, within approx's default rel 1e-6
    assert alphas[0] == 0.0 and alphas[1] == pytest.approx(0.75)
    assert alphas[2] == pytest.approx((0.3 + 1e-5) / (0.6 + 1e-5))  # no evidence: the global alpha
    assert any("layer 2: both AIEs below" in n for n in alphas.notes)
    nothing = contributions_frame({0: (1e-5, -0.2), 1: (0.0, 0.0)})
    with pytest.warns(tracing.BalanceWarning, match="no evidence"):
        assert balance(nothing, mode="global") == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert balance(nothing) == {0: 0.5, 1: 0.5}


def test_balance_bad_inputs():
    frame = contributions_frame({3: (0.1, 0.3)})
    with pytest.raises(ValueError, match="mode must be"):
        balance(frame, mode="mean")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        balance(1.5, layers=[3])
    with pytest.raises(ValueError, match="needs layers"):
        balance(0.5)
    with pytest.raises(ValueError, match=r"layers \[7\] have no attention and MLP"):
        balance(frame, layers=[3, 7])
    with pytest.raises(ValueError, match="contributions DataFrame"):
        balance(pd.DataFrame({"layer": [1]}))


def test_balance_accepts_a_trace_result():
    result = synthetic_result(
        {("a", "attn", "subject_last", 0): [0.1], ("a", "mlp", "subject_last", 0): [0.3]}
    )
    assert balance(result) == pytest.approx({0: 0.25})  # 0.1 / 0.4 in float64: default rel 1e-6


# --------------------------------------------------------------------------- persistence
SMALL = dict(
    kinds=("resid", "mlp"), layers=[28, 29], window=2, tokens=["subject_last", "last"], samples=2
)


def test_save_load_round_trip(smollm2, tmp_path):
    result = trace(smollm2, KNOWN + [WRONG], progress=False, **SMALL)
    path = result.save(tmp_path / "trace.json")
    loaded = TraceResult.load(path)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), result.to_dataframe())
    assert loaded.settings == result.settings
    assert loaded.facts == result.facts and loaded.skipped == result.skipped
    assert loaded.skip_reasons == result.skip_reasons
    assert json.loads(path.read_text())["format"] == "intattn.TraceResult"
    with pytest.raises(ValueError, match="not a saved TraceResult"):
        (tmp_path / "other.json").write_text("{}")
        TraceResult.load(tmp_path / "other.json")


def test_cache_resumes_an_interrupted_run(smollm2, tmp_path, monkeypatch):
    fresh = trace(smollm2, KNOWN, progress=False, **SMALL)
    real = tracing._restored_probabilities
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run stops during the second fact
        return real(*args, **kwargs)

    monkeypatch.setattr(tracing, "_restored_probabilities", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trace(smollm2, KNOWN, cache_dir=tmp_path, progress=False, **SMALL)
    files = sorted(tmp_path.rglob("trace-*.json"))
    assert len(files) == 2 and all(KNOWN[0].key in f.name for f in files)  # fact 1: resid, mlp
    assert not list(tmp_path.rglob(".*.tmp"))  # no half-written file

    monkeypatch.setattr(tracing, "_restored_probabilities", real)
    resumed = trace(smollm2, KNOWN, cache_dir=tmp_path, progress=False, **SMALL)
    # Bit for bit: fact 1 comes back from JSON (float64 repr round-trips exactly) and fact 2
    # is recomputed with the same sites, batches and shapes as in the uninterrupted run.
    pd.testing.assert_frame_equal(
        resumed.to_dataframe(), fresh.to_dataframe(), rtol=0, atol=0
    )
    assert len(list(tmp_path.rglob("trace-*.json"))) == 4

    def no_compute(*args, **kwargs):
        raise AssertionError("a cached result was recomputed")

    monkeypatch.setattr(tracing, "_restored_probabilities", no_compute)
    monkeypatch.setattr(tracing, "_clean_run", no_compute)
    again = trace(smollm2, KNOWN, cache_dir=tmp_path, progress=False, **SMALL)
    # bit for bit: every number is a cache hit, read back from the same files
    pd.testing.assert_frame_equal(again.to_dataframe(), resumed.to_dataframe(), rtol=0, atol=0)


def test_cache_key_covers_every_setting(smollm2, tmp_path):
    base = tracing._settings(smollm2, ("resid",), "all", None, 10, 10, 3.0, None, 0)
    path = tracing._cache_entry(tmp_path, smollm2, KNOWN[0], "resid", base).path
    variants = [
        dict(tokens="last"), dict(layers=[1]), dict(window=5), dict(samples=3),
        dict(noise=Noise(3.0, relative=False)), dict(severed="mlp"), dict(seed=1),
    ]
    for change in variants:
        args = dict(kinds=("resid",), tokens="all", layers=None, window=10, samples=10, noise=3.0,
                    severed=None, seed=0) | change
        other = tracing._settings(smollm2, *args.values())
        assert tracing._cache_entry(tmp_path, smollm2, KNOWN[0], "resid", other).path != path, change
    assert tracing._cache_entry(tmp_path, smollm2, KNOWN[1], "resid", base).path != path
    assert tracing._cache_entry(tmp_path, smollm2, KNOWN[0], "mlp", base).path != path
