"""Settings ids: every table row names the settings its units were computed at, a row that
would pool two settings is refused, and what a unit is *of* is not a setting."""

import pandas as pd
import pytest

from intattn_analysis.experiments.settings import (
    MixedSettingsError, label, label_tables, settings_id, settings_of, settings_table, unit_settings, with_settings)
from intattn_analysis.experiments.store import ResultStore

MEMIT = {"layers": [3, 4], "v_steps": 40, "kl_factor": 0.25, "lambda_mlp": 250.0, "mom2_n_tokens": 100000,
         "mom2_max_len": 256, "mom2_adjustment": True}


def _edit_key(batch=0, **hparams):
    return {"format": 2, "model": "tiny@0123", "model_dtype": "torch.float32", "dataset": "zsre", "batch": batch,
            "facts": f"facts{batch}", "n_facts": 4, "method": "memit", "hparams_type": "EditHparams",
            "hparams": {**MEMIT, **hparams}, "metrics": ["edit"], "unit": "edit"}


def _store(tmp_path, units):
    """A store of ``units``: (key, labels) pairs, each with one row."""
    store = ResultStore(tmp_path, "demo")
    for i, (key, labels) in enumerate(units):
        store.write_unit(key, [{"position": 0, "Edit Succ.": 1.0}], label=f"u{i}", labels=labels)
    return store


def _labels(setting="MEMIT", batch=0):
    return {"model": "tiny", "dataset": "zsre", "setting": setting, "batch": batch, "method": "memit"}


def test_what_a_unit_is_of_is_not_a_setting():
    base = settings_id(settings_of(_edit_key()))
    assert settings_id(settings_of(_edit_key(batch=7))) == base, "the batch changed the settings"
    measured = {**_edit_key(), "part": "trace", "window": 6, "noise": 3.0, "samples": 10, "n_traced": 3}
    assert settings_id(settings_of(measured)) == base, "what an edit's unit measures changed its settings"
    assert settings_id(settings_of(_edit_key(kl_factor=0.0625))) != base, "the KL weight is a setting"
    assert settings_id(settings_of({**_edit_key(), "model": "tiny@4567"})) != base, "the weights are a setting"
    assert settings_id(settings_of({**_edit_key(), "model_dtype": "torch.bfloat16"})) != base
    trace = {"format": 2, "model": "tiny@0123", "model_dtype": "torch.float32", "chunk": 0, "facts": "f",
             "window": 6, "noise": 3.0, "samples": 10, "seed": 0, "kinds": ["attn", "mlp"], "tokens": "all"}
    assert settings_of({**trace, "chunk": 3, "facts": "g"}) == settings_of(trace)
    assert settings_id(settings_of({**trace, "noise": 2.0})) != settings_id(settings_of(trace))


def test_rows_are_labelled_and_the_settings_are_listed(tmp_path):
    store = _store(tmp_path, [(_edit_key(0), _labels(batch=0)), (_edit_key(1), _labels(batch=1)),
                              (_edit_key(0, kl_factor=0.0625), _labels("MEMIT, old KL", 0))])
    table = pd.DataFrame({"model": ["tiny", "tiny"], "dataset": ["zsre", "zsre"],
                          "setting": ["MEMIT", "MEMIT, old KL"], "mean": [1.0, 1.0]})
    labelled = with_settings({"intervals": table}, store)
    ids = labelled["intervals"]["settings_id"].tolist()
    assert ids[0] != ids[1] and "+" not in ids[0]
    listed = labelled["settings"].set_index("settings_id")
    assert set(ids) == set(listed.index)
    assert listed.loc[ids[0], "units"] == 2 and listed.loc[ids[0], "kl_factor"] == 0.25
    assert listed.loc[ids[1], "kl_factor"] == 0.0625 and listed.loc[ids[1], "row_labels"] == "MEMIT, old KL"
    assert listed.loc[ids[0], "moments_source"] == "model-samples:seed0"


def test_a_row_that_pools_two_settings_is_refused(tmp_path):
    # the same row (MEMIT), one batch at today's KL weight and one at an older one
    store = _store(tmp_path, [(_edit_key(0), _labels(batch=0)), (_edit_key(1, kl_factor=0.0625), _labels(batch=1))])
    table = pd.DataFrame({"model": ["tiny"], "dataset": ["zsre"], "setting": ["MEMIT"], "mean": [1.0]})
    with pytest.raises(MixedSettingsError, match=r"intervals: the units of model=tiny, dataset=zsre.*setting=MEMIT.* "
                                                 r"2 settings.*intattn status"):
        label_tables({"intervals": table}, store)
    # a table whose rows pool every setting of a model refuses them as well: the mix is in
    # the units, whatever the table does with them
    per_model = pd.DataFrame({"model": ["tiny"], "n_units": [2]})
    with pytest.raises(MixedSettingsError, match="coverage: the units of"):
        label_tables({"coverage": per_model}, store)


def test_a_table_that_pools_on_purpose_names_every_id(tmp_path):
    store = _store(tmp_path, [(_edit_key(0), _labels("MEMIT")), (_edit_key(0, kl_factor=0.0625), _labels("old"))])
    units = unit_settings(store)
    per_model = pd.DataFrame({"model": ["tiny"], "n_units": [2]})  # no setting column: one row over every setting
    ids = label(per_model, units)["settings_id"].iloc[0].split("+")
    assert sorted(ids) == sorted(set(units["settings_id"])) and len(ids) == 2
    # a selection of units by their labels narrows it to one
    assert label(per_model, units, where={"setting": "old"})["settings_id"].iloc[0] in ids
    # several values of a setting column: a comparison of those settings, pooled on purpose
    both = label(per_model, units, where={"setting": ("old", "MEMIT")})["settings_id"].iloc[0]
    assert sorted(both.split("+")) == sorted(ids)
    with pytest.raises(MixedSettingsError):  # two settings under one label
        label(per_model, units.assign(setting="MEMIT"))


def test_csv_text_joins_the_rows_it_was_written_from(tmp_path):
    """A table read back from CSV (a batch size stored as 100.0 read as 100, a setting
    label that looks like a number read as one) is labelled as the table it was written
    from."""
    store = _store(tmp_path, [({**_edit_key(), "alpha": 0.3}, {**_labels("0.3"), "batch_size": 100.0})])
    written = pd.DataFrame({"model": ["tiny"], "setting": ["0.3"], "batch_size": [100.0], "mean": [1.0]})
    path = tmp_path / "table.csv"
    written.to_csv(path, index=False, float_format="%.6g")  # as `intattn run` writes tables
    read = pd.read_csv(path)
    assert read["setting"].dtype != object and read["batch_size"].dtype.kind == "i"
    ids = label(read, unit_settings(store))["settings_id"]
    assert ids.notna().all() and ids.iloc[0] == settings_table(store)["settings_id"].iloc[0]


def test_an_id_never_reads_as_a_number():
    """Hex digits such as ``44e73976`` or ``00123456`` would come back from a CSV as
    numbers; an id skips to the first run of digits that cannot."""
    ids = [settings_id({"n": n}) for n in range(3000)]
    for ident in ids:
        with pytest.raises(ValueError):
            float(ident)
    assert len(set(ids)) == len(ids) and all(len(i) == 8 for i in ids)


def test_a_paired_row_names_its_baselines_settings(tmp_path):
    store = _store(tmp_path, [(_edit_key(0), _labels("MEMIT")),
                              ({**_edit_key(0), "method": "intattn", "alpha": 0.3}, _labels("IntAttn-Edit"))])
    units = unit_settings(store)
    paired = pd.DataFrame({"model": ["tiny"], "dataset": ["zsre"], "setting": ["IntAttn-Edit"],
                           "baseline": ["MEMIT"], "diff": [1.0]})
    out = label(paired, units)
    ids = units.set_index("setting")["settings_id"]
    assert out["settings_id"].iloc[0] == ids["IntAttn-Edit"]
    assert out["baseline_settings_id"].iloc[0] == ids["MEMIT"] != ids["IntAttn-Edit"]


def test_one_edit_has_one_id_whatever_the_shape_of_its_key():
    """The alpha sweep keys an edit's alpha beside hyperparameters without it; the editor
    family keys it inside them, with their type. Same edit, same id."""
    swept = {**_edit_key(), "method": "intattn", "alpha": 0.3}
    del swept["hparams_type"]
    family = {**_edit_key(alpha={"3": 0.3, "4": 0.3}), "method": "intattn"}
    by_layer = {**_edit_key(alpha={3: 0.3, 4: 0.3}), "method": "intattn"}
    assert settings_id(settings_of(swept)) == settings_id(settings_of(family)) == settings_id(settings_of(by_layer))
    assert settings_id(settings_of({**swept, "alpha": 0.4})) != settings_id(settings_of(family))
    assert settings_id(settings_of({**swept, "alpha": {"3": 0.3, "4": 0.0}})) != settings_id(settings_of(family))
    assert settings_id(settings_of({**_edit_key(), "method": "intattn"})) != settings_id(settings_of(family)), \
        "no alpha at all is another edit"


def test_a_figure_names_the_settings_of_the_rows_it_draws():
    """The sweep figure draws the fixed alphas only: the traced alpha's id (a row it leaves
    out) is not written under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from intattn_analysis import plots

    rows = [{"model": "tiny", "dataset": "zsre", "setting": setting, "metric": metric, "mean": 50.0, "ci_low": 40.0,
             "ci_high": 60.0, "n_edits": 10, "settings_id": ident}
            for setting, ident in (("0", "aaaaaaaa"), ("0.5", "bbbbbbbb"), ("traced", "cccccccc"))
            for metric in ("Edit Succ.", "Fluency")]
    fig = plots.plot_sweep_intervals(pd.DataFrame(rows), metrics=("Edit Succ.",))
    note = " ".join(text.get_text() for text in fig.texts)
    plt.close(fig)
    assert "aaaaaaaa" in note and "bbbbbbbb" in note and "cccccccc" not in note, note
