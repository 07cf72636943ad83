"""An editor defined outside the package: one declaration and its defaults file are all it
takes to run through ``ia.edit``, ``ia.edit_sequence`` and the experiments.

The editor below writes a small rank-one update into the MLP down-projection of its
layers, derived from the batch's answers: a real change of the weights (so the model's
state, snapshots and restores are exercised), with no targets and no second moments.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.experiments import batch_scaling, editors
from intattn_analysis.experiments.store import ResultStore
from intattn_analysis.hparams import GenericHparamsWarning

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
]


@dataclasses.dataclass(frozen=True)
class NudgeHparams:
    """The editor's settings: the layers written and the size of the update."""

    layers: tuple[int, ...] = (1,)
    scale: float = 0.05
    source: str = ""

    def replace(self, **changes) -> "NudgeHparams":
        return dataclasses.replace(self, **changes)

    def effective_dict(self) -> dict:
        return {"layers": list(self.layers), "scale": self.scale}

    @classmethod
    def from_dict(cls, record) -> "NudgeHparams":
        return cls(**{**record, "layers": tuple(record["layers"])})


def _apply(job) -> None:
    """Add ``scale * u vᵀ`` to each layer's down-projection, ``u`` and ``v`` drawn from a
    generator seeded by the batch's new answers (deterministic per batch)."""
    seed = sum(ord(c) for fact in job.facts for c in fact.target_new)
    generator = torch.Generator().manual_seed(seed)
    for layer in job.hparams.layers:
        weight = job.model.weight("mlp", layer)
        u = torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
        v = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64)
        job.write(("mlp", layer), job.hparams.scale * torch.outer(u, v) / (u.norm() * v.norm()))


def _generic(n_layers: int):
    return NudgeHparams(layers=(n_layers - 1,)), f"the last layer, {n_layers - 1}"


@pytest.fixture
def nudge(tmp_path, tiny_llama):
    """The editor registered, with a defaults file for the tiny model; unregistered after."""
    folder = tmp_path / "nudge-defaults"
    folder.mkdir()
    record = {"layers": [2], "scale": 0.1, "source": "chosen for this test"}
    (folder / (tiny_llama.name.replace("/", "--") + ".json")).write_text(json.dumps(record))
    spec = ia.Editor(name="nudge", hparams_type=NudgeHparams, apply=_apply,
                     writes=lambda model, hp: [("mlp", l) for l in hp.layers], uses_templates=False,
                     label="Nudge", generic=_generic, defaults_folder=folder,
                     description="a rank-one nudge of the down-projection", reference="this test")
    ia.register_editor(spec)
    yield spec
    ia.unregister_editor("nudge")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def _same(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.hf_model.state_dict().items())


def test_a_registered_editor_reads_its_own_defaults(nudge, tiny_llama):
    assert ia.hparams_for(tiny_llama, "nudge") == NudgeHparams(layers=(2,), scale=0.1, source="chosen for this test")
    with pytest.warns(GenericHparamsWarning, match="the last layer"):
        generic = ia.hparams_for("some/other-model", "nudge", n_layers=6)
    assert generic.layers == (5,) and generic.source.startswith("generic rule")


def test_a_registered_editor_edits_and_restores(nudge, tiny_llama):
    before = _weights(tiny_llama)
    with ia.edit(tiny_llama, FACTS, method="nudge", progress=False) as result:
        assert result.method == "nudge" and not _same(tiny_llama, before)
        assert tiny_llama.state_id != tiny_llama.cache_id
    assert _same(tiny_llama, before)
    with pytest.raises(ia.EditError, match="scal"):
        ia.edit(tiny_llama, FACTS, method="nudge", scal=1.0, progress=False)  # an unknown field is named
    assert _same(tiny_llama, before)


def test_a_registered_editor_runs_a_sequence(nudge, tiny_llama):
    before = _weights(tiny_llama)
    with ia.edit_sequence(tiny_llama, [FACTS[:1], FACTS[1:]], method="nudge", progress=False) as sequence:
        assert len(sequence) == 2 and tiny_llama.open_edits == 2
    assert tiny_llama.open_edits == 0 and _same(tiny_llama, before)


def test_a_registered_editor_is_a_row_of_the_experiments(nudge, tiny_llama, tmp_path):
    assert editors.METHODS["Nudge"] == "nudge" and batch_scaling.ROWS["Nudge"] == "Nudge"
    assert list(editors.METHODS)[-1] == "Nudge"  # registered last, listed last
    settings = editors.method_settings(tiny_llama, ["Nudge"])
    assert settings["Nudge"] == ("nudge", ia.hparams_for(tiny_llama, "nudge"))
    store = ResultStore(tmp_path, editors.NAME)
    assert editors.run_methods(tiny_llama, [FACTS], settings, store, dataset="hand", metrics=("knowedit",),
                               progress=False) == 2
    rows = store.rows()
    assert set(rows["setting"]) == {"pre-edit", "Nudge"} and len(rows) == 4
    assert set(rows.loc[rows["setting"] == "Nudge", "method"]) == {"nudge"}
    assert tiny_llama.open_edits == 0


def test_registration_names_clashes_and_unregistering_removes_the_row(tiny_llama):
    spec = ia.Editor(name="nudge", hparams_type=NudgeHparams, apply=_apply,
                     writes=lambda model, hp: [("mlp", l) for l in hp.layers], uses_templates=False, label="Nudge")
    with pytest.raises(ValueError, match="label 'MEMIT'"):
        ia.register_editor(dataclasses.replace(spec, label="MEMIT"))
    with pytest.raises(ValueError, match="already registered"):
        ia.register_editor(dataclasses.replace(spec, name="memit", label="Other"))
    ia.register_editor(spec)
    ia.unregister_editor("nudge")
    assert "Nudge" not in editors.METHODS and "nudge" not in ia.EDITORS
    with pytest.raises(ValueError, match="unknown method 'nudge'"):
        ia.hparams_for(tiny_llama, "nudge")



def test_a_target_site_declared_outside_the_package_is_optimised(tiny_llama):
    """A site is one declaration: here a delta added to the attention output of the layer,
    with ``h`` read there. compute_z optimises it like the package's own sites."""
    from intattn_analysis.hparams import EditHparams
    from intattn_analysis.targets import TARGET_SITES, TargetSite, register_target_site

    site = register_target_site(TargetSite("attn_output", deltas=(("attn_out", "attn_out"),), cached=False))
    try:
        hp = EditHparams(layers=(1,), n_context_templates=2, context_template_length=3, v_steps=8)
        targets = ia.compute_z(tiny_llama, FACTS, hp, site="attn_output", progress=False)
        plain = ia.compute_z(tiny_llama, FACTS, hp, progress=False)
        assert site.inside and targets.site == "attn_output" and targets.attn_h is None
        assert not torch.allclose(targets.h, plain.h)  # h is the attention output, not the residual
        for row in targets.diagnostics:
            assert row["nll_final"] < row["nll_initial"]
        with pytest.raises(ValueError, match="not cached"):
            ia.compute_z(tiny_llama, FACTS, hp, site="attn_output", cache_dir="unused", progress=False)
    finally:
        TARGET_SITES.pop("attn_output")
    with pytest.raises(ValueError, match="site must be one of"):
        ia.compute_z(tiny_llama, FACTS, hp, site="attn_output", progress=False)
