"""The editing engine: exactness of alpha = 0, reversibility, efficacy, files, errors.

Second moments come from a small text corpus (the built-in facts' prompts and probes,
a few thousand tokens) so that the file runs in a few minutes on one CPU thread; target
optimisation uses few prefixes and steps where efficacy is not what is tested.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import intattn_analysis as ia
from intattn_analysis.editors import keys as edit_keys
from intattn_analysis.editors.methods import closed_form, rome
from intattn_analysis.architectures import hook
from intattn_analysis.covariance import second_moments
from intattn_analysis.editors import METHODS, EditError, apply_deltas, edit, solve_update
from intattn_analysis.hparams import (
    EditHparams,
    GenericHparamsWarning,
    hparams_for,
)
from intattn_analysis.known import greedy_continuation, starts_with_answer
from intattn_analysis.model_access import read_hooks
from intattn_analysis.targets import length_groups, prompt_rows, read_at_subject

torch.set_num_threads(1)

EIFFEL = ia.Fact.from_text(
    "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", target_true="Paris"
)
COLOSSEUM = ia.Fact.from_text(
    "The Colosseum is located in the city of", "Colosseum", "London", target_true="Rome"
)
FAST_LAYERS = (5, 6)
#: every method of ia.EDITORS that writes a fact (attention-only is tested on its own)
EDIT_METHODS = ("memit", "intattn", "alphaedit", "pmet", "rome", "ft-l", "ft-m")


def _corpus() -> list[str]:
    """Texts of the built-in facts and their probes, without the subjects edited here:
    an edited key that is part of the preserved corpus resists the edit."""
    edited = {EIFFEL.subject, COLOSSEUM.subject, _builtin_fact().subject}
    texts = []
    for fact in ia.load_facts("builtin"):
        candidates = [f"{fact.text} {fact.target_true or ''}".strip()]
        candidates += [f"{p.prompt} {p.answer}" for p in (*fact.neighborhood, *fact.portability, *fact.locality)]
        texts += [t for t in candidates if not any(s in t for s in edited)]
    return texts


def _builtin_fact() -> ia.Fact:
    return next(
        f for f in ia.load_facts("builtin")
        if f.known.get("smollm2-135m") and f.prompt.endswith("the city of")
    )


def _moments(model, layers, tmp_path_factory, n_tokens):
    return second_moments(
        model, list(layers), modules=("mlp", "attn"), corpus=_corpus(), n_tokens=n_tokens,
        max_len=64, cache_dir=tmp_path_factory.mktemp("moments"), progress=False,
        allow_fewer_tokens=True,
    )


@pytest.fixture(scope="module")
def moments(smollm2, tmp_path_factory):
    # d_mlp is 1536: fewer than ~5x that many tokens leave C near-singular and the
    # update explodes along rarely used directions
    # every layer any method's defaults write (test_edit_flips_the_greedy_answer edits
    # with each method's own defaults)
    defaults = {l for method in EDIT_METHODS for l in hparams_for(smollm2, method).layers}
    layers = sorted({*FAST_LAYERS, 4, *defaults})
    return _moments(smollm2, layers, tmp_path_factory, 10000)


@pytest.fixture(scope="module")
def fast(smollm2):
    return hparams_for(smollm2).replace(layers=FAST_LAYERS, alpha=0.3, n_context_templates=2, v_steps=10)


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.hf_model.named_parameters()}


def _assert_all_equal(model, reference: dict[str, torch.Tensor]) -> None:
    """Bit for bit: a restore copies the saved originals back, and applying saved deltas
    repeats the edit's own float32 additions."""
    current = dict(model.hf_model.named_parameters())
    assert set(current) == set(reference)
    changed = [n for n, p in current.items() if not torch.equal(p, reference[n])]
    assert not changed, f"parameters differ after restore: {changed[:5]}"


def _answers(model, fact: ia.Fact, answer: str) -> bool:
    n = len(model.tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return starts_with_answer(greedy_continuation(model, fact.text, n + 1), answer)


# ----------------------------------------------------------------------------- hparams
def test_hparams_round_trip_and_defaults(smollm2):
    hp = hparams_for(smollm2, "intattn")
    assert hp.layers == (3, 4, 5) and "localization" in hp.source
    assert hp.alpha == {l: 0.0 for l in hp.layers}  # attention's traced share there is ~0
    per_layer = hp.replace(alpha={1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}, spread="pmet")
    assert EditHparams.from_json(per_layer.to_json()) == per_layer
    assert EditHparams.from_dict(hp.to_dict()) == hp
    assert hparams_for("Qwen/Qwen2.5-7B").lambda_mlp == 15000.0
    with pytest.warns(GenericHparamsWarning, match="round\\(n_layers/8\\)"):
        generic = hparams_for("some/unknown-model", n_layers=24)
    assert generic.layers == (3, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="n_layers"):
        hparams_for("some/unknown-model")
    with pytest.raises(ValueError, match="alpha must lie in"):
        hp.replace(alpha=1.5)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        hp.replace(learning_rate=1.0)


# ----------------------------------------------------------------------------- exactness
def test_intattn_with_alpha_zero_is_memit_bit_for_bit(smollm2, moments, fast):
    facts = [EIFFEL, COLOSSEUM]
    with edit(smollm2, facts, method="memit", hparams=fast, moments=moments, progress=False) as memit:
        pass
    with edit(smollm2, facts, method="intattn", alpha=0.0, hparams=fast, moments=moments,
              progress=False) as intattn:
        pass
    assert set(memit.deltas) == set(intattn.deltas) == {("mlp", l) for l in FAST_LAYERS}
    # alpha 0 skips the attention step, so the MLP writes are MEMIT's own operations on the
    # same inputs: equal to the last bit
    for key in memit.deltas:
        assert torch.equal(memit.deltas[key], intattn.deltas[key]), key


@pytest.mark.parametrize("lengths", [[1], [3, 3, 3], [1, 9, 1, 9, 2, 8], [5, 1, 12, 7, 7, 2, 30]])
def test_length_groups_cut_at_the_least_cost(lengths):
    """Every row lands in exactly one forward, and no cut into contiguous runs of the
    sorted lengths costs less (checked against all 2^(n-1) cuts)."""
    from itertools import product

    overhead = 4
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

    def cost(parts):
        return sum(len(p) * max(lengths[i] for i in p) + overhead for p in parts)

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = math.inf
    for cuts in product([0, 1], repeat=len(order) - 1):
        parts, current = [], [order[0]]
        for i, c in zip(order[1:], cuts):
            if c:
                parts.append(current)
                current = []
            current.append(i)
        best = min(best, cost(parts + [current]))
    assert cost(groups) == best
    with pytest.raises(ValueError, match="at least one position"):
        length_groups([2, 0])


@pytest.mark.parametrize("bound", [1, 8, 30, 100])
def test_length_groups_keep_each_forward_within_its_bound(bound):
    """With ``max_positions`` every forward pads to at most that many positions (a row
    longer than the bound runs alone), and every row is in exactly one forward."""
    lengths = [5, 1, 12, 7, 7, 2, 30, 3, 3, 9]
    groups = length_groups(lengths, max_positions=bound)
    assert sorted(j for g in groups for j in g) == list(range(len(lengths)))
    for group in groups:
        width = max(lengths[j] for j in group)
        assert len(group) == 1 or len(group) * width <= bound


def test_reads_at_the_subject_do_not_depend_on_grouping(smollm2):
    """``read_at_subject`` cuts rows after the subject and runs them shortest first in
    groups: each row's activations must equal that row run whole and alone, in the
    order of the rows. Tolerance: relative 1e-4 of the row's norm, float32 rounding of
    differently shaped matmuls over six layers (measured differences are near 1e-6)."""
    facts = [EIFFEL, COLOSSEUM, _builtin_fact()]
    templates = ["{}", "The following is a long preface about many things. {}", "So. {}"]
    rows = prompt_rows(smollm2, facts, templates)
    names = [hook("resid_post", 5), "blocks.3.attn.o.hook_in"]
    grouped = read_at_subject(smollm2, rows, names, max_tokens=40)  # several groups
    for j, row in enumerate(rows):
        whole = read_hooks(smollm2, torch.tensor([row.ids]), names)
        for name in names:
            a, b = grouped[name][j], whole[name][0, row.subject_last].flatten()
            assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.norm())), (name, j)
    one = read_at_subject(smollm2, rows, names, max_tokens=10**6)
    for name in names:
        assert grouped[name].shape == (len(rows), one[name].shape[1])
        assert torch.allclose(grouped[name], one[name], rtol=0, atol=1e-4 * float(one[name].norm(dim=1).max()))
    with pytest.raises(ValueError, match="rows is empty"):
        read_at_subject(smollm2, [], names)


def test_suffix_targets_equal_whole_row_targets(smollm2, fast):
    """Running each step only from the subject's last token on (reading the earlier
    positions' stored keys and values) gives the z* of running whole rows.

    Tolerance: cosine >= 0.9999 between the two z* (and between the two deltas, a much
    stricter check since ||delta|| << ||h||), and the same number of steps. The two paths
    differ only in float32 summation order (other matmul shapes; masked prefix slots add
    exact zeros), which moves z* by ~1e-6 relative (the batch test below derives ~3e-5
    ||h|| at worst); measured: delta cosine 1 - 6e-8 on ZsRE facts at 24 steps.
    """
    facts = [EIFFEL, COLOSSEUM]
    suffix = ia.compute_z(smollm2, facts, fast, progress=False)
    whole = ia.compute_z(smollm2, facts, fast, progress=False, suffix=False)
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(suffix.z, whole.z).min()) >= 0.9999
    assert float(cosine(suffix.delta, whole.delta).min()) >= 0.9999
    assert [d["steps"] for d in suffix.diagnostics] == [d["steps"] for d in whole.diagnostics]
    # the suffix path runs fewer positions, and the whole-row path runs every position
    assert suffix.work["needed_positions"] < whole.work["needed_positions"]
    assert suffix.work["positions"] < whole.work["positions"]
    for name, value in suffix.diagnostics[0].items():
        if isinstance(value, float) and name.startswith(("loss", "nll", "p_target")):
            # the same forward values up to rounding (losses ~1e-2..10; 1e-4 relative)
            assert value == pytest.approx(whole.diagnostics[0][name], rel=1e-4, abs=1e-6), name


def test_suffix_targets_equal_whole_row_targets_on_gemma(gemma3):
    """The same check on Gemma-3 (sliding-window and global attention layers, its own
    rotary embeddings and post-norms), with a few steps: the suffix path's masked,
    left-padded prefix must give the whole-row optimisation there too (cosine >= 0.9999
    as above)."""
    hp = hparams_for(gemma3).replace(n_context_templates=2, v_steps=4)
    suffix = ia.compute_z(gemma3, [EIFFEL], hp, progress=False)
    whole = ia.compute_z(gemma3, [EIFFEL], hp, progress=False, suffix=False)
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(suffix.delta, whole.delta).min()) >= 0.9999
    assert suffix.work["needed_positions"] < whole.work["needed_positions"]


def test_targets_of_a_fact_do_not_depend_on_its_batch(smollm2, fast):
    """z* does not depend on its batch up to float rounding: batches of one are padded to
    other widths, so float32 sums may run in another order.

    Tolerance, per coordinate: 1e-4 * ||h||, no relative part. Adam moves each coordinate
    by about v_lr per step whatever its size, so errors scale with ||h||, not with |z_i|.
    Scaling every weight by 1 + r, |r| <= 6e-8 .. 1e-6, moves z* by at most ~15 |r| ||h||
    per coordinate (v_steps 10 or 25 alike). A float32 sum taken in another order is off by
    at most ~u sqrt(K) = 6e-8 * sqrt(1536) ~ 2e-6 relative, so |dz| <= ~3e-5 ||h||: the
    tolerance (~0.01 here) keeps a factor 3 over that worst case.
    """
    # each fact stops on its own and its rows leave the batch: z* alone == z* in a batch,
    # so splitting the facts into batches of one (batch_size=1) changes nothing
    together = ia.compute_z(smollm2, [EIFFEL, COLOSSEUM], fast, progress=False)
    alone = ia.compute_z(smollm2, [EIFFEL, COLOSSEUM], fast, batch_size=1, progress=False)
    for i in range(2):
        torch.testing.assert_close(together.z[i], alone.z[i], rtol=0,
                                   atol=1e-4 * float(alone.h[i].norm()))
        # rounding could flip the stop rule only for a loss within ~1e-6 of stop_loss
        assert together.diagnostics[i]["steps"] == alone.diagnostics[i]["steps"]
        assert together.diagnostics[i]["fact"] == alone.diagnostics[i]["fact"]
    assert together.layer == alone.layer == max(fast.layers)
    assert alone.z.shape == together.z.shape
    with pytest.raises(ValueError, match="batch_size"):
        ia.compute_z(smollm2, [EIFFEL], fast, batch_size=0, progress=False)


def test_shared_targets_give_the_same_edit(smollm2, moments, fast):
    facts = [EIFFEL, COLOSSEUM]
    targets = ia.compute_z(smollm2, facts, fast, progress=False)
    with edit(smollm2, facts, method="intattn", alpha=0.3, hparams=fast, moments=moments,
              progress=False) as own:
        pass
    with edit(smollm2, facts, method="intattn", alpha=0.3, hparams=fast, moments=moments,
              targets=targets, progress=False) as shared:
        pass
    # bit for bit: edit computes its z* by the same call (facts, hparams, batch) as targets,
    # and the solve that follows is the same
    for key in own.deltas:
        assert torch.equal(own.deltas[key], shared.deltas[key]), key
    with pytest.raises(EditError, match="other facts"):
        edit(smollm2, [EIFFEL], hparams=fast, moments=moments, targets=targets, progress=False)
    with pytest.raises(EditError, match="last edited layer"):
        edit(smollm2, facts, hparams=fast, layers=[4, 5], moments=moments, targets=targets,
             progress=False)


# ----------------------------------------------------------------------------- reversibility
def test_edit_touches_only_its_modules_and_restores_bit_for_bit(smollm2, moments, fast):
    before = _parameters(smollm2)
    result = edit(smollm2, [EIFFEL], method="intattn", alpha=0.4, hparams=fast, moments=moments,
                  progress=False)
    assert set(result.deltas) == {(m, l) for m in ("mlp", "attn") for l in FAST_LAYERS}
    touched = {id(smollm2.weight(*key)) for key in result.deltas}
    # untouched parameters are never written, so they compare bit for bit
    for name, parameter in smollm2.hf_model.named_parameters():
        if id(parameter) in touched:
            assert not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), f"{name} changed but was not edited"
    # the stored delta is exactly what was added: the same single float32 addition
    for key, delta in result.deltas.items():
        name = next(n for n, p in smollm2.hf_model.named_parameters() if p is smollm2.weight(*key))
        assert torch.equal(smollm2.weight(*key), before[name] + delta)
    result.restore()
    _assert_all_equal(smollm2, before)
    result.restore()  # idempotent
    _assert_all_equal(smollm2, before)


def test_exception_inside_with_block_restores(smollm2, moments, fast):
    before = _parameters(smollm2)
    with pytest.raises(RuntimeError, match="boom"):
        with edit(smollm2, [EIFFEL], method="attn", hparams=fast, moments=moments, progress=False):
            assert not torch.equal(smollm2.weight("attn", FAST_LAYERS[0]), before_weight(smollm2, before))
            raise RuntimeError("boom")
    _assert_all_equal(smollm2, before)


def before_weight(model, reference):
    name = next(n for n, p in model.hf_model.named_parameters() if p is model.weight("attn", FAST_LAYERS[0]))
    return reference[name]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_in_the_middle_of_an_edit_restores(smollm2, moments, fast, monkeypatch, error):
    before = _parameters(smollm2)
    real = closed_form.solve_update
    calls = []

    def failing(keys, residuals, moment, lam, *, module="", layer=-1):
        calls.append((module, layer))
        if layer == FAST_LAYERS[1]:  # the first layer is already written by now
            raise error("injected")
        return real(keys, residuals, moment, lam, module=module, layer=layer)

    monkeypatch.setattr(closed_form, "solve_update", failing)
    with pytest.raises(error, match="injected"):
        edit(smollm2, [EIFFEL], method="intattn", alpha=0.5, hparams=fast, moments=moments,
             progress=False)
    assert calls[:2] == [("attn", FAST_LAYERS[0]), ("mlp", FAST_LAYERS[0])]
    _assert_all_equal(smollm2, before)


# ----------------------------------------------------------------------------- efficacy
@pytest.mark.parametrize("method", EDIT_METHODS)
def test_edit_flips_the_greedy_answer(smollm2, moments, method):
    """Every method, with its defaults for the model, writes a hand-built fact and
    restores the model bit for bit."""
    before = _parameters(smollm2)
    assert _answers(smollm2, EIFFEL, "Paris")
    with edit(smollm2, [EIFFEL], method=method, moments=moments, progress=False) as result:
        assert _answers(smollm2, EIFFEL, "Rome"), result.z_diagnostics
        # above 1/2 the target's (geometric-mean) probability beats all else together
        assert result.z_diagnostics[0]["p_target_after"] > 0.5
    assert _answers(smollm2, EIFFEL, "Paris")
    _assert_all_equal(smollm2, before)


def test_edit_of_a_builtin_fact(smollm2, moments):
    fact = _builtin_fact()
    assert _answers(smollm2, fact, fact.target_true)
    with edit(smollm2, fact, method="intattn", moments=moments, progress=False):
        assert _answers(smollm2, fact, fact.target_new)
    assert _answers(smollm2, fact, fact.target_true)


# ----------------------------------------------------------------------------- files
def test_save_and_apply_deltas_round_trip(smollm2, moments, fast, tmp_path):
    before = _parameters(smollm2)
    with edit(smollm2, [COLOSSEUM], method="intattn", alpha={5: 0.2, 6: 0.7}, hparams=fast,
              moments=moments, progress=False) as result:
        edited = _parameters(smollm2)
        path = result.save(tmp_path / "edit.safetensors")
    _assert_all_equal(smollm2, before)
    with apply_deltas(smollm2, path) as applied:
        _assert_all_equal(smollm2, edited)
        assert applied.method == "intattn" and applied.alphas == {5: 0.2, 6: 0.7}
        assert applied.hparams == result.hparams
    _assert_all_equal(smollm2, before)

    other = tmp_path / "other.safetensors"
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), str(other), metadata={"cache_id": "another-model@x"})
    with pytest.raises(EditError, match="another-model"):
        apply_deltas(smollm2, other)
    with pytest.raises(EditError, match="shape"):
        apply_deltas(smollm2, {("mlp", 5): torch.zeros(3, 3)})
    _assert_all_equal(smollm2, before)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(smollm2, moments, fast):
    def run(facts=(EIFFEL,), **kwargs):
        options = dict(hparams=fast, moments=moments, progress=False)
        options.update(kwargs)
        return edit(smollm2, list(facts), **options)

    with pytest.raises(EditError, match="empty"):
        run(facts=[])
    same = ia.Fact.from_text("The Eiffel Tower is in", "Eiffel Tower", "paris", target_true="Paris")
    with pytest.raises(EditError, match="equals target_true"):
        run(facts=[same])
    with pytest.raises(EditError, match=r"layer 30 is outside .*\[0, 29\]"):
        run(layers=[5, 30])
    with pytest.raises(EditError, match=r"alpha must lie in \[0, 1\]"):
        run(alpha=1.5)
    with pytest.raises(EditError, match="known methods: .*'intattn'"):
        run(method="rome-ish")
    with pytest.raises(EditError, match="fixed attention share"):
        run(method="memit", alpha=0.5)
    with pytest.raises(EditError, match=r"missing second moments for \[\('attn', 5\)"):
        run(moments={k: v for k, v in moments.items() if k != ("attn", 5)})
    with pytest.raises(ia.FactError, match="exactly one"):
        ia.Fact(subject="Big Ben", prompt="The tower is in", target_true=None, target_new="Rome")
    with pytest.raises(ia.FactError, match="does not occur in prompt"):
        ia.Fact.from_text("The tower is in", "Big Ben", "Rome")

    keys, residuals = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(EditError, match="NaN"):
        solve_update(keys, residuals, torch.full((8, 8), float("nan")), 1.0, module="mlp", layer=3)
    with pytest.raises(EditError, match="singular"):
        solve_update(keys, residuals, torch.zeros(8, 8, dtype=torch.float64), 1.0, module="mlp", layer=3)
    assert set(METHODS) >= {"memit", "intattn", "attn"}


def test_solve_update_matches_the_closed_form():
    torch.manual_seed(0)
    keys, residuals = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    basis = torch.randn(20, 6, dtype=torch.float64)
    moment = basis.T @ basis / 20
    update = solve_update(keys, residuals, moment, 2.0)
    K, R = keys.T, residuals.T
    expected = R @ K.T @ torch.linalg.inv(2.0 * moment + K @ K.T)
    # float64 on a 6x6 system of condition number ~10 (20 samples in 6 dimensions): Cholesky
    # and the explicit inverse agree to ~cond·u ~ 1e-15 on entries up to ~0.6, so 1e-9
    # relative (1e-12 absolute near 0) would hold up to cond ~1e6.
    torch.testing.assert_close(update, expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- post-norms
def _achieved(model, fact, templates, layer, module):
    rows = prompt_rows(model, [fact], templates)
    name = hook("attn_out" if module == "attn" else "mlp_out", layer)
    return read_at_subject(model, rows, [name])[name].double().mean(0)


@pytest.mark.parametrize("module", ["mlp", "attn"])
def test_gemma_post_norm_residual_is_reached(gemma3, tmp_path_factory, module, monkeypatch):
    """On Gemma-3 a write into down_proj / o_proj changes the residual stream through an
    RMSNorm, whose outputs form a shell. The conversion into the module's own output space
    must give the closest point of that shell: the residual change achieved by the write
    equals the change the norm gives for the converted target, no point of the shell
    near the request does better, and it is far better than using the residual target as
    the module's target.

    One layer, the bare prompt only and lambda 1, so that the write reproduces the
    module-space target exactly and only the post-norm conversion is measured.
    """
    layer = 4
    hp = hparams_for(gemma3).replace(
        layers=(layer,), n_context_templates=0, v_steps=8, lambda_mlp=1.0, lambda_attn=1.0,
        clamp_norm_factor=0.05,
    )
    moments = _moments(gemma3, [layer], tmp_path_factory, 10000)
    method = "memit" if module == "mlp" else "attn"
    norm = edit_keys.post_norm(gemma3, module, layer)
    converted = closed_form.module_space
    seen = {}

    def spy(model, m, l, residual, outputs, weights):
        change = converted(model, m, l, residual, outputs, weights)
        seen.update(residual=residual.double()[0], outputs=outputs.double()[0], change=change[0])
        return change

    def relative_error() -> float:
        with edit(gemma3, [EIFFEL], method=method, hparams=hp, moments=moments, progress=False) as r:
            after = _achieved(gemma3, EIFFEL, r.context_templates, layer, module)
        before = _achieved(gemma3, EIFFEL, r.context_templates, layer, module)
        requested = r.residuals[(module, layer)][0].double()
        return float((after - before - requested).norm() / requested.norm())

    monkeypatch.setattr(closed_form, "module_space", spy)
    error = relative_error()
    x, change, wanted = seen["outputs"], seen["change"], seen["residual"]

    def shortfall(dx: Tensor) -> float:
        with torch.no_grad():
            reached = norm((x + dx).float()).double() - norm(x.float()).double()
        return float((reached - wanted).norm() / wanted.norm())

    reachable = shortfall(change)
    generator = torch.Generator().manual_seed(0)
    nearby = min(
        shortfall(change + 0.05 * change.norm() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
                  / math.sqrt(x.numel()))
        for _ in range(20)
    )
    monkeypatch.setattr(closed_form, "module_space", lambda model, m, l, residual, *a: residual)
    naive = relative_error()
    print(f"gemma3 {module} layer {layer}: relative error {error:.3f}, closest point of the "
          f"norm's shell {reachable:.3f}, random points nearby {nearby:.3f}, residual target "
          f"used as the module target {naive:.3f}")
    # At lambda 1 the solve writes s/(1+s) of the module-space change for the one key, with
    # s = k^T C^-1 k ~ d (1024 or 2048 here): the two errors differ by ~1/(1+s) ~ 1e-3 of the
    # request, and float32 forwards add ~1e-6; 0.01 is ten times the larger.
    assert abs(error - reachable) < 0.01
    # reachable is the closest point of the shell: random points 5% away fall short by at
    # least ~0.05²/2 more; 1e-6 absorbs float32 rounding of the norm's outputs (~u·|y|/|R|).
    assert reachable <= nearby + 1e-6
    assert error < naive / 4


def test_rome_on_gemma_gives_the_model_its_target(gemma3, tmp_path_factory):
    """ROME on a post-norm model: ``v*`` is optimised before the MLP's norm, so the edited
    model gives the target's probability to ``target_new`` on the prompts it was optimised
    on. (Optimised after the norm and converted by the shell projection, targets that
    reached p 0.89-0.995 left p 0.000-0.003 after the write on ZsRE facts.)

    Not equal: the rank-one write also moves the MLP output at positions other than the
    subject's, and at the context prefixes' subjects (their keys differ from the bare
    prompt's); on 8 ZsRE facts the two probabilities differed by at most 0.09."""
    hp = hparams_for(gemma3, "rome")
    layer = hp.layers[0]
    moments = _moments(gemma3, [layer], tmp_path_factory, 10000)
    probe = hp.replace(v_steps=1)  # one evaluation, no step: the model's own probability
    with edit(gemma3, [EIFFEL], method="rome", moments=moments, progress=False) as result:
        reached = result.z_diagnostics[0]["p_target_after"]
        edited = ia.compute_z(gemma3, [EIFFEL], probe, templates=result.context_templates,
                              site=rome.target_site(gemma3, layer), progress=False)
        given = edited.diagnostics[0]["p_target_before"]
        assert _answers(gemma3, EIFFEL, "Rome")
    print(f"gemma3 ROME at layer {layer}: p(target_new) reached by v* {reached:.3f}, "
          f"given by the edited model {given:.3f}")
    assert reached > 0.5
    assert given > reached - 0.15
