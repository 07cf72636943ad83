"""Reliability: what must never happen silently, kept as tests. Edits on one model form a
stack; restoring them out of order must either be correct or refuse with a message that
names the edits in the way."""

from __future__ import annotations

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.editing import EditError


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.hf_model.named_parameters())


def _random_delta(model, module: str, layer: int, seed: int) -> dict:
    weight = model.weight(module, layer)
    generator = torch.Generator().manual_seed(seed)
    return {(module, layer): 0.01 * torch.randn(weight.shape, generator=generator)}


def test_restoring_under_a_later_edit_of_the_same_matrix_refuses(tiny_llama):
    model, before = tiny_llama, _state(tiny_llama)
    a = ia.apply_deltas(model, _random_delta(model, "mlp", 1, seed=1))
    b = ia.apply_deltas(model, _random_delta(model, "mlp", 1, seed=2))
    assert model.open_edits == 2
    with pytest.raises(EditError, match=r"later edits of the same matrices.*mlp@1"):
        a.restore()
    assert a in model.applied_edits and not a.restored  # nothing was written
    b.restore()
    a.restore()
    assert model.open_edits == 0 and a.restored and b.restored
    assert _unchanged(model, before)
    a.restore()  # a second restore is a no-op, even after other edits came and went
    assert _unchanged(model, before)


def test_a_second_restore_does_not_wipe_a_newer_edit(tiny_llama):
    model, before = tiny_llama, _state(tiny_llama)
    a = ia.apply_deltas(model, _random_delta(model, "mlp", 2, seed=3))
    a.restore()
    b = ia.apply_deltas(model, _random_delta(model, "mlp", 2, seed=4))
    edited = model.weight("mlp", 2).detach().clone()
    a.restore()
    assert torch.equal(model.weight("mlp", 2), edited)  # b is still there
    b.restore()
    assert _unchanged(model, before)


def test_edits_of_other_matrices_restore_in_any_order(tiny_llama):
    model, before = tiny_llama, _state(tiny_llama)
    a = ia.apply_deltas(model, _random_delta(model, "mlp", 0, seed=5))
    b = ia.apply_deltas(model, _random_delta(model, "attn", 0, seed=6))
    with_b = model.weight("attn", 0).detach().clone()
    a.restore()  # b writes another matrix: restoring a first is exact
    assert torch.equal(model.weight("attn", 0), with_b)
    mlp_name = next(n for n, p in model.hf_model.named_parameters() if p is model.weight("mlp", 0))
    assert torch.equal(model.weight("mlp", 0), before[mlp_name])
    b.restore()
    assert _unchanged(model, before)
