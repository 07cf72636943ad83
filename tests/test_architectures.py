"""The architecture table on tiny randomly initialised models of every supported class.

Each model is saved to a directory and loaded back through ``ia.load_model(directory)``,
the same code path a user's local checkpoint takes.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import intattn_analysis as ia
from intattn_analysis.architectures import HOOKS, arch_for, hook

SMALL = dict(vocab_size=128)
LLAMA_LIKE = dict(
    SMALL, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)
TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
    "gemma3": lambda: transformers.Gemma3TextConfig(**LLAMA_LIKE, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(**SMALL, n_embd=64, n_layer=3, n_head=4, n_positions=64),
    "gptj": lambda: transformers.GPTJConfig(
        **SMALL, n_embd=64, n_layer=3, n_head=4, n_positions=64, rotary_dim=8
    ),
}


def test_every_architecture_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(ia.ARCHITECTURES)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory, tiny_tokenizer_dir):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[request.param]())
    # Random init leaves the Gemma post-norm weights at their identity value; perturb
    # every norm so the test can tell normed from un-normed outputs apart.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(directory)
    handle = ia.load_model(str(directory), device="cpu")
    assert handle.spec.name == request.param
    return handle


@pytest.fixture(scope="module")
def run(tiny):
    torch.manual_seed(1)
    tokens = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        logits, cache = tiny.bridge.run_with_cache(tokens)
    return tokens, logits, cache


def test_bridge_matches_hf_model(tiny, run):
    tokens, logits, _ = run
    with torch.no_grad():
        reference = tiny.hf_model(tokens).logits
    # Bit for bit: the bridge runs the checkpoint's own modules (no compatibility mode),
    # so both forwards are the same float32 operations on the same ids.
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)


def test_every_hook_in_the_vocabulary_exists(tiny):
    names = set(tiny.bridge.hook_dict)
    for layer in range(tiny.n_layers):
        for key, template in HOOKS.items():
            name = hook(key, layer)
            assert name in names, f"{tiny.spec.name}: hook {name} missing"


def test_residual_stream_decomposes(tiny, run):
    _, _, cache = run
    for layer in range(tiny.n_layers):
        total = (
            cache[hook("resid_pre", layer)]
            + cache[hook("attn_out", layer)]
            + cache[hook("mlp_out", layer)]
        )
        # Bit for bit where the block itself adds (resid_pre + attn_out) + mlp_out; GPT-J adds
        # attn + mlp first, a float32 reassociation off by <= 2u(|r|+|a|+|m|) ~ 4e-6 for
        # entries up to 10 (u = 6e-8; Gemma's scaled embeddings are the largest here).
        torch.testing.assert_close(total, cache[hook("resid_post", layer)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["mlp", "attn"])
def test_key_hooks_see_the_spec_modules_inputs(tiny, run, which):
    """The module at the spec's path receives exactly what the key hook sees, and its
    weight maps that key to what the value hook sees."""
    tokens, _, cache = run
    for layer in range(tiny.n_layers):
        spec = tiny.layer(layer)
        module = tiny.module(which, layer)
        seen = {}
        handle = module.register_forward_hook(
            lambda mod, args, out: seen.update(key=args[0].detach(), value=out.detach())
        )
        try:
            with torch.no_grad():
                tiny.hf_model(tokens)
        finally:
            handle.remove()
        key = cache[spec.key_hook(which)].flatten(start_dim=2)  # attn: heads -> one axis
        # Bit for bit: both forwards run the same modules on the same ids, and the hook
        # holds the tensor the module receives (flattened over heads).
        torch.testing.assert_close(seen["key"], key, rtol=0, atol=0)
        weight = module.weight
        matrix = weight if tiny.spec.weight_layout == "out_in" else weight.T
        expected = key @ matrix.T
        if getattr(module, "bias", None) is not None:
            expected = expected + module.bias
        # A product recomputed by another kernel (another summation order): float32 error at
        # most K·u·sum|w·x| ~ 256 × 6e-8 × 0.4 ~ 6e-6 for these keys (|x| < 1) and weights
        # (std 0.02), so 1e-5 absolute, and 1e-5 relative for larger values.
        torch.testing.assert_close(cache[spec.value_hook(which)], expected, rtol=1e-5, atol=1e-5)
        assert matrix.shape == (tiny.d_model, key.shape[-1])


@pytest.mark.parametrize("which", ["mlp", "attn"])
def test_post_norms_are_recorded(tiny, run, which):
    """Where the spec names a post-norm, the residual-stream output is the normed module
    output; elsewhere it is the module output itself."""
    _, _, cache = run
    for layer in range(tiny.n_layers):
        spec = tiny.layer(layer)
        value = cache[spec.value_hook(which)]
        out = cache[spec.mlp_out_hook if which == "mlp" else spec.attn_out_hook]
        norm_path = spec.mlp_post_norm if which == "mlp" else spec.attn_post_norm
        if norm_path is None:
            # Bit for bit: without a post-norm the block's module output is the
            # projection's output itself (dropout is the identity in eval mode).
            torch.testing.assert_close(out, value, rtol=0, atol=0)
        else:
            norm = tiny.hf_model.get_submodule(norm_path)
            norm = getattr(norm, "original_component", None) or norm
            # The bridge may evaluate the RMSNorm its own way (gain 1 + w): a float32 mean of
            # d = 64 squares and a rescale, relative error a few u·sqrt(64) ~ 5e-7 on outputs
            # up to ~5, well inside 1e-5 relative and absolute.
            with torch.no_grad():
                torch.testing.assert_close(out, norm(value), rtol=1e-5, atol=1e-5)
            # The norm rescales by 1/rms(x) with gains perturbed by 0.3: outputs move by O(1),
            # far above 1e-3, itself far above float32 rounding of values this size.
            assert not torch.allclose(out, value, atol=1e-3)


def test_layer_outside_the_model_is_rejected(tiny):
    with pytest.raises(IndexError, match=r"layer must be in \[0, 3\)"):
        tiny.layer(3)


def test_unknown_architecture_names_the_class_and_the_fix(tmp_path, tiny_tokenizer_dir):
    config = transformers.OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
        word_embed_proj_dim=32,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path)
    with pytest.raises(ia.UnknownArchitectureError, match="OPTForCausalLM.*Add an ArchSpec"):
        ia.load_model(str(tmp_path), device="cpu")


def test_arch_for_accepts_names_classes_and_instances():
    assert arch_for("Qwen2ForCausalLM").name == "qwen2"
    assert arch_for(transformers.GPT2LMHeadModel).name == "gpt2"
    with pytest.raises(ia.UnknownArchitectureError):
        arch_for("BertModel")
