"""Edit-and-evaluate runs (``intattn_analysis.runs``) and the ``intattn evaluate`` command."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import intattn_analysis as ia
from intattn_analysis import cli, runs
from intattn_analysis.covariance import second_moments
from intattn_analysis.editors.api import check_facts
from intattn_analysis.hparams import hparams_for

pytestmark = pytest.mark.usefixtures("one_thread")

EIFFEL = ia.Fact.from_text(
    "The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", target_true="Paris"
)
COLOSSEUM = ia.Fact.from_text(
    "The Colosseum is located in the city of", "Colosseum", "London", target_true="Rome"
)
SAME = ia.Fact.from_text("The Louvre is located in the city of", "Louvre", "Paris", target_true="paris")
LAYERS = (5, 6)


def test_editable_batches_leave_out_and_list_unchanged_records():
    facts = [EIFFEL, SAME, COLOSSEUM, EIFFEL, COLOSSEUM]
    batches, unchanged = runs.editable_batches(facts, 2)
    assert unchanged == [SAME]
    assert batches == [[EIFFEL, COLOSSEUM], [EIFFEL, COLOSSEUM]]
    batches, _ = runs.editable_batches(facts, 2, 1, offset=1)
    assert batches == [[COLOSSEUM, EIFFEL]]
    assert runs.editable_batches(facts, 3)[0] == [[EIFFEL, COLOSSEUM, EIFFEL]]


def test_editable_batches_defer_a_second_answer_to_one_prompt():
    """A batch never asks one prompt for two answers (``ia.edit`` would refuse it): the
    later record waits for the next batch, the gap is filled in order, and a warning
    names the prompt; the same answer asked twice stays where it is."""
    other = ia.Fact.from_text(EIFFEL.text, EIFFEL.subject, "Berlin", target_true="Paris")
    facts = [EIFFEL, other, COLOSSEUM, SAME]
    with pytest.warns(ia.DatasetWarning, match="Eiffel Tower.*'Rome'.*'Berlin'.*batch 0"):
        batches, _ = runs.editable_batches(facts, 2)
    assert batches == [[EIFFEL, COLOSSEUM]]  # 'other' waits; no second full batch
    with pytest.warns(ia.DatasetWarning):
        batches, _ = runs.editable_batches(facts + [COLOSSEUM], 2)
    assert batches == [[EIFFEL, COLOSSEUM], [other, COLOSSEUM]]
    with pytest.warns(ia.DatasetWarning), pytest.raises(ValueError, match="only 1 full batch"):
        runs.editable_batches(facts + [EIFFEL], 2, 2)  # 'other' and EIFFEL cannot share one
    for batch in batches:
        check_facts(batch)  # every batch is one the editors accept
    assert runs.editable_batches([EIFFEL, EIFFEL, COLOSSEUM], 2)[0] == [[EIFFEL, EIFFEL]]


@pytest.mark.parametrize(
    "args, match",
    [((2, 3), "only 2 full batch"), ((5,), "not one batch"), ((0,), "batch_size"),
     ((2, 0), "n_batches")],
)
def test_editable_batches_errors_name_the_fix(args, match):
    with pytest.raises(ValueError, match=match):
        runs.editable_batches([EIFFEL, SAME, COLOSSEUM, EIFFEL, COLOSSEUM], *args)


@pytest.fixture(scope="module")
def corpus_moments(smollm2, tmp_path_factory):
    texts = [f"{f.text} {f.target_true or ''}" for f in ia.load_facts("builtin")
             if f.subject not in (EIFFEL.subject, COLOSSEUM.subject)]
    return second_moments(
        smollm2, list(LAYERS), modules=("mlp", "attn"), corpus=texts, n_tokens=10000, max_len=64,
        cache_dir=tmp_path_factory.mktemp("moments"), progress=False, allow_fewer_tokens=True,
    )


@pytest.fixture(scope="module")
def fast(smollm2):
    return hparams_for(smollm2).replace(layers=LAYERS, alpha=0.3, n_context_templates=2, v_steps=10)


def test_edit_batches_edits_evaluates_and_restores(smollm2, corpus_moments, fast):
    weights = {k: v.detach().clone() for k, v in smollm2.hf_model.state_dict().items()}
    run = runs.edit_batches(smollm2, [[EIFFEL, COLOSSEUM]], ["memit", "intattn"], fast,
                            moments=corpus_moments, dataset="hand", metrics=("knowedit",),
                            targets_cache=False, progress=False)
    assert list(run.records["method"]) == ["pre-edit", "memit", "intattn"]
    assert set(run.records["dataset"]) == {"hand"} and set(run.records["batch"]) == {0}
    by_method = run.records.set_index("method")["Edit Succ."]
    assert by_method["memit"] > by_method["pre-edit"]
    assert len(run.targets) == 1 and run.targets[0].z.shape[0] == 2
    assert list(run.timings["method"]) == ["memit", "intattn"]
    assert len(run.per_fact) == 3 * 2
    table = run.table(("Edit Succ.", "Locality"))
    assert table.loc[(smollm2.name, "hand", "memit"), ("Edit Succ.", "n")] == 1
    # bit for bit: each method's restore copies the saved weights back
    for name, value in smollm2.hf_model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_evaluate_command_prints_and_writes_the_table(smollm2, corpus_moments, monkeypatch, tmp_path, capsys):
    import intattn_analysis.covariance as covariance
    import intattn_analysis.loading as loading

    monkeypatch.setenv("INTATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(covariance, "second_moments", lambda *a, **k: corpus_moments)
    monkeypatch.setattr(loading, "load_model", lambda name, **k: smollm2)
    out = tmp_path / "run"
    code = cli.main([
        "evaluate", "--data", "builtin", "--batch-size", "2", "--batches", "1",
        "--methods", "memit", "--metrics", "knowedit", "--layers", "5", "6", "--alpha", "0",
        "--v-steps", "5", "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pre-edit" in printed and "memit" in printed and "Edit Succ." in printed
    records = pd.read_csv(out.with_suffix(".csv"))
    assert list(records["method"]) == ["pre-edit", "memit"]
    assert (tmp_path / "run_per_fact.csv").exists() and out.with_suffix(".md").read_text().startswith("|")
    assert len(list((tmp_path / "cache" / "targets").rglob("z-*.json"))) == 2


def test_targets_cache_reuses_each_fact_and_keys_every_setting(smollm2, fast, tmp_path):
    first = ia.compute_z(smollm2, [EIFFEL, COLOSSEUM], fast, progress=False, cache_dir=tmp_path)
    files = sorted(tmp_path.rglob("z-*.json"))
    assert len(files) == 2
    # the same facts in another batch and order come from the cache, bit for bit (the JSON
    # holds each float32 as a float64 repr, an exact round trip)
    again = ia.compute_z(smollm2, [COLOSSEUM, EIFFEL], fast, progress=False, cache_dir=tmp_path)
    assert torch.equal(again.z, first.z[[1, 0]]) and torch.equal(again.delta, first.delta[[1, 0]])
    assert again.diagnostics[0] == first.diagnostics[1]
    assert sorted(tmp_path.rglob("z-*.json")) == files
    # a setting the target depends on makes a new entry; a damaged file is recomputed
    ia.compute_z(smollm2, [EIFFEL], fast.replace(v_steps=3), progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("z-*.json"))) == 3
    files[0].write_text("{not json")
    redone = ia.compute_z(smollm2, [EIFFEL, COLOSSEUM], fast, progress=False, cache_dir=tmp_path)
    # One fact is a cache hit (exact), the other is recomputed alone, padded to another width:
    # float32 sums in another order move z* by up to ~3e-5 ||h|| per coordinate, so 1e-4 ||h||
    # as in test_editing's batch test (an absolute 1e-3 is only 1e-5 ||h|| here).
    for i in range(2):
        torch.testing.assert_close(redone.z[i], first.z[i], rtol=0,
                                   atol=1e-4 * float(first.h[i].norm()))
    # a solve setting does not enter the key
    ia.compute_z(smollm2, [EIFFEL], fast.replace(lambda_mlp=123.0), progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.rglob("z-*.json"))) == 3


def test_alpha_sweep_and_main_table_figures(tmp_path):
    from intattn_analysis import plots, reporting

    sweep = pd.DataFrame({
        "panel": ["a"] * 3 + ["b"] * 3, "alpha": [0, 0.5, 1] * 2,
        "Edit Succ.": [0.9, 0.5, 0.1, 0.8, 0.7, 0.2], "Locality": [0.6, 0.5, 0.3] * 2,
        "Portability": [float("nan")] * 6,
    })
    fig = plots.plot_alpha_sweep(sweep, label="ZsRE")
    assert [ax.get_title() for ax in fig.axes] == ["alpha sweep: ZsRE: a", "alpha sweep: ZsRE: b"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]  # an all-NaN metric is not drawn
    single = plots.plot_alpha_sweep(sweep[sweep["panel"] == "a"].drop(columns="panel"))
    assert len(single.axes) == 1
    records = [{"model": "m", "dataset": "d", "method": method, "batch": b, "Edit Succ.": v,
                "Rephrase": v, "Portability": v, "Locality": v, "Fluency": 4.0}
               for b, (method, v) in enumerate([("memit", 0.9), ("memit", 0.7)])]
    table = reporting.main_table(records)
    assert reporting.formatted(table).loc[("m", "d", "memit"), "Edit Succ."] == "80.0 ± 14.1"
    paths = plots.save_figure(plots.plot_main_table(table), "main", tmp_path)
    assert all(p.exists() for p in paths)


def test_targets_cache_keys_on_the_model_state(smollm2, fast, tmp_path):
    """An edited model's targets are cached under its own state: the unedited model's
    file is not served to it, and its file is not served to the unedited model."""
    key = ("mlp", 5)
    hp = fast.replace(v_steps=2)
    plain = ia.compute_z(smollm2, [EIFFEL], hp, progress=False, cache_dir=tmp_path)
    nudge = {key: torch.full_like(smollm2.weight(*key), 1e-3)}
    with ia.apply_deltas(smollm2, nudge) as applied:
        assert smollm2.open_edits == 1
        edited = ia.compute_z(smollm2, [EIFFEL], hp, progress=False, cache_dir=tmp_path)
        assert not torch.equal(edited.z, plain.z)
        applied.restore()  # twice (here and on exit) counts once
    assert smollm2.open_edits == 0
    assert len(list(tmp_path.rglob("z-*.json"))) == 2
    again = ia.compute_z(smollm2, [EIFFEL], hp, progress=False, cache_dir=tmp_path)
    assert torch.equal(again.z, plain.z)


def test_a_failed_batch_keeps_what_finished(smollm2, corpus_moments, fast):
    # an unknown method is named before anything runs
    with pytest.raises(ia.EditError, match="unknown method"):
        runs.edit_batches(smollm2, [[EIFFEL]], ["memit", "nope"], fast, progress=False)
    # a method that fails on the batch keeps what finished before it
    hparams = {"memit": fast.replace(v_steps=2), "intattn": fast.replace(layers=(smollm2.n_layers,))}
    with pytest.raises(ia.EditError, match="layer") as caught:
        runs.edit_batches(smollm2, [[EIFFEL]], ["memit", "intattn"], hparams, moments=corpus_moments,
                          metrics=("knowedit",), targets_cache=False, progress=False)
    partial = caught.value.partial_run
    assert list(partial.records["method"]) == ["pre-edit", "memit"]
    assert smollm2.open_edits == 0
