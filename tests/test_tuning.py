"""The tuning experiment's grid syntax, stores and table (``intattn tune``; its editing
path is the ``editors`` experiment's, tested in test_experiments.py)."""

import pandas as pd
import pytest

from intattn_analysis import cli
from intattn_analysis.experiments import tuning


@pytest.fixture
def no_model(monkeypatch):
    """``intattn tune`` with a model that is only its name (hparams_for takes a name):
    argument errors must come before any work."""
    import intattn_analysis.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda name, **kwargs: name)


def test_grid_values_are_read_as_json_where_they_parse():
    grid = tuning.parse_grid(["clamp_norm_factor=1,4.5", "stop_on=nll,loss", "attn_targets=true,false"])
    assert grid == {"clamp_norm_factor": [1, 4.5], "stop_on": ["nll", "loss"], "attn_targets": [True, False]}


def test_layers_take_single_layers_and_ranges():
    assert tuning.parse_grid(["layers=3,3-5"]) == {"layers": [(3,), (3, 4, 5)]}


@pytest.mark.parametrize("item", ["clamp_norm_factor", "clamp_norm_factor="])
def test_a_grid_item_without_values_names_the_form(item):
    with pytest.raises(ValueError, match="NAME=VALUE"):
        tuning.parse_grid([item])


def test_an_unknown_field_is_named_before_any_work(no_model, capsys):
    assert cli.main(["tune", "pmet", "--grid", "clamp=1,4"]) == 2
    assert "no field(s) ['clamp']" in capsys.readouterr().err


def test_a_grown_table_keeps_other_datasets_and_replaces_remeasured_rows():
    rows = lambda dataset, mean: {"model": "m", "dataset": dataset, "setting": "MEMIT",
                                  "metric": "Edit Succ.", "mean": mean}
    previous = pd.DataFrame([rows("zsre-train", 90.7), rows("zsre", 88.0)])
    table = tuning.grown(previous, pd.DataFrame([rows("zsre", 88.6)]))
    assert sorted(zip(table["dataset"], table["mean"])) == [("zsre", 88.6), ("zsre-train", 90.7)]


def test_a_grown_table_keeps_a_setting_measured_on_another_number_of_facts():
    rows = lambda n, mean: {"model": "m", "dataset": "zsre-train", "setting": "MEMIT",
                            "metric": "Edit Succ.", "mean": mean, "n_edits": n}
    previous = pd.DataFrame([rows(50, 90.7), rows(100, 90.0)])
    table = tuning.grown(previous, pd.DataFrame([rows(100, 89.5)]))
    assert sorted(zip(table["n_edits"], table["mean"])) == [(50, 90.7), (100, 89.5)]


def test_grids_on_different_batches_use_different_stores():
    # A store holds one configuration per label: MEMIT on 50 facts and on 100 facts share
    # the labels (setting "MEMIT", batch 0) and would make the summary refuse the store.
    folders = {tuning.store_folder("m", dataset, facts)
               for dataset, facts in [("zsre-train", 50), ("zsre-train", 100), ("zsre", 100),
                                      ("knowedit/ZsRE-test-all.json", 100)]}
    assert len(folders) == 4
    # a dataset file is named by its stem, as the editors experiment stores it: one level
    assert all(folder.parent.name == "m" for folder in folders)
    assert tuning.store_folder("m", "knowedit/ZsRE-test-all.json", 100).name == "ZsRE-test-all-100"


def test_the_baseline_names_what_differs_from_the_class_defaults():
    from intattn_analysis.hparams import EditHparams

    hp = EditHparams(layers=(3, 4, 5), v_steps=40, lambda_mlp=250.0)
    assert tuning.describe(hp) == "layers=3-4-5 v_steps=40 lambda_mlp=250.0"
    assert tuning.describe(EditHparams(layers=(2,))) == "layers=2"


def test_a_change_of_defaults_gets_its_own_store_and_keeps_the_old_rows():
    # The labels of a grid ("MEMIT", "memit v_steps=40") are relative to the defaults:
    # after the defaults change, the same label is another configuration.
    from intattn_analysis.hparams import EditHparams

    old = EditHparams(layers=(3, 4, 5))
    new = old.replace(v_steps=40)
    folders = {tuning.store_folder("m", "zsre-train", 100, (hp, hp)) for hp in (old, new)}
    assert len(folders) == 2
    rows = lambda baseline, mean: {"model": "m", "dataset": "zsre-train", "setting": "MEMIT",
                                   "metric": "Edit Succ.", "mean": mean, "n_edits": 100,
                                   "baseline": baseline}
    previous = pd.DataFrame([rows("memit layers=3-4-5", 90.7)])
    table = tuning.grown(previous, pd.DataFrame([rows("memit layers=3-4-5 v_steps=40", 93.0)]))
    assert sorted(table["mean"]) == [90.7, 93.0]
    again = tuning.grown(table, pd.DataFrame([rows("memit layers=3-4-5 v_steps=40", 93.1)]))
    assert sorted(again["mean"]) == [90.7, 93.1]


def test_a_set_field_takes_one_value_that_both_hparams_have(no_model, capsys):
    assert cli.main(["tune", "pmet", "--set", "v_steps=20,40"]) == 2
    assert "one value per field" in capsys.readouterr().err
    assert cli.main(["tune", "pmet", "--set", "attn_targets=false"]) == 2
    assert "do not both have field(s) ['attn_targets']" in capsys.readouterr().err
    assert cli.main(["tune", "pmet", "--set", "v_steps"]) == 2
    assert "--set 'v_steps'" in capsys.readouterr().err


def test_the_grid_is_memit_then_every_point_on_the_methods_defaults():
    settings, memit, base = tuning.grid_settings("smollm2-135m", "pmet", {"clamp_norm_factor": [1, 4]},
                                                 {"mom2_n_tokens": [20_000]})
    assert list(settings) == ["MEMIT", "pmet clamp_norm_factor=1", "pmet clamp_norm_factor=4"]
    assert settings["MEMIT"] == ("memit", memit) and memit.mom2_n_tokens == 20_000
    assert [hp.clamp_norm_factor for _, hp in list(settings.values())[1:]] == [1, 4]
    assert all(hp.mom2_n_tokens == 20_000 for _, hp in settings.values())
    alone, _, _ = tuning.grid_settings("smollm2-135m", "rome", {"layers": [(3,)]}, each_alone=True)
    assert list(alone) == ["MEMIT", "rome alone layers=3"]
