"""The editor family on a tiny random Llama: each method's defining property against a
small port of its published math (``tests/editor_reference.py``), exact restores for
every method (also after a failure in the middle), sequences, and model-state keys for
every cache.

Tolerances. Updates are computed in float64 and written as float32, so an update read
back carries a relative rounding error of at most 2⁻²⁴ ≈ 6e-8 per entry; keys and
outputs come from float32 forwards that both sides share (the same bridge, the same
inputs, in the same order), so they agree exactly. ROME and AlphaEdit's properties
therefore hold to 1e-6 relative (ten times the float32 rounding of a sum over the 96
key dimensions), and the comparisons with the reference ports, which solve in float64
with explicit inverses or an SVD where the package uses a Cholesky solve or ``eigh``,
hold to 1e-6 relative for moments whose condition number is below 1e3 (float64 error
≈ condition × 1e-16, far below float32 rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.architectures import hook
from intattn_analysis.editors import EditError, edit, edit_sequence
from intattn_analysis.editors.keys import key_hook
from intattn_analysis.editors.methods import closed_form, ft, rome
from intattn_analysis.editors.solvers import null_space_projector, solve_projected
from intattn_analysis.hparams import EditHparams, FTHparams, PMETHparams, RomeHparams
from intattn_analysis.targets import compute_z, context_templates, prompt_rows, read_at_subject

from editor_reference import alphaedit_projector, alphaedit_update, execute_pmet, rome_update

RELATIVE = 1e-6  # see the module notes
LAYERS = (1, 2)
FACTS = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
    ia.Fact.from_text("w14 w25 w26 w27", "w14", "w42 w43", target_true="w52"),
]
MORE = [
    ia.Fact.from_text("w60 w61 w62 w63", "w60 w61", "w44", target_true="w53"),
    ia.Fact.from_text("w64 w65 w66", "w64", "w45", target_true="w54"),
]
TARGETS = dict(n_context_templates=3, context_template_length=4, v_steps=4)


@pytest.fixture(scope="module")
def tiny(tiny_llama, one_thread):
    return tiny_llama


@pytest.fixture(scope="module")
def moments(tiny):
    """Random positive-definite second moments for both modules of every layer (4 × d_in
    samples: condition number about (1 + 1/2)² / (1 − 1/2)² ≈ 9, well below 1e3)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(tiny.n_layers):
        for module in ("mlp", "attn"):
            d_in = tiny.key_dim(module, layer)
            basis = torch.randn(4 * d_in, d_in, generator=generator)
            out[(module, layer)] = basis.T @ basis / basis.shape[0]
    return out


@pytest.fixture(scope="module")
def hp():
    return EditHparams(layers=LAYERS, alpha=0.0, lambda_mlp=4.0, lambda_attn=4.0, **TARGETS)


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.hf_model.named_parameters()}


def _changed(model, before) -> list[str]:
    return [n for n, p in model.hf_model.named_parameters() if not torch.equal(p, before[n])]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _median_threshold(moment: torch.Tensor) -> float:
    """A threshold halfway between the two middle eigenvalues: half the spectrum falls
    below it, and no eigenvalue sits at it, where two decompositions' last-bit rounding
    could put it on either side (as a threshold equal to the median eigenvalue did)."""
    values = torch.linalg.eigvalsh(moment.double())
    middle = values.numel() // 2
    return float((values[middle - 1] + values[middle]) / 2)


# ----------------------------------------------------------------------------- protocol
def test_every_method_is_registered_with_its_defaults(tiny):
    assert set(ia.EDITORS) >= {"memit", "intattn", "attn", "alphaedit", "pmet", "rome", "ft-l", "ft-m"}
    for name, spec in ia.EDITORS.items():
        for model in ("smollm2-135m", "gemma-3-270m"):
            hp = ia.hparams_for(model, name)
            assert isinstance(hp, spec.hparams_type), (name, model)
            assert hp.source, f"{name}/{model} has no source"
    assert ia.hparams_for("smollm2-135m", "alphaedit").projection == "null_space"
    with pytest.raises(EditError, match="reads RomeHparams"):
        edit(tiny, FACTS[:1], method="rome", hparams=EditHparams(layers=(1,)), progress=False)
    with pytest.raises(EditError, match="unknown hyperparameter"):
        edit(tiny, FACTS[:1], method="memit", hparams=EditHparams(layers=(1,)), lambda_typo=3,
             progress=False)
    with pytest.raises(EditError, match="computes its own targets"):
        edit(tiny, FACTS[:1], method="rome", hparams=RomeHparams(layers=(1,)), targets=object(),
             progress=False)
    with pytest.raises(ValueError, match="exactly one layer"):
        RomeHparams(layers=(1, 2))


# ----------------------------------------------------------------------------- ROME
def test_rome_writes_v_star_at_its_key_and_nothing_orthogonal(tiny, moments):
    hp = RomeHparams(layers=(1,), **TARGETS)
    fact, layer = FACTS[0], 1
    templates = context_templates(tiny, hp.n_context_templates, hp.context_template_length)
    target = compute_z(tiny, [fact], hp, layer=layer, templates=templates, site="mlp_output",
                       batch_size=1, progress=False)
    keys = read_at_subject(tiny, prompt_rows(tiny, [fact], templates), [key_hook("mlp", layer)])
    keys = keys[key_hook("mlp", layer)].double()
    k, k_bar = keys[templates.index("{}")], keys.mean(0)
    W = tiny.weight("mlp", layer).detach().double().clone()
    C = moments[("mlp", layer)]
    v_star = W @ k + target.delta[0].double()

    with edit(tiny, [fact], method="rome", hparams=hp, moments=moments, progress=False) as result:
        delta = result.deltas[("mlp", layer)].double()
        after = tiny.weight("mlp", layer).detach().double()
        # W' k = v*
        assert _relative(after @ k, v_star) < RELATIVE
        # W' x = W x for x with xᵀ C⁻¹ k̄ = 0
        direction = torch.linalg.solve(C.double(), k_bar)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(k.shape[0], 8, generator=generator, dtype=torch.float64)
        x = x - direction[:, None] * (direction @ x) / (direction @ direction)
        assert float((delta @ x).norm()) < RELATIVE * float(delta.norm() * x.norm())
    # the reference port of ROME's update, given the same key, v* and moment
    assert _relative(delta, rome_update(W, C, k_bar, k, v_star)) < RELATIVE


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory, tiny_tokenizer_dir, one_thread):
    """A tiny random Gemma-3 (post-norms after attention and MLP) with the tiny Llama's
    sizes, so that the ``moments`` fixture fits it; its norms are perturbed away from
    their identity initialisation, so that a normed output differs from an un-normed one."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("tiny-gemma")
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(directory)
    return ia.load_model(str(directory), device="cpu")


def test_rome_sets_v_star_before_a_post_norm(tiny_gemma, tiny, moments):
    """On a post-norm model ROME's ``v*`` is optimised at the down-projection's output,
    before the MLP's norm, and the rank-one write gives it exactly: the edited layer's
    down-projection output at the bare prompt's subject is ``h + δ``. (A residual change
    optimised after the norm need not be an output the norm can give.)"""
    hp = RomeHparams(layers=(1,), **TARGETS)
    fact, layer = FACTS[0], 1
    assert rome.target_site(tiny_gemma, layer) == "mlp_value"
    assert rome.target_site(tiny, layer) == "mlp_output"
    templates = context_templates(tiny_gemma, hp.n_context_templates, hp.context_template_length)
    target = compute_z(tiny_gemma, [fact], hp, layer=layer, templates=templates, site="mlp_value",
                       batch_size=1, progress=False)
    bare = prompt_rows(tiny_gemma, [fact], templates)[templates.index("{}")]
    value = hook("mlp_value", layer)
    before = read_at_subject(tiny_gemma, [bare], [value])[value][0]
    assert torch.equal(target.h[0], before)
    with edit(tiny_gemma, [fact], method="rome", hparams=hp, moments=moments, progress=False) as result:
        assert result.z_diagnostics[0]["delta_norm"] == pytest.approx(float(target.delta[0].norm()))
        after = read_at_subject(tiny_gemma, [bare], [value])[value][0]
    assert _relative(after, target.z[0]) < RELATIVE
    assert _relative(after, before) > 1e-3  # the edit moved it: the test can fail


def test_targets_before_and_after_the_mlp_agree_without_a_post_norm(tiny):
    """Without a post-norm the down-projection's output is the MLP output: a target
    injected there (``site="mlp_value"``, inside the layer) equals one added to the
    residual after the layer (``site="mlp_output"``). The two forwards add the same
    vectors in a different order, so they agree to float32 rounding, which four Adam
    steps carry into ``δ``: a cosine of 0.9999, as for the suffix path's targets."""
    hp = RomeHparams(layers=(1,), **TARGETS)
    templates = context_templates(tiny, hp.n_context_templates, hp.context_template_length)
    inside = compute_z(tiny, FACTS, hp, layer=1, templates=templates, site="mlp_value", progress=False)
    after = compute_z(tiny, FACTS, hp, layer=1, templates=templates, site="mlp_output", progress=False)
    torch.testing.assert_close(inside.h, after.h, rtol=0, atol=0)
    cosine = torch.nn.functional.cosine_similarity(inside.delta, after.delta, dim=-1)
    assert float(cosine.min()) > 0.9999, cosine
    assert float(inside.delta.norm(dim=-1).min()) > 0  # the optimisation moved: the test can fail
    with pytest.raises(ValueError, match="at least 1"):
        compute_z(tiny, FACTS[:1], hp, layer=0, templates=templates, site="mlp_value", progress=False)


def test_rome_applies_a_batch_fact_after_fact(tiny, moments):
    """A batch is one fact after another on the model as the earlier facts left it: the
    same weights, bit for bit, as two single-fact edits in a row (under the same context
    prefixes: an edited model would write its own)."""
    hp = RomeHparams(layers=(1,), **TARGETS)
    templates = context_templates(tiny, hp.n_context_templates, hp.context_template_length)
    before = _parameters(tiny)
    with edit(tiny, FACTS[:2], method="rome", hparams=hp, moments=moments, progress=False) as both:
        together = tiny.weight("mlp", 1).detach().clone()
        assert len(both.z_diagnostics) == 2
    with edit(tiny, FACTS[:1], method="rome", hparams=hp, moments=moments, progress=False):
        with edit(tiny, FACTS[1:2], method="rome", hparams=hp, moments=moments, templates=templates,
                  progress=False):
            assert torch.equal(tiny.weight("mlp", 1), together)
    assert not _changed(tiny, before)


# ----------------------------------------------------------------------------- AlphaEdit
def test_alphaedit_without_projection_is_memit_bit_for_bit(tiny, moments, hp):
    targets = compute_z(tiny, FACTS, hp, progress=False)
    with edit(tiny, FACTS, method="memit", hparams=hp, moments=moments, targets=targets,
              progress=False) as memit:
        reference = {k: v.clone() for k, v in memit.deltas.items()}
    with edit(tiny, FACTS, method="alphaedit", hparams=hp, moments=moments, targets=targets,
              projection="none", progress=False) as alphaedit:
        assert set(alphaedit.deltas) == set(reference)
        for key in reference:
            assert torch.equal(alphaedit.deltas[key], reference[key]), key


def test_alphaedit_leaves_the_preserved_keys_alone(tiny, moments, hp):
    layer = LAYERS[0]
    threshold = _median_threshold(moments[("mlp", layer)])
    aehp = hp.replace(projection="null_space", nullspace_threshold=threshold, nullspace_l2=1.0)
    with edit(tiny, FACTS, method="alphaedit", hparams=aehp, moments=moments, progress=False) as result:
        for l in LAYERS:
            C = moments[("mlp", l)].double()
            values, vectors = torch.linalg.eigh(C)
            preserved = vectors[:, values >= threshold]  # orthonormal columns
            assert preserved.shape[1] > 0
            delta = result.deltas[("mlp", l)].double()
            assert float((delta @ preserved).norm()) < RELATIVE * float(delta.norm()), l
            assert float(delta.norm()) > 0
        assert set(result.state) == {("mlp", l) for l in LAYERS}


def test_an_empty_null_space_is_refused(tiny, moments, hp):
    """A threshold below every eigenvalue leaves no null space: every update would be 0,
    so the edit is refused rather than reported as done."""
    before = _parameters(tiny)
    with pytest.raises(EditError, match="null space is empty"):
        edit(tiny, FACTS, method="alphaedit", hparams=hp.replace(projection="null_space", nullspace_threshold=1e-6),
             moments=moments, progress=False)
    assert not _changed(tiny, before)


def test_alphaedit_solve_matches_the_reference_port(moments):
    C = moments[("mlp", 1)]
    threshold = _median_threshold(C)
    generator = torch.Generator().manual_seed(2)
    K = torch.randn(3, C.shape[0], generator=generator, dtype=torch.float64)
    R = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    E = torch.randn(5, C.shape[0], generator=generator, dtype=torch.float64)
    E = E.T @ E
    P = null_space_projector(C, threshold)
    P_reference = alphaedit_projector(C, threshold)
    assert float((P - P_reference).norm()) < 1e-10 * float(P_reference.norm())
    ours = solve_projected(K, R, P, 10.0, E)
    theirs = alphaedit_update(K.T, R.T, P_reference, 10.0, E)
    assert _relative(ours, theirs) < 1e-10


def test_alphaedit_sequence_carries_the_edited_keys(tiny, moments, hp):
    """After each batch the keys of that batch, read on the edited model, join the
    preserved set: the state after two batches is the sum of their Grams."""
    threshold = _median_threshold(moments[("mlp", 1)])
    aehp = hp.replace(projection="null_space", nullspace_threshold=threshold, nullspace_l2=1.0)
    templates = context_templates(tiny, aehp.n_context_templates, aehp.context_template_length)
    weights = torch.tensor(ia.targets.context_weights(templates), dtype=torch.float64)
    grams = []

    def read_keys(i, sequence):
        batch = [FACTS, MORE][i]
        read = read_at_subject(tiny, prompt_rows(tiny, batch, templates), [key_hook("mlp", l) for l in LAYERS])
        K = {l: (read[key_hook("mlp", l)].double().view(len(batch), len(templates), -1) * weights[:, None]).sum(1)
             for l in LAYERS}
        grams.append({l: K[l].T @ K[l] for l in LAYERS})

    before = _parameters(tiny)
    with edit_sequence(tiny, [FACTS, MORE], method="alphaedit", hparams=aehp, moments=moments,
                       after_each=read_keys, progress=False) as sequence:
        assert len(sequence) == 2 and tiny.open_edits == 2
        for l in LAYERS:
            expected = grams[0][l] + grams[1][l]
            assert _relative(sequence.state[("mlp", l)], expected) < RELATIVE
    assert not _changed(tiny, before) and tiny.open_edits == 0
    # the carried keys reach the second solve: batch 2 on top of batch 1 with the state is
    # the sequence's second edit, bit for bit, and without it something else
    key = ("mlp", LAYERS[0])
    second = sequence.edits[1].deltas[key].clone()
    options = dict(method="alphaedit", hparams=aehp, moments=moments, templates=templates, progress=False)
    with edit(tiny, FACTS, **options) as first:
        with edit(tiny, MORE, state=first.state, **options) as carried:
            assert torch.equal(carried.deltas[key], second)
        with edit(tiny, MORE, **options) as fresh:
            assert not torch.equal(fresh.deltas[key], second)
    assert not _changed(tiny, before)


def test_state_id_is_refused_while_an_edit_is_being_written(tiny, moments, hp, monkeypatch):
    """In the middle of an edit the weights are in no settled state: a cache key asked for
    then is an error, not a key for a state that never existed."""
    seen = []
    real = closed_form.solve_update

    def asking(*args, **kwargs):
        with pytest.raises(RuntimeError, match="being edited"):
            tiny.state_id
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(closed_form, "solve_update", asking)
    with edit(tiny, FACTS, method="memit", hparams=hp, moments=moments, progress=False):
        assert tiny.state_id.startswith(tiny.cache_id + "+edits-")
    assert seen and tiny.state_id == tiny.cache_id


# ----------------------------------------------------------------------------- PMET
def _port(tiny, run):
    """Run a reference port on the Hugging Face model and put the weights back."""
    down_proj = lambda layer: tiny.hf_model.get_submodule(tiny.layer(layer).mlp_module)
    originals = {l: down_proj(l).weight.detach().clone() for l in range(tiny.n_layers)}
    try:
        return run(down_proj)
    finally:
        with torch.no_grad():
            for l, w in originals.items():
                down_proj(l).weight.copy_(w)


def test_pmet_equals_the_reference_port(tiny, moments):
    """Given the same FFN targets, moments and prefixes, PMET's update is the reference
    loop's (tolerance as tests/test_memit_reference.py: keys read in separate float32
    forwards, a solve whose condition number is below 100: 1e-5 relative)."""
    hp = PMETHparams(layers=LAYERS, lambda_mlp=4.0, **TARGETS)
    targets = compute_z(tiny, FACTS, hp, site="pmet", progress=False)
    assert float(targets.attn_delta.norm()) > 0  # the attention target is optimised too
    templates = targets.context_templates
    types = [[t for t in templates if t == "{}"], [t for t in templates if t != "{}"]]
    reference = _port(tiny, lambda down_proj: execute_pmet(
        tiny.hf_model, tiny.tokenizer, FACTS, targets.z, LAYERS,
        {l: moments[("mlp", l)] for l in LAYERS}, hp.lambda_mlp, types, down_proj))
    with edit(tiny, FACTS, method="pmet", hparams=hp, moments=moments, targets=targets,
              progress=False) as result:
        assert set(result.deltas) == {("mlp", l) for l in LAYERS}
        for l in LAYERS:
            assert _relative(result.deltas[("mlp", l)], reference[l]) < 1e-5, l


def test_pmet_without_attention_targets_is_memit_with_the_sqrt_spread(tiny, moments):
    """With the attention delta held at 0, PMET's FFN target is the target ROME and MEMIT
    optimise (an FFN output joins the residual by addition), and on one layer its update
    is MEMIT's with the square-root spread, given that target. The two optimisations run
    different blocks in float32 (PMET starts at the layer, the others after it), so the
    deltas agree to 1e-4 relative, not bit for bit."""
    layer = 2
    hp = PMETHparams(layers=(layer,), lambda_mlp=4.0, attn_targets=False, **TARGETS)
    pmet = compute_z(tiny, FACTS, hp, site="pmet", progress=False)
    assert float(pmet.attn_delta.abs().max()) == 0.0
    plain = compute_z(tiny, FACTS, hp, site="mlp_output", progress=False)
    assert _relative(pmet.delta, plain.delta) < 1e-4
    residual = compute_z(tiny, FACTS, hp, progress=False)  # h at the residual stream
    memit_targets = ia.ZTargets(z=residual.h + pmet.delta, h=residual.h, delta=pmet.delta, layer=layer,
                                context_templates=pmet.context_templates, diagnostics=pmet.diagnostics)
    memit_hp = EditHparams(layers=(layer,), spread="pmet", lambda_mlp=4.0, **TARGETS)
    with edit(tiny, FACTS, method="memit", hparams=memit_hp, moments=moments, targets=memit_targets,
              progress=False) as result:
        memit = result.deltas[("mlp", layer)].clone()
    with edit(tiny, FACTS, method="pmet", hparams=hp, moments=moments, targets=pmet,
              progress=False) as result:
        assert _relative(result.deltas[("mlp", layer)], memit) < 1e-5
    with pytest.raises(EditError, match="site 'residual'"):
        edit(tiny, FACTS, method="pmet", hparams=hp, moments=moments, targets=residual, progress=False)


# ----------------------------------------------------------------------------- FT
def test_ft_l_stays_in_its_box_and_writes_only_its_matrix(tiny):
    hp = FTHparams(layers=(1,), objective="prompt_last", lr=1e-2, steps=5, norm_constraint=1e-3)
    before = _parameters(tiny)
    flags = [p.requires_grad for p in tiny.hf_model.parameters()]
    original = tiny.weight("mlp", 1).detach().clone()
    with edit(tiny, FACTS, method="ft-l", hparams=hp, progress=False) as result:
        name = next(n for n, p in tiny.hf_model.named_parameters() if p is tiny.weight("mlp", 1))
        assert _changed(tiny, before) == [name]
        change = (tiny.weight("mlp", 1).detach() - original).abs().max()
        # w0 ± eps is rounded to float32: one unit in the last place of the largest weight
        ulp = torch.finfo(torch.float32).eps * float(original.abs().max() + hp.norm_constraint)
        assert float(change) <= hp.norm_constraint + ulp
        assert float(change) > 0.5 * hp.norm_constraint  # lr 1e-2 reaches the box
        assert torch.equal(result.deltas[("mlp", 1)],
                           (tiny.weight("mlp", 1).detach().double() - original.double()).float())
    assert not _changed(tiny, before)
    assert [p.requires_grad for p in tiny.hf_model.parameters()] == flags


def test_ft_m_lowers_the_loss_of_the_target_tokens(tiny):
    hp = FTHparams(layers=(2,), objective="target_new", lr=1e-2, steps=10, norm_constraint=None)
    with edit(tiny, FACTS, method="ft-m", hparams=hp, progress=False) as result:
        table = result.z_table()
        assert (table["loss_final"] < table["loss_initial"]).all()
    with pytest.raises(EditError, match="objective 'prompt_last'"):
        edit(tiny, FACTS, method="ft-l", hparams=hp, progress=False)


# ----------------------------------------------------------------------------- restores
def _failing(target, name, after, nonzero):
    """``target.name`` that raises on call ``after + 1``; the results it returned before are
    kept in ``nonzero`` as whether they were non-zero (a write of zeros would leave the
    weights as they were and the restore untested)."""
    real = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("injected")
        out = real(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            nonzero.append(bool(out.abs().max() > 0))
        return out

    return failing


@pytest.mark.parametrize("method, where, name, after", [
    ("memit", closed_form, "solve_update", 1),
    ("intattn", closed_form, "solve_update", 2),
    ("alphaedit", closed_form, "solve_projected", 1),
    ("pmet", closed_form, "solve_update", 1),
    ("rome", rome, "rank_one_update", 1),
    ("ft-l", ft, "_loss", 4),
    ("ft-m", ft, "_loss", 4),
])
def test_a_failure_in_the_middle_restores_every_method(tiny, moments, hp, monkeypatch, method, where, name, after):
    settings = {
        "memit": hp, "intattn": hp.replace(alpha=0.5),
        "alphaedit": hp.replace(projection="null_space", nullspace_threshold=_median_threshold(moments[("mlp", 1)])),
        "rome": RomeHparams(layers=(1,), **TARGETS),
        "pmet": PMETHparams(layers=LAYERS, lambda_mlp=4.0, **TARGETS),
        "ft-l": FTHparams(layers=(1,), objective="prompt_last", lr=1e-2, steps=3),
        "ft-m": FTHparams(layers=(1,), objective="target_new", lr=1e-2, steps=3, norm_constraint=None),
    }
    before = _parameters(tiny)
    nonzero = []
    monkeypatch.setattr(where, name, _failing(where, name, after, nonzero))
    with pytest.raises(RuntimeError, match="injected"):
        edit(tiny, FACTS, method=method, hparams=settings[method], moments=moments, progress=False)
    assert all(nonzero)  # what was written before the failure was a real change
    assert not _changed(tiny, before)
    assert tiny.open_edits == 0
    assert all(p.grad is None for p in tiny.hf_model.parameters())


def test_saved_deltas_of_every_kind_of_method_apply_again(tiny, moments, tmp_path):
    """A rank-one edit (ROME) and a fine-tuning edit save their deltas with their own
    hparams type; applied again, ROME's (one write per fact, here one fact) gives the
    edited weights bit for bit, and FT's (the final weight minus the original, rounded to
    float32) to one float32 rounding of the weights (relative 1e-6)."""
    cases = [("rome", RomeHparams(layers=(1,), **TARGETS), 0.0),
             ("ft-m", FTHparams(layers=(2,), objective="target_new", lr=1e-2, steps=3, norm_constraint=None), 1e-6)]
    for method, hp, tolerance in cases:
        with edit(tiny, FACTS[:1], method=method, hparams=hp, moments=moments, progress=False) as result:
            key = next(iter(result.deltas))
            edited = tiny.weight(*key).detach().clone()
            path = result.save(tmp_path / f"{method}.safetensors")
        with ia.apply_deltas(tiny, path) as again:
            assert type(again.hparams) is type(hp) and again.hparams == hp
            error = _relative(tiny.weight(*key).detach(), edited)
            assert error <= tolerance, (method, error)


# ----------------------------------------------------------------------------- state
def test_state_id_names_the_applied_edits(tiny):
    plain = tiny.state_id
    assert plain == tiny.cache_id
    delta = {("mlp", 1): 1e-3 * torch.ones_like(tiny.weight("mlp", 1))}
    with ia.apply_deltas(tiny, delta):
        edited = tiny.state_id
        assert edited != plain and edited.startswith(plain + "+edits-")
    assert tiny.state_id == plain
    with ia.apply_deltas(tiny, {("mlp", 1): 2e-3 * torch.ones_like(tiny.weight("mlp", 1))}):
        assert tiny.state_id not in (plain, edited)


def _small_edit(tiny):
    generator = torch.Generator().manual_seed(5)
    weight = tiny.weight("mlp", 0)
    return ia.apply_deltas(tiny, {("mlp", 0): 0.5 * torch.randn(weight.shape, generator=generator)})


def test_target_cache_serves_an_edited_model_its_own_targets(tiny, hp, tmp_path):
    plain = compute_z(tiny, FACTS[:1], hp, progress=False, cache_dir=tmp_path)
    with _small_edit(tiny):
        edited = compute_z(tiny, FACTS[:1], hp, progress=False, cache_dir=tmp_path)
        fresh = compute_z(tiny, FACTS[:1], hp, progress=False)
        assert torch.equal(edited.z, fresh.z) and not torch.equal(edited.z, plain.z)
    again = compute_z(tiny, FACTS[:1], hp, progress=False, cache_dir=tmp_path)
    assert torch.equal(again.z, plain.z)
    assert len(list(tmp_path.rglob("*.json"))) == 2


def test_moment_cache_serves_an_edited_model_its_own_moments(tiny, tmp_path):
    corpus = [f"w{i} w{i + 1} w{i + 2} w{i + 3} w{i + 4}" for i in range(3, 100)]

    def moment():
        return ia.second_moments(tiny, [1], modules=("mlp",), corpus=corpus, n_tokens=200, max_len=8,
                                 cache_dir=tmp_path, progress=False, allow_fewer_tokens=True)[("mlp", 1)]

    plain = moment()
    with _small_edit(tiny):
        edited = moment()
        assert not torch.equal(edited, plain)
    assert torch.equal(moment(), plain)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_context_prefix_cache_serves_an_edited_model_its_own_prefixes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("INTATTN_CACHE", str(tmp_path))
    plain = context_templates(tiny, 2, 4)
    with _small_edit(tiny):
        edited = context_templates(tiny, 2, 4)
    assert context_templates(tiny, 2, 4) == plain
    assert len(list((tmp_path / "context_templates").rglob("templates-*.json"))) == 2
    assert edited[0] == "{}"


def test_trace_cache_serves_an_edited_model_its_own_traces(tiny, tmp_path):
    from intattn_analysis.known import greedy_continuation

    prompt = "w10 w11 w20 w21"
    answer = greedy_continuation(tiny, prompt, 1).split()[0]
    fact = ia.Fact.from_text(prompt, "w10 w11", "w99", target_true=answer)
    settings = dict(kinds=["resid"], window=1, samples=2, cache_dir=tmp_path, progress=False)
    plain = ia.trace(tiny, [fact], **settings)
    # a small edit of the last layer's MLP keeps the answer but changes the probabilities
    weight = tiny.weight("mlp", 2)
    with ia.apply_deltas(tiny, {("mlp", 2): 1e-3 * torch.ones_like(weight)}):
        assert greedy_continuation(tiny, prompt, 1).split()[0] == answer
        edited = ia.trace(tiny, [fact], **settings)
        assert not edited.table["p_clean"].equals(plain.table["p_clean"])
        assert edited.settings["model"] == tiny.state_id != tiny.cache_id
    again = ia.trace(tiny, [fact], **settings)
    assert again.table["p_restored"].equals(plain.table["p_restored"])
    assert len(list(tmp_path.rglob("trace-*.json"))) == 2
    assert plain.settings["model"] == tiny.cache_id
