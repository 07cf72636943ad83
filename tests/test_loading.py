"""Loading the embedded models, and what happens with names that cannot load offline."""

from __future__ import annotations

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.architectures import hook
from intattn_analysis.known import greedy_continuation


@pytest.fixture(params=["smollm2", "gemma3"])
def embedded(request):
    return request.getfixturevalue(request.param)


EXPECTED = {
    "smollm2-135m": dict(arch="llama", n_layers=30, d_model=576, d_mlp=1536, d_attn=576),
    "gemma-3-270m": dict(arch="gemma3", n_layers=18, d_model=640, d_mlp=2048, d_attn=1024),
}


def test_embedded_model_shapes(embedded):
    expected = EXPECTED[embedded.name]
    assert embedded.spec.name == expected["arch"]
    assert embedded.n_layers == expected["n_layers"]
    assert embedded.d_model == expected["d_model"]
    assert embedded.weight("mlp", 0).shape == (expected["d_model"], expected["d_mlp"])
    assert embedded.weight("attn", 0).shape == (expected["d_model"], expected["d_attn"])
    assert embedded.revision and embedded.cache_id.startswith(embedded.name + "@")


def test_embedded_model_answers_a_simple_fact(embedded):
    continuation = greedy_continuation(embedded, "The Eiffel Tower is located in the city of", 3)
    assert continuation.lstrip().startswith("Paris")


def test_embedded_model_bridge_equals_hf_and_decomposes(embedded):
    tokens = torch.tensor(embedded.tokenize("The Eiffel Tower is located in the city of"))
    with torch.no_grad():
        logits, cache = embedded.bridge.run_with_cache(tokens)
        reference = embedded.hf_model(tokens).logits
    # Bit for bit: the bridge runs the checkpoint's own modules (no compatibility mode), so
    # both forwards are the same float32 operations on the same ids.
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    for layer in (0, embedded.n_layers // 2, embedded.n_layers - 1):
        total = cache[hook("resid_pre", layer)] + cache[hook("attn_out", layer)] + cache[
            hook("mlp_out", layer)
        ]
        # Bit for bit: Llama's and Gemma-3's layers add (resid_pre + attn_out) + mlp_out in
        # this order and the hooks hold the tensors they add. No absolute tolerance would do
        # anyway: SmolLM2's first position carries entries near 2e4, where one ulp is 2e-3.
        torch.testing.assert_close(total, cache[hook("resid_post", layer)], rtol=0, atol=0)


def test_gemma_records_its_post_norms(gemma3):
    spec = gemma3.layer(0)
    assert gemma3.spec.post_norms
    assert spec.attn_post_norm == "model.layers.0.post_attention_layernorm"
    assert spec.mlp_post_norm == "model.layers.0.post_feedforward_layernorm"


def test_converted_checkpoint_equals_the_gguf_load(smollm2):
    """The cached float32 directory holds exactly the weights transformers dequantises
    from the GGUF file, bit for bit."""
    from transformers import AutoModelForCausalLM

    from intattn_analysis.loading import EMBEDDED_MODELS

    gguf = EMBEDDED_MODELS["smollm2-135m"].locate()
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    converted = dict(smollm2.hf_model.named_parameters())
    # the bridge wraps submodules, so compare by the checkpoint's own parameter names
    converted = {n.replace("._original_component", ""): p for n, p in converted.items()}
    direct_parameters = dict(direct.named_parameters())
    assert set(direct_parameters) <= set(converted)
    for name, parameter in direct_parameters.items():
        # bit for bit: safetensors stores the dequantised float32 values as they are
        assert torch.equal(parameter, converted[name]), name


def test_hub_id_offline_names_the_models_that_work(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ia.ModelLoadError, match=r"smollm2-135m.*gemma-3-270m") as error:
        ia.load_model("org-that-does-not-exist/model-xyz")
    assert "org-that-does-not-exist/model-xyz" in str(error.value)


def test_sharding_arguments_are_checked():
    with pytest.raises(ValueError, match="device_map or n_devices"):
        ia.load_model("smollm2-135m", device_map="auto", n_devices=2)
    if not torch.cuda.is_available():
        with pytest.raises(ia.ModelLoadError, match="CUDA devices"):
            ia.load_model("smollm2-135m", n_devices=2)


def test_greedy_continuation_equals_a_fresh_hf_model(smollm2):
    """Several greedy tokens through the bridge equal `generate` on an unwrapped model
    (the wrapped model's own `generate` misuses its key-value cache)."""
    from transformers import AutoModelForCausalLM

    from intattn_analysis.loading import _converted_dir, EMBEDDED_MODELS

    fresh = AutoModelForCausalLM.from_pretrained(_converted_dir(EMBEDDED_MODELS["smollm2-135m"]))
    text = "The official currency of Japan is the"
    ids = torch.tensor(smollm2.tokenize(text))
    with torch.no_grad():
        out = fresh.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = smollm2.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert greedy_continuation(smollm2, text, 6) == expected
