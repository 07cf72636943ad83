"""The grid syntax of ``scripts/tune_editor.py`` (the script itself runs models; its
editing path is the ``editors`` experiment's, tested in test_experiments.py)."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "tune_editor.py"


@pytest.fixture(scope="module")
def tune_editor():
    spec = importlib.util.spec_from_file_location("tune_editor", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_values_are_read_as_json_where_they_parse(tune_editor):
    grid = tune_editor.parse_grid(["clamp_norm_factor=1,4.5", "stop_on=nll,loss", "attn_targets=true,false"])
    assert grid == {"clamp_norm_factor": [1, 4.5], "stop_on": ["nll", "loss"], "attn_targets": [True, False]}


def test_layers_take_single_layers_and_ranges(tune_editor):
    assert tune_editor.parse_grid(["layers=3,3-5"]) == {"layers": [(3,), (3, 4, 5)]}


@pytest.mark.parametrize("item", ["clamp_norm_factor", "clamp_norm_factor="])
def test_a_grid_item_without_values_names_the_form(tune_editor, item):
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        tune_editor.parse_grid([item])


def test_an_unknown_field_is_named_before_any_work(tune_editor, monkeypatch):
    import intattn_analysis as ia

    monkeypatch.setattr(tune_editor.torch, "set_num_threads", lambda n: None)  # this process keeps its own
    monkeypatch.setattr(ia, "load_model", lambda name: name)  # hparams_for takes a model name
    with pytest.raises(SystemExit, match=r"no field\(s\) \['clamp'\]"):
        tune_editor.main(["pmet", "--grid", "clamp=1,4"])


def test_a_grown_table_keeps_other_datasets_and_replaces_remeasured_rows(tune_editor):
    rows = lambda dataset, mean: {"model": "m", "dataset": dataset, "setting": "MEMIT",
                                  "metric": "Edit Succ.", "mean": mean}
    previous = pd.DataFrame([rows("zsre-train", 90.7), rows("zsre", 88.0)])
    table = tune_editor.grown(previous, pd.DataFrame([rows("zsre", 88.6)]))
    assert sorted(zip(table["dataset"], table["mean"])) == [("zsre", 88.6), ("zsre-train", 90.7)]


def test_a_grown_table_keeps_a_setting_measured_on_another_number_of_facts(tune_editor):
    rows = lambda n, mean: {"model": "m", "dataset": "zsre-train", "setting": "MEMIT",
                            "metric": "Edit Succ.", "mean": mean, "n_edits": n}
    previous = pd.DataFrame([rows(50, 90.7), rows(100, 90.0)])
    table = tune_editor.grown(previous, pd.DataFrame([rows(100, 89.5)]))
    assert sorted(zip(table["n_edits"], table["mean"])) == [(50, 90.7), (100, 89.5)]


def test_grids_on_different_batches_use_different_stores(tune_editor):
    # A store holds one configuration per label: MEMIT on 50 facts and on 100 facts share
    # the labels (setting "MEMIT", batch 0) and would make the summary refuse the store.
    folders = {tune_editor.store_folder("m", dataset, facts)
               for dataset, facts in [("zsre-train", 50), ("zsre-train", 100), ("zsre", 100),
                                      ("knowedit/ZsRE-test-all.json", 100)]}
    assert len(folders) == 4
    # a dataset file is named by its stem, as the editors experiment stores it: one level
    assert all(folder.parent.name == "m" for folder in folders)
    assert tune_editor.store_folder("m", "knowedit/ZsRE-test-all.json", 100).name == "ZsRE-test-all-100"


def test_the_baseline_names_what_differs_from_the_class_defaults(tune_editor):
    from intattn_analysis.hparams import EditHparams

    hp = EditHparams(layers=(3, 4, 5), v_steps=40, lambda_mlp=250.0)
    assert tune_editor.describe(hp) == "layers=3-4-5 v_steps=40 lambda_mlp=250.0"
    assert tune_editor.describe(EditHparams(layers=(2,))) == "layers=2"


def test_a_change_of_defaults_gets_its_own_store_and_keeps_the_old_rows(tune_editor):
    # The labels of a grid ("MEMIT", "memit v_steps=40") are relative to the defaults:
    # after the defaults change, the same label is another configuration.
    from intattn_analysis.hparams import EditHparams

    old = EditHparams(layers=(3, 4, 5))
    new = old.replace(v_steps=40)
    folders = {tune_editor.store_folder("m", "zsre-train", 100, (hp, hp)) for hp in (old, new)}
    assert len(folders) == 2
    rows = lambda baseline, mean: {"model": "m", "dataset": "zsre-train", "setting": "MEMIT",
                                   "metric": "Edit Succ.", "mean": mean, "n_edits": 100,
                                   "baseline": baseline}
    previous = pd.DataFrame([rows("memit layers=3-4-5", 90.7)])
    table = tune_editor.grown(previous, pd.DataFrame([rows("memit layers=3-4-5 v_steps=40", 93.0)]))
    assert sorted(table["mean"]) == [90.7, 93.0]
    again = tune_editor.grown(table, pd.DataFrame([rows("memit layers=3-4-5 v_steps=40", 93.1)]))
    assert sorted(again["mean"]) == [90.7, 93.1]


def test_a_set_field_takes_one_value_that_both_hparams_have(tune_editor, monkeypatch):
    import intattn_analysis as ia

    monkeypatch.setattr(tune_editor.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(ia, "load_model", lambda name: name)
    with pytest.raises(SystemExit, match="one value per field"):
        tune_editor.main(["pmet", "--set", "v_steps=20,40"])
    with pytest.raises(SystemExit, match=r"do not both have field\(s\) \['attn_targets'\]"):
        tune_editor.main(["pmet", "--set", "attn_targets=false"])
    with pytest.raises(SystemExit, match="--set 'v_steps'"):
        tune_editor.main(["pmet", "--set", "v_steps"])
