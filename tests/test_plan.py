"""``intattn plan``: shapes and parameter counts from configurations alone, the memory of
the weights and second moments against real tensors, and a plan refused where it does not
fit."""

from __future__ import annotations

import pytest
import torch

from intattn_analysis import cli
from intattn_analysis.plan import GIB, ModelShape, PlanDoesNotFit, model_config, plan, summary, unit_memory


@pytest.mark.parametrize("model, parameters", [
    ("smollm2-135m", 134_515_008),  # the loaded model's count (test below for the embedded models)
    ("gemma-3-270m", 268_098_176),
    ("Qwen/Qwen2.5-7B", 7_615_616_512),  # the model card's 7.61B, 6.53B without embeddings
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
])
def test_parameter_counts_from_the_shipped_configurations(model, parameters):
    shape = ModelShape.from_config(model_config(model), model)
    assert shape.n_params == parameters


def test_qwen_non_embedding_parameters_are_the_model_cards():
    shape = ModelShape.from_config(model_config("Qwen/Qwen2.5-7B"))
    assert round(shape.n_layers * shape.layer_params / 1e9, 2) == 6.53


def test_weights_and_moments_are_the_bytes_of_the_real_tensors(tiny_llama):
    from intattn_analysis.covariance import second_moments
    from intattn_analysis.hparams import EditHparams

    shape = ModelShape.from_config(tiny_llama.hf_model.config.to_dict(), "tiny")
    real = sum(p.numel() for p in tiny_llama.hf_model.parameters())
    assert shape.n_params == real
    hp = EditHparams(layers=(0, 1), alpha=0.5)
    moments = second_moments(tiny_llama, list(hp.layers), ("mlp", "attn"), corpus=["w3 w4 w5 w6 w7 w8"] * 8,
                             n_tokens=40, cache_dir=False, progress=False)
    stored = sum(m.numel() * 4 for m in moments.values())
    assert unit_memory(shape, "edit", "intattn", hp)["moments"] == stored
    mlp_only = sum(m.numel() * 4 for (module, _), m in moments.items() if module == "mlp")
    assert unit_memory(shape, "edit", "memit", hp)["moments"] == mlp_only
    assert unit_memory(shape, "edit", "memit", hp, dtype="bfloat16")["weights"] == real * 2


def test_fine_tuning_memory_is_its_optimizer_state(tiny_llama):
    """FT-L's planned optimizer bytes are those of the Adam state, the gradient and the
    restore copy of the matrix it tunes, measured on a real step."""
    from intattn_analysis.hparams import FTHparams

    shape = ModelShape.from_config(tiny_llama.hf_model.config.to_dict(), "tiny")
    hp = FTHparams(layers=(1,))
    weight = tiny_llama.weight(hp.module, 1).detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight])
    weight.sum().backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for t in optimizer.state[weight].values() if t.dim())
    measured = state + weight.grad.numel() * weight.grad.element_size() + weight.numel() * weight.element_size()
    assert unit_memory(shape, "edit", "ft-l", hp)["optimizer"] == measured
    assert plan("Qwen/Qwen2.5-7B", "editors", memory_gib=80, device="a100-40gb") is not None  # 80 GiB overrides


def test_a_plan_lists_the_reference_units_and_refuses_what_does_not_fit(capsys):
    table = plan("Qwen/Qwen2.5-7B", "editors", dtype="bfloat16", device="h100-80gb")
    edits = table[table["kind"] == "edit"]
    assert set(edits["method"]) >= {"memit", "intattn", "alphaedit", "rome"}
    # the weights of a 7B model in bfloat16, the same in every unit; the second moments'
    # corpus is sampled from the float32 checkpoint loaded beside it
    moments = table[table["kind"] == "second moments"]
    units = table[table["kind"] != "second moments"]
    assert units["weights_gib"].round(2).eq(round(7_615_616_512 * 2 / GIB, 2)).all()
    assert moments["weights_gib"].round(2).eq(round(7_615_616_512 * 6 / GIB, 2)).all()
    assert (table["total_gib"] < 80).all() and summary(table)["hours"] > 0
    assert len(moments) == 1 and moments["corpus_tokens"].item() == 10_000_000
    with pytest.raises(PlanDoesNotFit, match="second moments .* give the second moments a text corpus"):
        plan("Qwen/Qwen2.5-7B", "editors", dtype="bfloat16", device="a100-40gb")
    with pytest.raises(PlanDoesNotFit, match="alphaedit needs .* GiB .* a100-40gb has 40 GiB; use --dtype bfloat16"):
        plan("Qwen/Qwen2.5-7B", "editors", dtype="float32", device="a100-40gb")
    assert cli.main(["plan", "--model", "Qwen/Qwen2.5-7B", "--experiment", "editors", "--device", "a100-40gb"]) == 1
    assert "does not fit" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "no/such-model", "--experiment", "editors"]) == 2
    assert "shipped:" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "Qwen/Qwen2.5-7B", "--experiment", "editors", "--dtype", "bfloat16",
                     "--device", "h100-80gb"]) == 0
    assert "the largest needs" in capsys.readouterr().out
