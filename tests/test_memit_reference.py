"""``ia.edit(method="memit")`` against a port of MEMIT's reference algorithm
(``tests/memit_reference.py``) on a tiny random Llama, given the same targets, second
moments and context prefixes.

Tolerance: both sides solve in float64, but they read their keys and residual states in
separate float32 forwards (TransformerLens bridge here, plain Hugging Face there) and
write float32 updates, so keys agree to float32 rounding (relative ~1e-7, compounded
over 3 layers). The solve multiplies a relative key error by at most the condition
number of ``λ C + K Kᵀ``, which the test measures and bounds by 100, so ΔW must agree
to 1e-7 · 100 = 1e-5 relative (Frobenius). The key weighting alone moves ΔW by far more
than that, which the second test shows.
"""

from __future__ import annotations

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis import targets as targets_module
from intattn_analysis.editors import edit
from intattn_analysis.hparams import EditHparams

from memit_reference import compute_ks, execute_memit

LAYERS = (1, 2)
RELATIVE = 1e-5  # see the module notes
FACTS = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
    ia.Fact.from_text("w14 w25 w26 w27", "w14", "w42 w43", target_true="w52"),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def setting(tiny):
    hp = EditHparams(layers=LAYERS, alpha=0.0, lambda_mlp=4.0, n_context_templates=3,
                     context_template_length=4, v_steps=4)
    generator = torch.Generator().manual_seed(0)
    moments = {}
    for layer in LAYERS:
        d_in = tiny.weight("mlp", layer).shape[1]
        basis = torch.randn(4 * d_in, d_in, generator=generator)
        moments[("mlp", layer)] = basis.T @ basis / basis.shape[0]
    targets = ia.compute_z(tiny, FACTS, hp, progress=False)
    return hp, moments, targets


def _reference(tiny, setting):
    hp, moments, targets = setting
    templates = targets.context_templates
    context_types = [[t for t in templates if t == "{}"], [t for t in templates if t != "{}"]]
    down_proj = lambda layer: tiny.hf_model.get_submodule(tiny.layer(layer).mlp_module)
    originals = {l: down_proj(l).weight.detach().clone() for l in LAYERS}
    try:
        deltas = execute_memit(
            tiny.hf_model, tiny.tokenizer, FACTS, targets.z, LAYERS,
            {l: moments[("mlp", l)] for l in LAYERS}, hp.lambda_mlp, context_types, down_proj,
            lambda layer: tiny.hf_model.model.layers[layer],
        )
    finally:
        with torch.no_grad():
            for l, w in originals.items():
                down_proj(l).weight.copy_(w)
    return deltas


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_memit_equals_the_reference_port(tiny, setting):
    hp, moments, targets = setting
    assert len(targets.context_templates) == 4  # the bare prompt and 3 prefixes: weights differ
    reference = _reference(tiny, setting)
    with edit(tiny, FACTS, method="memit", hparams=hp, moments=moments, targets=targets,
              progress=False) as result:
        deltas = {l: result.deltas[("mlp", l)] for l in LAYERS}
    context_types = [["{}"], [t for t in targets.context_templates if t != "{}"]]
    for layer in LAYERS:
        module = tiny.hf_model.get_submodule(tiny.layer(layer).mlp_module)
        keys = compute_ks(tiny.hf_model, tiny.tokenizer, FACTS, module, context_types).double()
        system = hp.lambda_mlp * moments[("mlp", layer)].double() + keys.T @ keys
        assert torch.linalg.cond(system) < 100  # the error amplification bound used above
        error = _relative(deltas[layer], reference[layer])
        print(f"layer {layer}: relative difference {error:.2e}")
        assert error <= RELATIVE, (layer, error)


def test_equal_key_weights_would_fail_the_reference(tiny, setting, monkeypatch):
    """The project's earlier equal weighting of the contexts misses the reference by far
    more than the tolerance: the test can tell the two apart."""
    hp, moments, targets = setting
    reference = _reference(tiny, setting)
    monkeypatch.setattr(
        "intattn_analysis.editors.methods.closed_form.context_weights",
        lambda templates: [1.0 / len(templates)] * len(templates),
    )
    with edit(tiny, FACTS, method="memit", hparams=hp, moments=moments, targets=targets,
              progress=False) as result:
        error = _relative(result.deltas[("mlp", LAYERS[0])], reference[LAYERS[0]])
    assert error > 100 * RELATIVE, error


def test_context_weights_follow_compute_ks():
    assert targets_module.context_weights(["{}"]) == [1.0]
    weights = targets_module.context_weights(["{}", "a. {}", "b. {}", "c. {}", "d. {}", "e. {}"])
    assert weights == pytest.approx([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], abs=0)
    assert sum(weights) == pytest.approx(1.0, abs=1e-15)  # five 0.1s and a 0.5 in float64
