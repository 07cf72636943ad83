"""The bfloat16 and float16 path: the whole pipeline on a tiny random Llama loaded in half
precision (unit tier) and on SmolLM2 loaded in bfloat16 (models tier), with each row of
the precision policy (``docs/design.md``, "Precision") checked where it is enforced.
The precision experiment's float32 units are checked against the editors experiment's in
``tests/test_families.py``, which runs both on tiny Qwen2 and Mistral models.

No tolerance is needed: the checks are of dtypes, of bit-for-bit restores, of updates
handed to the one cast in float64, of finite results, and of token ids equal to token ids.
"""

from __future__ import annotations

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis import corpus as corpus_module
from intattn_analysis.corpus import CorpusError, ModelSamples
from intattn_analysis.editors import edit
from intattn_analysis.editors import result as result_module
from intattn_analysis.editors.moments import moments_for
from intattn_analysis.hparams import EditHparams, FTHparams, PMETHparams, RomeHparams
from intattn_analysis.targets import compute_z

HALF = ("bfloat16", "float16")
LAYERS = (1, 2)
FACTS = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
    ia.Fact.from_text("w14 w25 w26 w27", "w14", "w42 w43", target_true="w52"),
]
TARGETS = dict(n_context_templates=3, context_template_length=4, v_steps=4)
#: A small sample of the model's own text for the second moments (the default corpus).
MOMENTS = dict(mom2_n_tokens=600, mom2_max_len=16)


@pytest.fixture(scope="module", params=HALF)
def half(request, tiny_llama, one_thread):
    """The tiny Llama's checkpoint loaded again in half precision."""
    model = ia.load_model(tiny_llama.name, dtype=request.param, device="cpu")
    assert model.dtype == getattr(torch, request.param) and model.weight("mlp", 1).dtype == model.dtype
    return model


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.hf_model.named_parameters()}


def _settings(threshold: float) -> dict:
    memit = EditHparams(layers=LAYERS, alpha=0.0, lambda_mlp=4.0, lambda_attn=4.0, **TARGETS, **MOMENTS)
    return {
        "memit": memit,
        "intattn": memit.replace(alpha=0.5),
        "alphaedit": memit.replace(projection="null_space", nullspace_threshold=threshold),
        "pmet": PMETHparams(layers=LAYERS, lambda_mlp=4.0, **TARGETS, **MOMENTS),
        "rome": RomeHparams(layers=(1,), **TARGETS, **MOMENTS),
        "ft-l": FTHparams(layers=(1,), objective="prompt_last", lr=1e-2, steps=3),
        "ft-m": FTHparams(layers=(1,), objective="target_new", lr=1e-2, steps=3, norm_constraint=None),
    }


def _threshold(moments) -> float:
    """AlphaEdit's threshold: above half of every MLP moment's eigenvalues, so that each
    layer's null space holds half its key space or more."""
    medians = []
    for layer in LAYERS:
        values = torch.linalg.eigvalsh(moments[("mlp", layer)].double())
        middle = values.numel() // 2
        medians.append(float((values[middle - 1] + values[middle]) / 2))
    return max(medians)


def test_the_whole_pipeline_runs_in_half_precision(half, monkeypatch):
    """Trace, second moments, targets, every editor, evaluation and restore, in the model's
    half precision, each step in the dtype the policy gives it."""
    dtype = half.dtype
    # trace: the answer's probability is a float32 softmax, finite in every cell
    traced = ia.trace(half, FACTS[:1], samples=2, window=1, answered_only=False, progress=False)
    table = traced.to_dataframe()
    assert traced.n_facts == 1 and len(table)
    numbers = table.select_dtypes("number").to_numpy(dtype="float64")
    assert numbers.size and bool(torch.isfinite(torch.from_numpy(numbers)).all())
    # second moments: float32 products summed in float64
    hp = _settings(0.0)["memit"]
    moments = moments_for(half, [(m, l) for m in ("mlp", "attn") for l in LAYERS], hp, progress=False)
    assert all(m.dtype == torch.float64 and bool(torch.isfinite(m).all()) for m in moments.values())
    # targets: float32 leaves whatever the model's dtype
    targets = compute_z(half, FACTS, hp, progress=False)
    assert targets.z.dtype == targets.delta.dtype == targets.h.dtype == torch.float32
    assert bool(torch.isfinite(targets.z).all())

    handed: list[tuple[tuple, torch.dtype]] = []
    real_write = result_module.write_weight

    def recording_write(model, key, delta):
        handed.append((key, delta.dtype))
        return real_write(model, key, delta)

    monkeypatch.setattr(result_module, "write_weight", recording_write)
    before = _parameters(half)
    pre = ia.evaluate(half, FACTS, metrics=("knowedit",), progress=False)
    for method, settings in _settings(_threshold(moments)).items():
        handed.clear()
        shared = targets if method in ("memit", "intattn", "alphaedit") else None
        with edit(half, FACTS, method=method, hparams=settings, moments=moments, targets=shared,
                  progress=False) as result:
            assert result.deltas, method
            assert all(d.dtype == dtype for d in result.deltas.values()), method
            if not method.startswith("ft"):
                # the update reaches its one cast in float64: solved there, rounded once
                assert handed and all(d == torch.float64 for _, d in handed), (method, handed)
            changed = [k for k in result.deltas if not torch.equal(half.weight(*k).detach(), before[_name(half, k)])]
            assert changed, f"{method} left every weight as it was in {dtype}"
            after = ia.evaluate(half, FACTS, pre=pre, metrics=("knowedit",), progress=False)
            values = after.per_fact[["Edit Succ."]].to_numpy()
            assert torch.isfinite(torch.tensor(values, dtype=torch.float64)).all(), method
        now = _parameters(half)
        assert all(torch.equal(now[n], before[n]) for n in before), f"{method} did not restore bit for bit"
    assert half.open_edits == 0


def _name(model, key) -> str:
    weight = model.weight(*key)
    return next(n for n, p in model.hf_model.named_parameters() if p is weight)


def test_the_corpus_text_is_the_checkpoints_in_every_dtype(tiny_llama, half, tmp_path, monkeypatch):
    """Samples drawn for a half-precision model are the float32 checkpoint's: the same
    tokens as the float32 model draws, under one cache entry that both read."""
    samples = ModelSamples(seed=4, batch=4)
    drawn_half = samples.sequences(half, 60, 12, cache_dir=tmp_path / "a", progress=False)
    drawn_full = samples.sequences(tiny_llama, 60, 12, cache_dir=tmp_path / "b", progress=False)
    assert drawn_half == drawn_full
    key = samples._cache_key(half, 12)
    assert key == samples._cache_key(tiny_llama, 12)
    assert key["model"] == half.cache_id and key["dtype"] == "torch.float32"

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the checkpoint's text is cached")

    monkeypatch.setattr(corpus_module, "_hf_sampler", no_sampling)
    assert samples.sequences(tiny_llama, 60, 12, cache_dir=tmp_path / "a", progress=False) == drawn_half


def test_a_half_model_whose_checkpoint_cannot_be_reloaded_is_refused(half, tmp_path, monkeypatch):
    """Where the float32 checkpoint cannot be reloaded, sampling through a half-precision
    model would not give the checkpoint's text: refused, naming the ways out."""
    import transformers

    def unreadable(*args, **kwargs):
        raise OSError("checkpoint gone")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreadable)
    with pytest.raises(CorpusError, match="float32.*text corpus"):
        ModelSamples(seed=5, batch=4).sequences(half, 20, 8, cache_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.models
def test_smollm2_in_bfloat16_traces_edits_evaluates_and_restores(tmp_path, monkeypatch):
    """SmolLM2 loaded in bfloat16: a trace, the shipped float32 corpus text (no sampling),
    MEMIT, IntAttn-Edit and AlphaEdit on shared targets, evaluation, exact restores.
    Target steps and the corpus sample are cut (2 steps, 4,000 tokens): on a CPU without
    bfloat16 matrix instructions each bfloat16 backward pass is emulated and slow."""
    from intattn_analysis.editors.api import batch_targets
    from intattn_analysis.hparams import hparams_for

    def no_sampling(*args, **kwargs):
        raise AssertionError("the bfloat16 model sampled a corpus; the shipped float32 samples should serve it")

    monkeypatch.setattr(corpus_module, "_hf_sampler", no_sampling)
    monkeypatch.setattr(corpus_module, "_bridge_sampler", no_sampling)
    model = ia.load_model("smollm2-135m", dtype="bfloat16", device="cpu")
    facts = [f for f in ia.load_facts("builtin") if f.known.get(model.name)][:2]
    traced = ia.trace(model, facts[:1], samples=2, window=6, layers=[2, 3, 4], progress=False)
    assert traced.n_facts == 1, "SmolLM2 in bfloat16 no longer answers a fact it knows in float32"
    before = _parameters(model)
    pre = ia.evaluate(model, facts, metrics=("knowedit",), progress=False)
    shared: dict = {}
    for method, extra in (("memit", {}), ("intattn", {"alpha": 0.3}), ("alphaedit", {})):
        hp = hparams_for(model, method).replace(v_steps=2, mom2_n_tokens=4_000, **extra)
        targets = batch_targets(model, facts, method, hp, shared)
        assert targets.z.dtype == torch.float32
        with edit(model, facts, method=method, hparams=hp, targets=targets, progress=False) as result:
            assert all(d.dtype == torch.bfloat16 for d in result.deltas.values())
            after = ia.evaluate(model, facts, pre=pre, metrics=("knowedit",), progress=False)
            assert after.per_fact["Edit Succ."].notna().all()
        now = _parameters(model)
        assert all(torch.equal(now[n], before[n]) for n in before), f"{method} did not restore bit for bit"


# ----------------------------------------------------------------------------- the policy's reasons
def test_attribution_patching_runs_in_half_precision(half):
    traced = ia.trace(half, FACTS[:1], samples=2, window=1, answered_only=False, method="attribution",
                      progress=False)
    estimates = traced.to_dataframe()["ie"].to_numpy(dtype="float64")
    assert estimates.size and bool(torch.isfinite(torch.tensor(estimates)).all())


def test_float16_targets_need_the_loss_scale(tiny_llama, monkeypatch):
    """Unscaled, the gradients of a float16 target's loss flush to zero on the tiny model's
    small weights and the target never moves; scaled, it moves as in float32."""
    from intattn_analysis import model_access

    model = ia.load_model(tiny_llama.name, dtype="float16", device="cpu")
    hp = _settings(0.0)["memit"]
    scaled = compute_z(model, FACTS, hp, progress=False)
    reference = compute_z(tiny_llama, FACTS, hp, progress=False)
    monkeypatch.setattr(model_access, "FLOAT16_LOSS_SCALE", 1.0)
    unscaled = compute_z(model, FACTS, hp, progress=False)
    assert float(unscaled.delta.abs().max()) == 0.0
    assert float(scaled.delta.norm()) > 0.5 * float(reference.delta.norm()) > 0


@pytest.mark.parametrize("dtype", HALF)
def test_fine_tuning_steps_accumulate_in_float32_masters(dtype):
    """Adam's steps of 5e-6 on half-precision weights of 0.02 are each below half the
    spacing there (6e-5 in bfloat16, 7.6e-6 in float16), so stepping the weights themselves
    leaves them as they were; stepping float32 masters accumulates 20 steps (1e-4) until
    the weights change."""
    from intattn_analysis.editors.methods.ft import _Trained

    def train(masters: bool) -> torch.Tensor:
        weight = torch.full((4, 4), 0.02, dtype=getattr(torch, dtype), requires_grad=True)
        trained = _Trained([weight], weight.dtype)
        optimizer = torch.optim.Adam(trained.masters if masters else [weight], lr=5e-6)
        for _ in range(20):
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = weight.float().sum()
                if masters:
                    assert trained.backward(loss)
                else:
                    loss.backward()
            optimizer.step()
            if masters:
                trained.write()
        return weight.detach()

    start = torch.tensor(0.02, dtype=getattr(torch, dtype))
    assert bool((train(masters=False) == start).all())
    assert bool((train(masters=True) < start).all())
