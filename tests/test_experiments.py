"""The experiment runner: its store, intervals, shards, resuming and merging.

The runner's promise is that a killed run restarted, and shards merged, give the same
store as one uninterrupted run. The tests below check it on a tiny random Llama with
hand-made facts, running IntAttn-Edit at two alphas over two batches. Stores are compared
row by row with every value equal (no tolerance): the same process recomputes the same
targets and edits with the same float operations in the same order, so a difference
would be a bug in the runner (a unit computed against the wrong batch, a lost or
duplicated unit), not float noise. The ``seconds`` column is dropped: it times the run.
"""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import intattn_analysis as ia
from intattn_analysis import cli
from intattn_analysis import intervals as stats
from intattn_analysis.experiments import alpha_sweep
from intattn_analysis.experiments.alpha_settings import run_alpha_settings
from intattn_analysis.experiments.units import alpha_label, shard_batches
from intattn_analysis.experiments.store import (ResultStore, StoreError, StoreWarning, check_unique,
                                                compress_store, merge_stores, unit_files, unit_id, unit_of)
from intattn_analysis.hparams import EditHparams

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
    ia.Fact.from_text("w14 w25 w26 w27", "w14", "w42 w43", target_true="w52"),
    ia.Fact.from_text("w15 w16 w28 w29", "w15 w16", "w44", target_true="w53"),
]
SETTINGS = {"0": 0.0, "0.5": 0.5}


# ------------------------------------------------------------------------------ store
def test_store_round_trip_and_key_check(tmp_path):
    store = ResultStore(tmp_path, "demo")
    key = {"model": "m", "batch": 0, "alpha": "0.3"}
    assert not store.has(key, "b0")
    store.write_unit(key, [{"x": 1.0, "y": float("nan")}, {"x": 2.0, "y": 3.0}], "b0", {"batch": 0})
    assert store.has(key, "b0")
    rows = store.rows()
    assert list(rows["x"]) == [1.0, 2.0] and math.isnan(rows["y"][0])
    assert set(rows["batch"]) == {0} and "unit_key" not in rows
    # the file is gzipped JSON lines, readable without the package
    path = store.files()[0]
    assert path.name == f"{unit_id(key, 'b0')}.jsonl.gz"
    assert len(pd.read_json(path, lines=True)) == 2
    # a file whose key differs from the one it is named for is refused
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    first = json.loads(lines[0])
    first["unit_key"]["alpha"] = "0.4"
    path.write_bytes(gzip.compress(("\n".join([json.dumps(first), *lines[1:]]) + "\n").encode()))
    with pytest.raises(StoreError, match="does not hold the unit"):
        store.has(key, "b0")
    path.write_bytes(gzip.compress(b"not json\n"))
    with pytest.raises(StoreError, match="line 1: not JSON"):
        store.rows()
    path.write_bytes(path.read_bytes()[:12])  # a truncated stream
    with pytest.raises(StoreError, match="not a readable unit file"):
        store.rows()
    data = bytearray(gzip.compress(b'{"a": 1}\n' * 50))
    data[10] ^= 0xFF  # the first byte of the deflate stream: zlib.error, not an OSError
    path.write_bytes(bytes(data))
    for read in (store.rows, store.first_rows):
        with pytest.raises(StoreError, match="not a readable unit file"):
            read()


def test_unit_files_are_the_same_bytes_everywhere_and_plain_ones_still_read(tmp_path):
    rows = [{"case_id": "0", "v": 0.25}, {"case_id": "1", "v": 0.5}]
    one, two = ResultStore(tmp_path / "one", "e"), ResultStore(tmp_path / "two", "e")
    assert one.write_unit({"u": 1}, rows, "x").read_bytes() == two.write_unit({"u": 1}, rows, "x").read_bytes()
    # a store written before compression: plain JSON lines, read and found alike
    packed = one.files()[0]
    plain = tmp_path / "old" / "e" / packed.name.removesuffix(".gz")
    plain.parent.mkdir(parents=True)
    plain.write_text(gzip.decompress(packed.read_bytes()).decode())
    old = ResultStore(tmp_path / "old", "e")
    assert old.has({"u": 1}, "x") and old.first_rows() == one.first_rows()
    pd.testing.assert_frame_equal(old.rows(), one.rows())
    assert merge_stores([tmp_path / "old"], tmp_path / "one") == 0  # the same unit, either suffix
    # converted in place: the same rows, the same bytes as a unit written compressed
    assert compress_store(tmp_path / "old") == 1
    assert not plain.exists() and list(unit_files(plain.parent).values()) == [plain.parent / packed.name]
    assert (plain.parent / packed.name).read_bytes() == packed.read_bytes()
    assert compress_store(tmp_path / "old") == 0
    # removing a unit removes every copy of it
    assert old.remove(unit_of(packed)) == [plain.parent / packed.name] and not old.has({"u": 1}, "x")


def test_rows_may_not_use_the_stores_names_and_duplicates_are_named(tmp_path):
    store = ResultStore(tmp_path, "demo")
    with pytest.raises(ValueError, match="unit_key"):
        store.write_unit({"u": 1}, [{"unit_key": 1}], "x")
    store.write_unit({"u": 1}, [{"case_id": "0", "v": 1.0}], "old", {"setting": "traced"})
    store.write_unit({"u": 2}, [{"case_id": "0", "v": 2.0}], "new", {"setting": "traced"})
    with pytest.raises(StoreError, match="same facts under the same setting"):
        check_unique(store.rows(), ["setting", "case_id"])


def test_unit_ids_follow_the_whole_key():
    key = {"a": 1, "b": [1, 2]}
    assert unit_id(key, "x") == unit_id({"b": [1, 2], "a": 1}, "x")
    assert unit_id(key, "x") != unit_id({**key, "a": 2}, "x")
    assert unit_id(key, "b/0 alpha") .startswith("b-0-alpha-")


def test_shards_partition_the_batches():
    for n in (1, 2, 3, 7):
        parts = [shard_batches(10, (i, n)) for i in range(1, n + 1)]
        assert sorted(sum(parts, [])) == list(range(10))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="1 <= i <= n"):
        shard_batches(10, (0, 2))


def test_merge_copies_and_warns_on_a_differing_copy(tmp_path):
    a, b, merged = ResultStore(tmp_path / "a", "e"), ResultStore(tmp_path / "b", "e"), tmp_path / "m"
    a.write_unit({"u": 1}, [{"v": 1.0}], "one")
    b.write_unit({"u": 2}, [{"v": 2.0}], "two")
    b.write_unit({"u": 1}, [{"v": 1.0, "seconds": 9.0}], "one")  # same result, other timing
    assert merge_stores([tmp_path / "a", tmp_path / "b"], merged) == 2
    assert sorted(ResultStore(merged, "e").rows()["v"]) == [1.0, 2.0]
    # reading both roots is reading their merge
    both = ResultStore([tmp_path / "a", tmp_path / "b"], "e").rows()
    assert sorted(both["v"]) == [1.0, 2.0]
    ResultStore(tmp_path / "c", "e").write_unit({"u": 2}, [{"v": 2.5}], "two")
    with pytest.warns(StoreWarning, match="different results"):
        merge_stores([tmp_path / "c"], merged)
    with pytest.raises(StoreError, match="holds no unit files"):
        merge_stores([tmp_path / "a" / "e"], merged)  # an experiment folder, not a root


# ------------------------------------------------------------------------------ stats
def test_mean_interval_covers_the_mean_and_is_seeded():
    values = np.arange(100) % 2  # half ones
    mean, low, high, n = stats.mean_interval(values)
    assert (mean, n) == (0.5, 100)
    # the binomial standard error is 0.05: a 95% interval is about mean -/+ 0.098
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62
    assert stats.mean_interval(values) == (mean, low, high, n)
    assert stats.mean_interval([1.0, float("nan")])[1:] == (pytest.approx(float("nan"), nan_ok=True),) * 2 + (1,)
    # a constant sample has a zero-width interval (to the rounding of a float64 mean)
    assert stats.mean_interval([0.7, 0.7, 0.7])[1:3] == pytest.approx((0.7, 0.7), rel=1e-12)


def test_paired_difference_pairs_by_index():
    base = pd.Series([0.0, 1.0, 0.0, 1.0] * 10, index=range(40))
    better = (base + 0.25).iloc[::-1]  # same facts, other order
    result = stats.paired_difference(better, base)
    assert result["diff"] == pytest.approx(0.25) and result["n_edits"] == 40
    assert result["ci_low"] == pytest.approx(0.25) and result["p_value"] == pytest.approx(1e-4)
    noise = stats.paired_difference(base.sample(frac=1, random_state=0).set_axis(base.index), base)
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p_value"] > 0.05


def test_paired_against_matches_rows_within_each_group():
    """Settings are paired with the baseline on the ``on`` columns inside each group; a
    group without the baseline, and a metric a setting never measured, give no row."""
    rows = []
    for group in ("g1", "g2"):
        for pos in range(4):
            rows.append({"g": group, "setting": "other", "pos": pos, "Edit Succ.": 1.0, "Fluency": np.nan})
            if group == "g1":
                rows.append({"g": group, "setting": "base", "pos": pos, "Edit Succ.": pos % 2, "Fluency": 4.0})
    frame = pd.DataFrame(rows).sample(frac=1, random_state=0)  # pairing must not depend on row order
    paired = stats.paired_against(frame, ["Edit Succ.", "Fluency"], "base", groups=["g"], on=["pos"])
    assert len(paired) == 1
    assert {k: paired[0][k] for k in ("g", "setting", "baseline", "metric", "n_edits")} == {
        "g": "g1", "setting": "other", "baseline": "base", "metric": "Edit Succ.", "n_edits": 4}
    assert paired[0]["diff"] == pytest.approx(50.0)  # percent: 1 - mean(0, 1, 0, 1)


def test_paired_contrasts_pair_only_the_named_settings():
    """A contrast is one setting against another named one (not the common baseline); a
    pair whose settings are not both present gives no row, and a self-pair is refused."""
    frame = pd.DataFrame([{"g": "g1", "setting": s, "pos": pos, "Edit Succ.": value}
                          for pos in range(4)
                          for s, value in (("MEMIT", 0.0), ("with", 1.0), ("without", float(pos % 2)))])
    rows = stats.paired_contrasts(frame, ["Edit Succ."], [("with", "without"), ("with", "absent")],
                                  groups=["g"], on=["pos"])
    assert [(r["setting"], r["baseline"], r["n_edits"]) for r in rows] == [("with", "without", 4)]
    assert rows[0]["diff"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="itself"):
        stats.paired_contrasts(frame, ["Edit Succ."], [("with", "with")], groups=["g"], on=["pos"])


def test_tidy_intervals_report_shares_in_percent():
    frame = pd.DataFrame({"setting": ["a"] * 4, "Edit Succ.": [1, 0, 1, 1.0],
                          "Fluency": [5.0, 5.0, 5.0, 5.0], "Locality": [np.nan] * 4})
    table = stats.tidy_intervals(frame, ["setting"], ["Edit Succ.", "Fluency", "Locality"])
    assert list(table["metric"]) == ["Edit Succ.", "Fluency"]  # no Locality values: no row
    assert table.set_index("metric").loc["Edit Succ.", "mean"] == 75.0
    assert table.set_index("metric").loc["Fluency", "ci_low"] == 5.0


def test_alpha_labels():
    assert alpha_label(0.3) == "0.3" and alpha_label({5: 0.0, 3: 0.125}) == "3:0.125,5:0"


# ---------------------------------------------------------------- resuming and shards
@pytest.fixture(scope="module")
def setting(tiny_llama):
    hp = EditHparams(layers=(1, 2), alpha=0.0, lambda_mlp=4.0, lambda_attn=4.0,
                     n_context_templates=2, context_template_length=3, v_steps=3)
    generator = torch.Generator().manual_seed(0)
    moments = {}
    for module in ("mlp", "attn"):
        for layer in hp.layers:
            d_in = tiny_llama.weight(module, layer).shape[1]
            basis = torch.randn(4 * d_in, d_in, generator=generator)
            moments[(module, layer)] = basis.T @ basis / basis.shape[0]
    return hp, moments


def _run(model, setting, root, **kwargs):
    hp, moments = setting
    return run_alpha_settings(model, [FACTS[:2], FACTS[2:]], SETTINGS, hp, ResultStore(root, "sweep"),
                              dataset="hand", moments=moments, metrics=("knowedit",),
                              progress=False, **kwargs)


def _table(root) -> pd.DataFrame:
    rows = ResultStore(root, "sweep").rows().drop(columns=["seconds"])
    return rows.sort_values(["unit", "position"]).reset_index(drop=True)


def test_killed_run_resumes_to_the_same_store_and_shards_merge(tiny_llama, setting, tmp_path, monkeypatch):
    before = {k: v.clone() for k, v in tiny_llama.hf_model.state_dict().items()}
    assert _run(tiny_llama, setting, tmp_path / "whole") == 2 * (1 + len(SETTINGS))
    whole = _table(tmp_path / "whole")
    assert len(whole) == 2 * 2 * (1 + len(SETTINGS))
    assert set(whole["setting"]) == {"pre-edit", *SETTINGS}
    assert list(whole[whole["setting"] == "0"]["fact_key"]) == [f.key for f in FACTS]
    assert _run(tiny_llama, setting, tmp_path / "whole") == 0  # everything stored: nothing to do

    # a run killed after its third unit, then restarted
    real_write = ResultStore.write_unit
    written = []

    def dying_write(self, *args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(args[-1] if args else None)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ResultStore, "write_unit", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama, setting, tmp_path / "killed")
    monkeypatch.setattr(ResultStore, "write_unit", real_write)
    assert len(ResultStore(tmp_path / "killed", "sweep")) == 3
    assert _run(tiny_llama, setting, tmp_path / "killed") == 3
    pd.testing.assert_frame_equal(_table(tmp_path / "killed"), whole)

    # two shards, each in its own folder, merged
    for i in (1, 2):
        _run(tiny_llama, setting, tmp_path / f"shard{i}", shard=(i, 2))
    assert set(_table(tmp_path / "shard1")["batch"]) == {0}
    merge_stores([tmp_path / "shard1", tmp_path / "shard2"], tmp_path / "merged")
    pd.testing.assert_frame_equal(_table(tmp_path / "merged"), whole)

    # the weights are the model's own after all of it
    for name, value in tiny_llama.hf_model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_sweep_summary_pairs_each_alpha_with_alpha_zero(tiny_llama, setting, tmp_path):
    _run(tiny_llama, setting, tmp_path)
    tables = alpha_sweep.summarise(ResultStore(tmp_path, "sweep"))
    intervals = tables["intervals"]
    assert {"mean", "ci_low", "ci_high", "n_edits"} <= set(intervals.columns)
    assert set(intervals["n_edits"]) <= {4}
    paired = tables["paired"]
    assert set(paired["setting"]) == {"0.5"} and (paired["n_edits"] == 4).all()
    rows = ResultStore(tmp_path, "sweep").rows()
    edit = rows[rows["setting"] == "0.5"]["Edit Succ."].mean() - rows[rows["setting"] == "0"]["Edit Succ."].mean()
    assert paired.set_index("metric").loc["Edit Succ.", "diff"] == pytest.approx(100 * edit)
    assert set(tables["range"]["best_alpha"]) <= {0.0, 0.5}


def test_run_command_checks_its_arguments_first(capsys):
    assert cli.main(["run", "no-such-experiment"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert cli.main(["run", "alpha-sweep", "--shard", "3/2"]) == 2
    assert "1 <= I <= N" in capsys.readouterr().err
    assert cli.main(["run", "alpha-sweep", "--scale", "huge"]) == 2
    assert "--scale must be one of" in capsys.readouterr().err


def test_best_range_keeps_the_alphas_not_worse_than_the_best(tmp_path):
    store = ResultStore(tmp_path, "sweep")
    rng = np.random.default_rng(0)
    level = {"0": 0.8, "0.5": 0.8, "1": 0.2}
    for setting, mean in level.items():
        values = np.clip(mean + rng.normal(0, 0.05, 60), 0, 1)
        rows = [{"position": i, "Edit Succ.": v, "Rephrase": v, "Locality": v} for i, v in enumerate(values)]
        store.write_unit({"s": setting}, rows, setting,
                         {"model": "m", "dataset": "d", "batch": 0, "setting": setting, "alpha": setting})
    ranges = alpha_sweep.best_range(store).iloc[0]
    assert ranges["best_alpha"] in (0.0, 0.5)
    assert (ranges["range_low"], ranges["range_high"]) == (0.0, 0.5)
    assert ranges["alphas_in_range"] == "0, 0.5"


def test_the_sweep_splits_by_protocol_and_states_claim_three_per_protocol(tmp_path):
    """Teacher-forced and generation rows of the same edits are summarised apart: the
    best range, the paired differences (Holm-adjusted within each protocol) and the
    claim-3 verdict each come once per protocol, and a setting that is better on every
    criterion metric under one protocol only beats the baseline under that one."""
    store = ResultStore(tmp_path, "sweep")
    rng = np.random.default_rng(1)
    levels = {("teacher-forced", "0"): 0.5, ("teacher-forced", "0.5"): 0.8,
              ("generation", "0"): 0.3, ("generation", "0.5"): 0.3}
    for (protocol, setting), mean in levels.items():
        values = np.clip(mean + rng.normal(0, 0.05, 80), 0, 1)
        rows = [{"position": i, "Edit Succ.": v, "Rephrase": v, "Locality": v} for i, v in enumerate(values)]
        labels = {"model": "m", "dataset": "d", "batch": 0, "setting": setting, "alpha": setting}
        if protocol == "generation":
            labels["protocol"] = protocol
        store.write_unit({"s": setting, "p": protocol}, rows, f"{setting}-{protocol}", labels)
    tables = alpha_sweep.summarise(store)
    assert set(tables["intervals"]["protocol"]) == {"teacher-forced", "generation"}
    ranges = tables["range"].set_index("protocol")
    assert ranges.loc["teacher-forced", "alphas_in_range"] == "0.5"
    assert ranges.loc["generation", "alphas_in_range"] == "0, 0.5"
    assert tables["paired"].groupby("protocol").size().to_dict() == {"teacher-forced": 3, "generation": 3}
    assert (tables["paired"]["p_holm"] >= tables["paired"]["p_value"]).all()
    claim = tables["claim"].set_index("protocol")
    assert bool(claim.loc["teacher-forced", "beats"]) and not bool(claim.loc["generation", "beats"])
    assert claim.loc["teacher-forced", "better_on"] == "Edit Succ., Rephrase, Locality"
    assert claim.loc["generation", "better_on"] == "" and claim.loc["generation", "worse_on"] == ""


def test_run_command_writes_the_tables_of_a_store(tmp_path, capsys):
    store = ResultStore(tmp_path / "store", "alpha-sweep")
    for setting, value in (("pre-edit", 0.2), ("0", 0.9), ("0.5", 0.7)):
        rows = [{"position": i, "Edit Succ.": value, "Locality": None if setting == "pre-edit" else 0.5}
                for i in range(3)]
        store.write_unit({"s": setting}, rows, setting,
                         {"model": "m", "dataset": "d", "batch": 0, "setting": setting,
                          "alpha": None if setting == "pre-edit" else setting})
    assert cli.main(["run", "alpha-sweep", "--tables-only", "--out", str(tmp_path / "store"),
                     "--tables", str(tmp_path / "tables")]) == 0
    table = pd.read_csv(tmp_path / "tables" / "alpha_sweep.csv", dtype={"setting": str})
    assert list(table.columns) == ["model", "dataset", "protocol", "setting", "alpha", "metric", "mean", "ci_low",
                                   "ci_high", "n_edits", "settings_id"]
    listed = pd.read_csv(tmp_path / "tables" / "alpha_sweep_settings.csv")
    assert set(table["settings_id"]) <= set(listed["settings_id"]), "a row names settings the table does not list"
    assert table.set_index(["setting", "metric"]).loc[("0", "Edit Succ."), "mean"] == pytest.approx(90.0)
    paired = pd.read_csv(tmp_path / "tables" / "alpha_sweep_paired.csv", dtype={"setting": str})
    assert paired.set_index("metric").loc["Edit Succ.", "diff"] == pytest.approx(-20.0)
    assert "alpha-sweep: range" in capsys.readouterr().out


def test_severed_drops_give_estimator_c(tmp_path):
    """Estimator (c) from stored severed traces: the drop of the residual AIE per layer when
    a path is severed, shared out as a balance factor (hand-computed values)."""
    from intattn_analysis.experiments import localization
    from intattn_analysis.tracing import COLUMNS

    store = ResultStore(tmp_path, localization.NAME)
    # residual IE per (variant, layer), the same for both facts
    ie = {"severed-none": [0.6, 0.5, 0.4], "severed-mlp": [0.3, 0.4, 0.4], "severed-attn": [0.5, 0.5, 0.5]}
    for variant, values in ie.items():
        rows = [dict(zip(COLUMNS, (fact, "s", "resid", 1, "x", "subject_last", layer, 0.9, 0.1,
                                   0.1 + v, v, variant.split("-")[1])))
                for fact in ("f1", "f2") for layer, v in enumerate(values)]
        store.write_unit({"v": variant}, rows, variant,
                         {"model": "m", "variant": variant, "chunk": 0, "window": 1, "samples": 1})
    drops = localization.severed_drops(localization.traces(store, "m")).set_index("layer")
    assert list(drops["drop_mlp"].round(12)) == [0.3, 0.1, 0.0]
    assert list(drops["drop_attn"].round(12)) == [0.1, 0.0, -0.1]
    frame = pd.DataFrame([{"layer": l, "module": m, "aie": drops.loc[l, f"drop_{m}"]}
                          for l in (0, 1) for m in ("attn", "mlp")])
    alphas = ia.balance(frame, [0, 1])
    assert alphas[0] == pytest.approx(0.25) and alphas[1] == pytest.approx(0.0)


def test_estimators_name_the_missing_localization_run(tmp_path):
    from intattn_analysis.experiments import estimators
    from intattn_analysis.experiments.store import MissingResultsError

    class Named:
        name = "m"

    with pytest.raises(MissingResultsError, match="intattn run localization --model m"):
        estimators.traced_alphas(tmp_path, Named(), [1, 2])


# ------------------------------------------------------------------------------ editors
def _killed_after(units: int, run, monkeypatch) -> None:
    """Call ``run`` with a store that dies (``KeyboardInterrupt``) when asked to write its
    ``units + 1``-th unit, as a killed process would; the store is whole again after."""
    real_write = ResultStore.write_unit
    written = []

    def dying_write(self, *args, **kwargs):
        if len(written) == units:
            raise KeyboardInterrupt
        written.append(1)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ResultStore, "write_unit", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ResultStore, "write_unit", real_write)


def test_editors_experiment_resumes_and_pairs_every_method_with_memit(tiny_llama, setting, tmp_path, monkeypatch):
    """Every method of the family on the same batch, one unit each; a killed run resumes
    to the same store, and the summary pairs each method with MEMIT on the same facts."""
    from intattn_analysis.experiments import editors
    from intattn_analysis.hparams import FTHparams, PMETHparams, RomeHparams

    hp, moments = setting
    short = dict(n_context_templates=hp.n_context_templates, context_template_length=hp.context_template_length,
                 v_steps=hp.v_steps)
    settings = {
        "MEMIT": ("memit", hp.replace(alpha=0.0)),
        "IntAttn-Edit+NS": ("intattn", hp.replace(alpha=0.5, projection="null_space", nullspace_threshold=1.0)),
        "ROME": ("rome", RomeHparams(layers=(hp.layers[0],), **short)),
        "PMET": ("pmet", PMETHparams(layers=hp.layers, lambda_mlp=hp.lambda_mlp, **short)),
        "FT-M": ("ft-m", FTHparams(layers=(1,), objective="target_new", steps=2, norm_constraint=None)),
    }

    def run(root):
        return editors.run_methods(tiny_llama, [FACTS[:2]], settings, ResultStore(root, editors.NAME),
                                   dataset="hand", moments=moments, metrics=("knowedit",), progress=False)

    def table(root):
        rows = ResultStore(root, editors.NAME).rows().drop(columns=["seconds", "edit_seconds"])
        return rows.sort_values(["unit", "position"]).reset_index(drop=True)

    assert run(tmp_path / "whole") == 1 + len(settings)
    assert run(tmp_path / "whole") == 0
    whole = table(tmp_path / "whole")
    assert set(whole["setting"]) == {"pre-edit", *settings}
    _killed_after(2, lambda: run(tmp_path / "killed"), monkeypatch)
    assert run(tmp_path / "killed") == len(settings) - 1
    pd.testing.assert_frame_equal(table(tmp_path / "killed"), whole)
    summary = editors.summarise(ResultStore(tmp_path / "whole", editors.NAME))
    paired = summary["paired"]
    assert set(paired["setting"]) == set(settings) - {"MEMIT"}
    assert (paired["n_edits"] == 2).all() and set(paired["baseline"]) == {"MEMIT"}
    assert set(summary["intervals"]["setting"]) == {"pre-edit", *settings}


def test_each_alone_rows_edit_each_fact_on_the_unedited_model(tiny_llama, setting, tmp_path):
    """``ROME, each alone``: each fact's row is what editing that fact alone on the
    unedited model and evaluating it gives, and the weights are unchanged after the run.
    Tolerance: the row's pre-edit values come from the batch's evaluation, which pads
    the facts together; float32 rounding of a padded forward moves probabilities by
    ~1e-7, so probabilities are compared to 1e-5 and accuracies exactly."""
    from intattn_analysis.experiments import editors
    from intattn_analysis.experiments.units import fact_rows
    from intattn_analysis.hparams import RomeHparams

    hp, moments = setting
    rome = RomeHparams(layers=(hp.layers[0],), n_context_templates=hp.n_context_templates,
                       context_template_length=hp.context_template_length, v_steps=hp.v_steps)
    before = {name: w.detach().clone() for name, w in tiny_llama.hf_model.named_parameters()}
    store = ResultStore(tmp_path, editors.NAME)
    metrics = ("knowedit", "residue")
    editors.run_methods(tiny_llama, [FACTS[:2]], {"ROME, each alone": ("rome", rome)}, store, dataset="hand",
                        moments=moments, metrics=metrics, progress=False)
    for name, w in tiny_llama.hf_model.named_parameters():
        assert torch.equal(w, before[name]), name
    rows = store.rows()
    alone = rows[rows["setting"] == "ROME, each alone"].sort_values("position").reset_index(drop=True)
    assert list(alone["position"]) == [0, 1]
    for i, fact in enumerate(FACTS[:2]):
        pre = ia.evaluate(tiny_llama, [fact], metrics=metrics, progress=False)
        with ia.edit(tiny_llama, [fact], method="rome", hparams=rome, moments=moments, progress=False):
            post = ia.evaluate(tiny_llama, [fact], pre=pre, metrics=metrics, progress=False)
        expected = fact_rows(post)[0]
        for column in ("Edit Succ.", "Rephrase", "Locality", "Residue old top-1 pre", "Residue old top-1 post"):
            got, want = alone.loc[i, column], expected[column]
            assert got == want or (pd.isna(got) and pd.isna(want)), (column, got, want)
        for column in ("p_new", "p_true", "Residue p(true) pre", "Residue p(true) post"):
            assert alone.loc[i, column] == pytest.approx(expected[column], abs=1e-5, nan_ok=True), column


def test_a_selected_evaluation_is_the_evaluation_of_those_facts(tiny_llama):
    """``Evaluation.select`` keeps the chosen facts' rows, answers (renumbered), probes and
    pre-edit predictions, and serves as ``pre`` for those facts alone."""
    facts = FACTS[:3]
    whole = ia.evaluate(tiny_llama, facts, metrics=("knowedit", "residue"), progress=False)
    part = whole.select([2, 0])
    assert list(part.per_fact["key"]) == [facts[2].key, facts[0].key]
    assert part.fingerprints == [whole.fingerprints[2], whole.fingerprints[0]]
    assert part.locality_predictions == [whole.locality_predictions[2], whole.locality_predictions[0]]
    assert set(part.answers["fact"]) == {0, 1}
    assert (part.answers[part.answers["fact"] == 0]["prompt"].tolist()
            == whole.answers[whole.answers["fact"] == 2]["prompt"].tolist())
    assert part.summary["Edit Succ."] == pytest.approx(whole.per_fact["Edit Succ."].iloc[[2, 0]].mean())
    ia.evaluate(tiny_llama, [facts[2], facts[0]], pre=part, metrics=("knowedit", "residue"), progress=False)
    with pytest.raises(ValueError, match="positions"):
        whole.select([3])


def test_sequential_experiment_resumes_with_the_edits_replayed(tiny_llama, setting, tmp_path, monkeypatch):
    """Rounds of edits on one model: each (method, round) is a unit; a run killed after
    its second unit resumes (the stored rounds are applied again, not evaluated) to the
    same store, and the weights are restored after every sequence."""
    from intattn_analysis.experiments import sequential

    hp, moments = setting
    settings = {"MEMIT": ("memit", hp.replace(alpha=0.0)),
                "AlphaEdit": ("alphaedit", hp.replace(alpha=0.0, projection="null_space", nullspace_threshold=1.0))}
    rounds = [FACTS[:1], FACTS[1:2], FACTS[2:3]]
    before = {k: v.clone() for k, v in tiny_llama.hf_model.state_dict().items()}

    def run(root):
        return sequential.run_sequences(tiny_llama, rounds, settings, ResultStore(root, sequential.NAME),
                                        dataset="hand", moments=moments, fluency_rounds=(3,),
                                        fluency_tokens=4, progress=False)

    def table(root):
        rows = ResultStore(root, sequential.NAME).rows().drop(columns=["seconds", "edit_seconds"])
        return rows.sort_values(["unit", "kind", "edited_in", "position"]).reset_index(drop=True)

    assert run(tmp_path / "whole") == 6
    assert run(tmp_path / "whole") == 0
    whole = table(tmp_path / "whole")
    last = whole[(whole["setting"] == "MEMIT") & (whole["round"] == 3)]
    assert sorted(last["edited_in"]) == [1, 2, 3] and last["Fluency"].notna().all()
    _killed_after(2, lambda: run(tmp_path / "killed"), monkeypatch)
    assert tiny_llama.open_edits == 0
    assert run(tmp_path / "killed") == 4
    pd.testing.assert_frame_equal(table(tmp_path / "killed"), whole)
    after = tiny_llama.hf_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    tables = sequential.summarise(ResultStore(tmp_path / "whole", sequential.NAME))
    summary = tables["intervals"]
    edit_succ = summary[(summary["metric"] == "Edit Succ.") & (summary["setting"] == "MEMIT")]
    assert list(edit_succ["round"]) == [1, 2, 3] and list(edit_succ["n_edits"]) == [1, 2, 3]
    # paired against MEMIT on the same edits after the same round: the mean difference is
    # the difference of the two settings' means over those edits
    paired = tables["paired"]
    assert set(paired["setting"]) == {"AlphaEdit"} and set(paired["baseline"]) == {"MEMIT"}
    last = paired[(paired["round"] == 3) & (paired["metric"] == "Edit Succ.")].iloc[0]
    means = summary[(summary["round"] == 3) & (summary["metric"] == "Edit Succ.")].set_index("setting")["mean"]
    assert last["n_edits"] == 3
    assert last["diff"] == pytest.approx(means["AlphaEdit"] - means["MEMIT"], abs=1e-9)
    # no IntAttn-Edit+NS row here: the default contrasts give an empty table; a named one
    # is the same pairing the other way round
    assert tables["contrasts"].empty
    swapped = sequential.summarise(ResultStore(tmp_path / "whole", sequential.NAME),
                                   contrasts=[("MEMIT", "AlphaEdit")])["contrasts"]
    back = swapped[(swapped["round"] == 3) & (swapped["metric"] == "Edit Succ.")].iloc[0]
    assert (back["setting"], back["baseline"], back["n_edits"]) == ("MEMIT", "AlphaEdit", 3)
    assert back["diff"] == pytest.approx(-last["diff"], abs=1e-9)


def test_an_estimators_mean_alpha_on_the_range_bound_is_inside(tmp_path):
    """Per-layer alphas of 0.1 average to 0.10000000000000002; the sweep's best range
    {0, 0.1} must still hold them (float rounding is not a verdict)."""
    from intattn_analysis.experiments import estimators

    sweep, est = ResultStore(tmp_path / "s", alpha_sweep.NAME), ResultStore(tmp_path / "e", estimators.NAME)
    labels = {"model": "m", "dataset": "d", "batch": 0}
    good = [{"position": i, "fact_key": str(i), "Edit Succ.": 1.0, "Rephrase": 1.0, "Locality": 1.0}
            for i in range(20)]
    bad = [{**row, "Edit Succ.": 0.0, "Rephrase": 0.0} for row in good]
    for name, rows in (("0", good), ("0.1", good), ("0.5", bad)):
        sweep.write_unit({"s": name}, rows, name, {**labels, "setting": name, "alpha": name})
    for name, alpha in (("memit", "0"), ("e-train", "3:0.1,4:0.1,5:0.1"), ("d-activation", "3:0.3,4:0.3,5:0.3")):
        est.write_unit({"e": name}, good, name, {**labels, "setting": name, "alpha": alpha, "split": "test"})
    ranges = estimators.summarise(est, sweep)["range"].set_index("estimator")
    assert ranges.loc["e-train", "mean_alpha"] != 0.1  # the rounding this test is about
    assert bool(ranges.loc["e-train", "inside"]) and bool(ranges.loc["memit", "inside"])
    assert not bool(ranges.loc["d-activation", "inside"])


def test_batch_scaling_writes_each_size_and_pairs_sizes_on_the_same_facts(tiny_llama, setting, tmp_path,
                                                                         monkeypatch):
    """Sizes 1 and 2 on the same 2 facts: each (size, batch, method) is a unit (a killed
    run resumes to the same store); size 1 is each fact edited alone, which is what the
    ``editors`` experiment gives for a batch of that one fact; the ``scaling`` table pairs
    size 2 with size 1 on the same facts and its mean difference is the difference of the
    two sizes' means."""
    from intattn_analysis.experiments import batch_scaling, editors

    hp, moments = setting
    settings = {"MEMIT": ("memit", hp.replace(alpha=0.0)),
                "IntAttn-Edit, train alpha": ("intattn", hp.replace(alpha=0.5))}
    scale = batch_scaling.ScalingScale(sizes=(1, 2), n_facts=2, methods=tuple(settings), metrics=("knowedit",))
    assert scale.n_batches(1) == 2 and scale.n_batches(2) == 1
    with pytest.raises(ValueError, match="increasing"):
        batch_scaling.ScalingScale(sizes=(2, 1), n_facts=2)

    def run(root):
        return batch_scaling.run_sizes(tiny_llama, FACTS, scale, settings, ResultStore(root, batch_scaling.NAME),
                                       dataset="hand", moments=moments, progress=False)

    def table(root):
        rows = ResultStore(root, batch_scaling.NAME).rows().drop(columns=["seconds", "edit_seconds"])
        return rows.sort_values(["unit", "position"]).reset_index(drop=True)

    assert run(tmp_path / "whole") == 2 * 3 + 3  # size 1: 2 batches, size 2: 1; pre-edit + 2 methods each
    assert run(tmp_path / "whole") == 0
    whole = table(tmp_path / "whole")
    _killed_after(4, lambda: run(tmp_path / "killed"), monkeypatch)
    assert run(tmp_path / "killed") == 5
    pd.testing.assert_frame_equal(table(tmp_path / "killed"), whole)

    # size 1 is the editors experiment on a batch of that one fact
    single = editors.run_methods(tiny_llama, [FACTS[1:2]], settings, ResultStore(tmp_path / "one", editors.NAME),
                                 dataset="hand", moments=moments, metrics=("knowedit",), progress=False)
    assert single == 3
    one = ResultStore(tmp_path / "one", editors.NAME).rows()
    mine = whole[(whole["batch_size"] == 1) & (whole["batch"] == 1)]
    for name in settings:
        a, b = one[one["setting"] == name].iloc[0], mine[mine["setting"] == name].iloc[0]
        assert a["fact_key"] == b["fact_key"] == FACTS[1].key
        for column in ("Edit Succ.", "Rephrase", "Locality", "p_new"):
            assert a[column] == b[column] or (pd.isna(a[column]) and pd.isna(b[column])), (name, column)

    tables = batch_scaling.summarise(ResultStore(tmp_path / "whole", batch_scaling.NAME))
    assert set(tables["intervals"]["batch_size"]) == {1, 2}
    assert set(tables["paired"]["setting"]) == {"IntAttn-Edit, train alpha"}
    assert tables["contrasts"].empty  # no IntAttn-Edit+NS row in this run
    named = batch_scaling.summarise(ResultStore(tmp_path / "whole", batch_scaling.NAME),
                                    contrasts=[("IntAttn-Edit, train alpha", "MEMIT")])["contrasts"]
    pd.testing.assert_frame_equal(named, tables["paired"])  # the same pairing, asked by name
    scaling = tables["scaling"]
    assert set(scaling["batch_size"]) == {2} and set(scaling["baseline_size"]) == {1}
    assert set(scaling["setting"]) == set(settings) and (scaling["n_edits"] == 2).all()
    edited = whole[whole["setting"] == "MEMIT"]
    row = scaling[(scaling["setting"] == "MEMIT") & (scaling["metric"] == "Edit Succ.")].iloc[0]
    means = edited.groupby("batch_size")["Edit Succ."].mean()
    assert row["diff"] == pytest.approx(100 * (means[2] - means[1]), abs=1e-9)



def test_batch_scaling_replicates_a_size_on_disjoint_batches(tmp_path):
    """Two batches of 2 beside a population of 2 facts every size evaluated: size 2 is
    replicated. The ``replication`` table pairs each method with MEMIT within each batch
    and over both, under one Holm family; the sizes that merely cover the population
    (size 1: two batches of one fact) are not replications."""
    from intattn_analysis.experiments import batch_scaling

    scale = batch_scaling.ScalingScale(sizes=(1, 2), n_facts=2, replicates=((2, 2),))
    assert scale.n_batches(1) == 2 and scale.n_batches(2) == 2
    with pytest.raises(ValueError, match="replicates"):
        batch_scaling.ScalingScale(sizes=(1, 2), n_facts=2, replicates=((3, 2),))
    store = ResultStore(tmp_path, batch_scaling.NAME)
    # Edit Succ. per (setting, fact): IntAttn-Edit wins on batch 0 of size 2, loses on batch 1
    succ = {"MEMIT": [1.0, 0.0, 1.0, 1.0], "IntAttn-Edit": [1.0, 1.0, 0.0, 0.0], "pre-edit": [0.0] * 4}
    for size, batches in ((1, [[0], [1]]), (2, [[0, 1], [2, 3]])):
        for b, facts in enumerate(batches):
            for setting, values in succ.items():
                rows = [{"position": i, "fact_key": f"f{f}", "Edit Succ.": values[f], "Locality": 1.0,
                         "seconds": 1.0, "edit_seconds": 0.5} for i, f in enumerate(facts)]
                store.write_unit({"size": size, "batch": b, "setting": setting}, rows, f"s{size}-b{b}-{setting}",
                                 {"model": "m", "dataset": "d", "batch_size": size, "batch": b, "setting": setting})
    tables = batch_scaling.summarise(store)
    replication = tables["replication"]
    assert set(replication["batch_size"]) == {2} and set(replication["setting"]) == {"IntAttn-Edit"}
    succ_rows = replication[replication["metric"] == "Edit Succ."].set_index("batch")
    assert succ_rows.loc["0", "diff"] == pytest.approx(50.0) and succ_rows.loc["1", "diff"] == pytest.approx(-100.0)
    assert succ_rows.loc["all", "diff"] == pytest.approx(-25.0) and succ_rows.loc["all", "n_edits"] == 4
    assert (replication["p_holm"] >= replication["p_value"]).all()
    # the pooled comparison at size 2 is the paired table's, over both batches
    paired = tables["paired"]
    pooled = paired[(paired["batch_size"] == 2) & (paired["metric"] == "Edit Succ.")].iloc[0]
    assert pooled["diff"] == pytest.approx(-25.0) and pooled["n_edits"] == 4
    # the curve's population is still the 2 facts every size evaluated
    curve = tables["intervals"]
    assert (curve[curve["batch_size"] == 2]["n_edits"] == 2).all()
    # the scaling page states it batch by batch and pooled, and says when it is missing
    from intattn_analysis.report import _replication_lines

    said = "\n".join(_replication_lines(replication, "m", "d", "teacher-forced"))
    assert "on 2 disjoint batches" in said and "batch 0 (2 facts)" in said and "pooled (4 facts)" in said
    assert "Not replicated yet" in _replication_lines(replication.iloc[:0], "m", "d", "teacher-forced")[0]


ALIASED = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50",
                      paraphrases=["w33 {} w21"], portability=[("w34 w35 w21", "w40", "Subject_Aliasing"),
                                                                    ("w36 w10 w11", "w45", "Reasoning")],
                      locality=[("w37 w38 w39", "w46")]),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
]


def test_outdated_experiment_measures_the_old_answer_on_each_model_state(tiny_llama, setting, tmp_path,
                                                                         monkeypatch):
    """Survival and trace units for the unedited model and each method: a killed run
    resumes to the same store; each unit is what its functions give on the model in that
    state (the edit written, then restored); the summary pairs methods with MEMIT and
    edited traces with the unedited one on the same facts."""
    from intattn_analysis.experiments import outdated

    hp, moments = setting
    settings = {"MEMIT": ("memit", hp.replace(alpha=0.0)),
                "IntAttn-Edit, train alpha": ("intattn", hp.replace(alpha=0.5))}
    facts = ALIASED

    def run(root):
        return outdated.run_batches(tiny_llama, [facts], settings, ResultStore(root, outdated.NAME), dataset="hand",
                                    n_traced=1, samples=2, moments=moments, progress=False)

    def table(root):
        rows = ResultStore(root, outdated.NAME).rows().drop(columns=["seconds"])
        return rows.sort_values(["unit", "position", "module", "token_class"], na_position="first"
                                ).reset_index(drop=True)

    # every evaluation without a reference (the unedited model's own) runs on unedited weights
    real_evaluate, calls = outdated.evaluate, []

    def watched(model, facts, pre=None, **kwargs):
        calls.append((pre is None, model.open_edits))
        return real_evaluate(model, facts, pre=pre, **kwargs)

    monkeypatch.setattr(outdated, "evaluate", watched)
    assert run(tmp_path / "whole") == 2 * 3
    monkeypatch.setattr(outdated, "evaluate", real_evaluate)
    assert {edits for unreferenced, edits in calls if unreferenced} == {0}
    assert {edits for unreferenced, edits in calls if not unreferenced} == {1}  # each method's, edited
    assert run(tmp_path / "whole") == 0
    whole = table(tmp_path / "whole")
    _killed_after(3, lambda: run(tmp_path / "killed"), monkeypatch)
    assert run(tmp_path / "killed") == 3
    pd.testing.assert_frame_equal(table(tmp_path / "killed"), whole)

    survival = whole[whole["part"] == "survival"].set_index(["setting", "position"])
    expected = {"pre-edit": outdated.survival_rows(tiny_llama, facts)}
    with ia.edit(tiny_llama, facts, method="memit", hparams=settings["MEMIT"][1], moments=moments, progress=False):
        expected["MEMIT"] = outdated.survival_rows(tiny_llama, facts)
        traced_memit = outdated.trace_rows(tiny_llama, facts[:1], samples=2)
    pre = ia.evaluate(tiny_llama, facts, metrics=("knowedit",), progress=False)
    with ia.edit(tiny_llama, facts, method="memit", hparams=settings["MEMIT"][1], moments=moments, progress=False):
        post = ia.evaluate(tiny_llama, facts, pre=pre, metrics=("knowedit",), progress=False).per_fact
    same = lambda a, b: a == b or (pd.isna(a) and pd.isna(b))
    for i in range(len(facts)):
        for metric in ("Edit Succ.", "Rephrase", "Locality"):
            assert same(survival.loc[("MEMIT", i), metric], post.iloc[i][metric]), (i, metric)
        assert survival.loc[("pre-edit", i), "Edit Succ."] == pre.per_fact.iloc[i]["Edit Succ."]
        assert pd.isna(survival.loc[("pre-edit", i), "Locality"])  # no pre-edit model to compare with
    assert not pd.isna(survival.loc[("MEMIT", 0), "Locality"])  # the first fact has a locality probe
    for name, rows in expected.items():
        for row in rows:
            for metric in outdated.SURVIVAL_METRICS:
                got, want = survival.loc[(name, row["position"]), metric], row[metric]
                assert got == want or (math.isnan(got) and math.isnan(want)), (name, metric)
    # the control names the other fact's old answer (w51 for the first, w50 for the second)
    assert outdated.distractors(facts) == ["w51", "w50"]
    assert not math.isnan(first_control := survival.loc[("pre-edit", 0), "Control copy top-1"])
    assert first_control in (0.0, 1.0)
    # the first fact has one paraphrase and one alias probe; the second has neither
    first, second = survival.loc[("pre-edit", 0)], survival.loc[("pre-edit", 1)]
    assert not math.isnan(first["Old p/alias"]) and math.isnan(second["Old p/alias"])
    assert math.isnan(second["Old p/paraphrase"])
    # the old answer's top-1 is its rank 0 (log10(1 + 0) = 0)
    for metric in ("prompt", "paraphrase"):
        assert first[f"Old top-1/{metric}"] == float(first[f"Old log rank/{metric}"] == 0)
    # an edit moves p(target_true): the unit is not the unedited model's
    assert survival.loc[("MEMIT", 0), "Old p/prompt"] != survival.loc[("pre-edit", 0), "Old p/prompt"]

    traced = whole[whole["part"] == "trace"]
    assert set(traced["position"]) == {0}
    assert {(m, t) for m, t in zip(traced["module"], traced["token_class"])} == {
        (m, t) for m in outdated.TRACE_KINDS for t in outdated.TRACE_TOKENS}
    memit = traced[traced["setting"] == "MEMIT"].set_index(["module", "token_class"])
    for row in traced_memit:
        assert memit.loc[(row["module"], row["token_class"]), "ie"] == row["ie"]
        assert len(row["ie"]) == tiny_llama.n_layers

    tables = outdated.summarise(ResultStore(tmp_path / "whole", outdated.NAME))
    assert set(tables["intervals"]["setting"]) == {"pre-edit", *settings}
    assert set(tables["paired"]["setting"]) == {"IntAttn-Edit, train alpha"}
    aie = tables["aie"]
    assert set(aie["layer"]) == set(range(tiny_llama.n_layers)) and (aie["n_edits"] == 1).all()
    paired_layers = tables["aie_paired"]
    assert set(paired_layers["baseline"]) == {"pre-edit", "MEMIT"}
    one = paired_layers[(paired_layers["baseline"] == "pre-edit") & (paired_layers["setting"] == "MEMIT")
                        & (paired_layers["module"] == "mlp") & (paired_layers["token_class"] == "last")
                        & (paired_layers["layer"] == 1)].iloc[0]
    ie = lambda name: traced[(traced["setting"] == name) & (traced["module"] == "mlp")
                             & (traced["token_class"] == "last")]["ie"].iloc[0][1]
    assert one["diff"] == pytest.approx(ie("MEMIT") - ie("pre-edit"), abs=1e-12)
    flow = tables["flow"].set_index(["setting", "module", "token_class"])
    mean = lambda name, m, t: float(np.mean(traced[(traced["setting"] == name) & (traced["module"] == m)
                                                   & (traced["token_class"] == t)]["ie"].iloc[0]))
    for m in outdated.TRACE_KINDS:
        for t in outdated.TRACE_TOKENS:
            assert flow.loc[("MEMIT", m, t), "mean"] == pytest.approx(mean("MEMIT", m, t), abs=1e-12)
            assert flow.loc[("MEMIT", m, t), "diff_pre"] == pytest.approx(
                mean("MEMIT", m, t) - mean("pre-edit", m, t), abs=1e-12)
            assert math.isnan(flow.loc[("pre-edit", m, t), "diff_pre"])


def test_a_trace_of_every_fact_keeps_those_the_model_does_not_answer(tiny_llama):
    """``answered_only=False`` traces facts whose old answer is not the model's top-1
    (after an edit, the facts it was written over); a fact the model does answer gets the
    same rows either way."""
    from intattn_analysis.predictions import first_answer_token, next_token_probs

    top = tiny_llama.tokenizer.decode([int(next_token_probs(tiny_llama, FACTS[0].text).argmax())]).strip()
    answered = ia.Fact.from_text(FACTS[0].text, FACTS[0].subject, "w40", target_true=top)
    assert first_answer_token(tiny_llama, top) == int(next_token_probs(tiny_llama, FACTS[0].text).argmax())
    unanswered = [f for f in FACTS[1:] if int(next_token_probs(tiny_llama, f.text).argmax())
                  != first_answer_token(tiny_llama, f.target_true)]
    assert unanswered  # a random model answers next to nothing
    facts = [answered, *unanswered]
    kwargs = dict(kinds=("mlp",), tokens=("last",), window=1, samples=2, progress=False)
    every = ia.trace(tiny_llama, facts, answered_only=False, **kwargs)
    assert every.n_facts == len(facts) and every.n_skipped == 0
    assert every.settings["answered_only"] is False
    only = ia.trace(tiny_llama, facts, **kwargs)
    assert only.n_facts == 1 and only.n_skipped == len(unanswered) and "answered_only" not in only.settings
    mine = every.table[every.table["fact"] == answered.key].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, only.table.reset_index(drop=True))


def test_metrics_by_relation_pool_small_relations_and_pair_within_each():
    """Relations with fewer than ``min_facts`` facts are pooled as ``other``; each
    method is paired with the baseline on the same facts within a relation; the unedited
    model is reported but not paired; a fact without a label is an error."""
    from intattn_analysis.experiments.relations import OTHER, by_relation, relation_labels

    facts = [ia.Fact.from_text(f"w1{i} w20 w21", f"w1{i}", "w40", target_true="w50", relation="big")
             for i in range(6)]
    facts += [ia.Fact.from_text("w30 w22", "w30", "w41", target_true="w51")]  # no relation: its template
    labels = relation_labels(facts)
    assert labels[facts[0].key] == "big" and labels[facts[-1].key] == "{} w22"
    rows = []
    for setting, shift in (("pre-edit", 0.0), ("MEMIT", 0.5), ("IntAttn-Edit", 0.75)):
        for i, fact in enumerate(facts):
            rows.append({"model": "m", "dataset": "d", "setting": setting, "batch": 0, "position": i,
                         "fact_key": fact.key, "Edit Succ.": min(1.0, shift + (i % 2) * 0.25)})
    frame = pd.DataFrame(rows)
    out = by_relation(frame, labels, ["Edit Succ."], min_facts=5)
    assert set(out["intervals"]["relation"]) == {"big", OTHER}
    big = out["intervals"][(out["intervals"]["relation"] == "big")].set_index("setting")
    assert big.loc["MEMIT", "n_edits"] == 6 and big.loc["MEMIT", "mean"] == pytest.approx(100 * (0.5 + 0.125))
    paired = out["paired"].set_index("relation")
    assert set(out["paired"]["setting"]) == {"IntAttn-Edit"}
    assert paired.loc["big", "diff"] == pytest.approx(100 * (np.mean([0.75, 1.0] * 3) - 0.625))
    with pytest.raises(ValueError, match="no relation label"):
        by_relation(frame, {}, ["Edit Succ."])


def test_a_failing_setting_keeps_what_the_settings_before_it_computed(tiny_llama, setting):
    """With the second moments gathered by the run (``moments=None``), a method whose
    hparams cannot be resolved fails at its own turn, with its own error: the rows of the
    methods before it are kept, and the weights are the model's own."""
    from intattn_analysis import runs

    hp, _ = setting
    hp = hp.replace(mom2_n_tokens=300, mom2_max_len=16)
    before = {k: v.clone() for k, v in tiny_llama.hf_model.state_dict().items()}
    with pytest.raises(ia.EditError, match="layer") as caught:
        runs.edit_batches(tiny_llama, [FACTS[:2]], ["memit", "intattn"],
                          {"memit": hp, "intattn": hp.replace(layers=(tiny_llama.n_layers,))},
                          metrics=("knowedit",), targets_cache=False, progress=False)
    assert list(caught.value.partial_run.records["method"]) == ["pre-edit", "memit"]
    assert tiny_llama.open_edits == 0
    after = tiny_llama.hf_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- planning
def test_a_plan_names_the_units_a_run_computes_and_computes_nothing(tiny_llama, setting, tmp_path):
    """Inside ``planning()`` the runner records the units and writes nothing; the units
    it names are the files a real run then writes, and after the run every one is done."""
    from intattn_analysis.experiments.planning import planning

    with planning() as before:
        assert _run(tiny_llama, setting, tmp_path) == 0
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())
    assert before.units and not any(u.done for u in before.units)
    _run(tiny_llama, setting, tmp_path)
    written = set(unit_files(tmp_path / "sweep"))
    assert {u.uid for u in before.units} == written
    with planning() as after:
        _run(tiny_llama, setting, tmp_path)
    assert all(u.done for u in after.units) and len(after.units) == len(before.units)


def test_status_counts_done_missing_and_stale_units(tiny_llama, setting, tmp_path, monkeypatch):
    """A unit stored at settings the plan no longer asks for is stale; the ones it asks
    for and lacks are missing, timed at the stored units' seconds."""
    import types

    from intattn_analysis import experiments
    from intattn_analysis.experiments.status import status

    hp, moments = setting
    chosen = {"hp": hp}

    def run(model, dataset, scale, root, progress=True):
        run_alpha_settings(model, [FACTS[:2], FACTS[2:]], SETTINGS, chosen["hp"], ResultStore(root, "sweep"),
                           dataset="hand", moments=moments, metrics=("knowedit",), progress=False)

    monkeypatch.setitem(experiments.EXPERIMENTS, "sweep", types.SimpleNamespace(NAME="sweep", run=run))
    runs = [("sweep", tiny_llama, "hand")]
    fresh = status(tmp_path, runs, protocol=None).iloc[0]
    assert (fresh["done"], fresh["stale"], fresh["missing"]) == (0, 0, 6)
    assert math.isnan(fresh["estimated_seconds"])  # nothing was ever timed
    run(tiny_llama, "hand", "ci", tmp_path)
    finished = status(tmp_path, runs, protocol=None).iloc[0]
    assert (finished["done"], finished["stale"], finished["missing"]) == (6, 0, 0)
    chosen["hp"] = hp.replace(v_steps=hp.v_steps + 1)  # a changed default: the edits are stale
    changed = status(tmp_path, runs, protocol=None).iloc[0]
    assert (changed["done"], changed["stale"], changed["missing"]) == (2, 4, 4)  # pre-edit units stay
    stored = ResultStore(tmp_path, "sweep").rows()
    per_unit = stored.groupby(["batch", "setting"])["seconds"].first()
    expected = per_unit.drop("pre-edit", level="setting").groupby("setting").mean().sum() * 2
    assert changed["estimated_seconds"] == pytest.approx(expected)


def test_status_refuses_an_unknown_experiment_by_name(capsys):
    assert cli.main(["status", "--experiments", "no-such"]) == 2
    assert "--experiments: unknown experiment 'no-such'" in capsys.readouterr().err


def test_activation_alphas_are_stored_once_and_read_back(tiny_llama, tmp_path, monkeypatch):
    """Estimator (d) sums float32 norms, which differ in their last bits between
    batchings, thread counts and machines; the alpha is part of every unit's key, so it is
    computed once, stored, and read back by every later run (and a plan without it waits)."""
    from intattn_analysis.experiments import estimators
    from intattn_analysis.experiments.planning import PlanIncomplete, planning

    facts = ia.load_facts("builtin")[:6]
    monkeypatch.setattr(estimators, "known_facts", lambda all_facts, name: facts)
    one = estimators.activation_alphas(tiny_llama, [1, 2], 6, batch_size=1)
    six = estimators.activation_alphas(tiny_llama, [1, 2], 6, batch_size=6)
    assert one != six and one == pytest.approx(six, rel=1e-6)  # the noise this is about
    store = ResultStore(tmp_path, estimators.NAME)
    with planning(), pytest.raises(PlanIncomplete, match="estimator \\(d\\)"):
        estimators.stored_activation_alphas(tiny_llama, store, [1, 2], 6)
    first = estimators.stored_activation_alphas(tiny_llama, store, [1, 2], 6)
    monkeypatch.setattr(estimators, "activation_alphas", lambda *a, **k: pytest.fail("computed again"))
    assert estimators.stored_activation_alphas(tiny_llama, store, [1, 2], 6) == first
    assert all(0 < a < 1 for a in first.values())


def test_the_train_choice_reads_its_own_units_not_stale_ones_of_the_same_name(tiny_llama, setting, tmp_path):
    """A train unit of the same setting name stored at other settings (stale) must not
    enter estimator (e)'s criterion: the choice is made from the units the run asks for."""
    import dataclasses

    from intattn_analysis.experiments import estimators

    hp, moments = setting
    scale = dataclasses.replace(estimators.SCALES["ci"], train_dataset="zsre-train", train_batch_size=3,
                                train_grid=(0.0, 0.5))
    store = ResultStore(tmp_path, estimators.NAME)
    chosen, table = estimators.train_alpha(tiny_llama, hp, store, scale, moments, progress=False)
    # a stale unit that would make alpha 0.5 win by far if it were read
    label = "zsre-train"
    loser = [name for name in ("0", "0.5") if alpha_label({l: float(name) for l in hp.layers}) != alpha_label(chosen)][0]
    stale = [{"position": i, "Edit Succ.": 1.0, "Locality": 1.0} for i in range(3)]
    store.write_unit({"stale": True}, stale, "stale",
                     {"model": tiny_llama.name, "dataset": label, "split": "train", "batch": 0,
                      "setting": f"train-{alpha_label({l: float(loser) for l in hp.layers})}"})
    again, _ = estimators.train_alpha(tiny_llama, hp, store, scale, moments, progress=False)
    assert again == chosen


def test_reproduce_refuses_stale_units_unless_pruned_then_brings_them_current(tiny_llama, setting, tmp_path,
                                                                              monkeypatch):
    """Stale units would be summarised beside today's: reproduce names them and stops, or
    with prune_stale removes them and computes today's units."""
    import types

    from intattn_analysis import experiments
    from intattn_analysis.experiments.status import StaleUnitsError, reproduce, status

    hp, moments = setting
    chosen = {"hp": hp}

    def run(model, dataset, scale, root, shard=None, progress=True):
        run_alpha_settings(model, [FACTS[:2], FACTS[2:]], SETTINGS, chosen["hp"], ResultStore(root, "sweep"),
                           dataset="hand", moments=moments, metrics=("knowedit",), progress=False, shard=shard)

    monkeypatch.setitem(experiments.EXPERIMENTS, "sweep", types.SimpleNamespace(NAME="sweep", run=run))
    runs = [("sweep", tiny_llama, "hand")]
    run(tiny_llama, "hand", "paper", tmp_path)
    chosen["hp"] = hp.replace(v_steps=hp.v_steps + 1)
    with pytest.raises(StaleUnitsError, match="4 stale unit"):
        reproduce(tmp_path, runs, protocol="teacher-forced", progress=False, log=lambda m: None)
    assert len(unit_files(tmp_path / "sweep")) == 6  # nothing removed or computed
    assert reproduce(tmp_path, runs, prune_stale=True, protocol="teacher-forced", progress=False,
                     log=lambda m: None) == ["sweep"]
    after = status(tmp_path, runs, protocol=None).iloc[0]
    assert (after["done"], after["stale"], after["missing"]) == (6, 0, 0)


def test_reproduce_prunes_what_a_waiting_plan_names_only_once_it_has_run(tmp_path, monkeypatch):
    """A plan that waits on a result not stored yet (estimator (e)'s train choice, say)
    cannot tell which stored units are stale; once the run has stored what it waited on,
    reproduce plans again and removes (or refuses) the units no plan names."""
    import types

    from intattn_analysis import experiments
    from intattn_analysis.experiments import planning
    from intattn_analysis.experiments.status import StaleUnitsError, reproduce

    labels = {"model": "m", "dataset": "d", "batch": 0}

    def run(model, dataset, scale, root, shard=None, progress=True):
        store = ResultStore(root, "waits")
        plan = planning.active()
        for name in ("choice", "after-choice"):
            key = {"unit": name}
            if plan is not None:
                plan.record(store, key, name, {**labels, "setting": name})
                if not store.has(key, name):
                    raise planning.PlanIncomplete("waits on the choice")
            elif not store.has(key, name):
                store.write_unit(key, [{"position": 0, "Edit Succ.": 1.0}], name, {**labels, "setting": name})

    monkeypatch.setitem(experiments.EXPERIMENTS, "waits", types.SimpleNamespace(NAME="waits", run=run))
    model = types.SimpleNamespace(name="m")
    runs = [("waits", model, "d")]
    stale = ResultStore(tmp_path, "waits")
    stale.write_unit({"unit": "old"}, [{"position": 0, "Edit Succ.": 0.0}], "old", {**labels, "setting": "old"})
    with pytest.raises(StaleUnitsError, match="1 stale unit"):
        reproduce(tmp_path, runs, protocol="teacher-forced", progress=False, log=lambda m: None)
    assert len(unit_files(tmp_path / "waits")) == 3, "the run's units are kept; the stale one is named"
    said = []
    assert reproduce(tmp_path, runs, prune_stale=True, protocol="teacher-forced", progress=False,
                     log=said.append) == ["waits"]
    assert sorted(p.name.split("-")[0] for p in unit_files(tmp_path / "waits").values()) == ["after", "choice"]
    assert any("removed 1 stale unit" in line for line in said)


def test_reproduce_checks_its_arguments_before_any_work(capsys):
    assert cli.main(["reproduce", "--scale", "huge"]) == 2
    assert "--scale must be ci" in capsys.readouterr().err
    assert cli.main(["reproduce", "--scale", "paper", "--only", "no-such"]) == 2
    assert "--only: ['no-such'] are not experiments of the paper grid" in capsys.readouterr().err
    assert cli.main(["reproduce", "--scale", "paper", "--shard", "3/2"]) == 2


def test_status_estimates_fall_back_to_other_protocols_and_models():
    from intattn_analysis.experiments.planning import PlannedUnit
    from intattn_analysis.experiments.status import _estimate

    timed = pd.DataFrame([
        {"model": "a", "setting": "MEMIT", "protocol": "teacher-forced", "seconds": 10.0},
        {"model": "a", "setting": "MEMIT", "protocol": "generation", "seconds": 30.0},
        {"model": "b", "setting": "ROME", "protocol": "teacher-forced", "seconds": 4.0},
    ])

    def unit(setting, protocol):
        return PlannedUnit("e", "u", {"setting": setting, "protocol": protocol}, False)

    assert _estimate([unit("MEMIT", "generation")], timed, "a") == 30.0  # its own
    assert _estimate([unit("ROME", "teacher-forced")], timed, "a") == 4.0  # another model's
    assert _estimate([unit("ROME", "generation")], timed, "a") == 4.0  # another protocol, another model
    assert _estimate([unit("MEMIT", "generation")], timed, "b") == 30.0  # another model, same protocol
    assert _estimate([unit("FT-L", "generation")], timed, "b") == 4.0  # nothing of it: this model's mean
    assert math.isnan(_estimate([unit("MEMIT", None)], timed.iloc[:0], "a"))


def test_reproduce_into_another_store_leaves_the_repositorys_pages_alone(tmp_path, monkeypatch, capsys):
    """`intattn reproduce --scale paper --out DIR` writes DIR's tables beside it, and not the
    repository's docs/results: those are the pages of the repository's own store."""
    from intattn_analysis import report
    from intattn_analysis.experiments import status

    store = tmp_path / "store"
    for setting in ("pre-edit", "0"):
        ResultStore(store, "alpha-sweep").write_unit(
            {"setting": setting}, [{"position": 0, "fact_key": "f", "Edit Succ.": 1.0}], label=setting,
            labels={"model": "m", "dataset": "d", "batch": 0, "setting": setting,
                    "alpha": None if setting == "pre-edit" else setting})
    monkeypatch.setattr(cli, "_paper_runs", lambda args, experiments: [])
    monkeypatch.setattr(status, "reproduce", lambda root, runs, **kw: ["alpha-sweep"])
    pages = []
    monkeypatch.setattr(report, "write_pages", lambda *a, **k: pages.append(a) or [])
    assert cli.main(["reproduce", "--scale", "paper", "--only", "alpha-sweep", "--out", str(store)]) == 0
    assert (tmp_path / "alpha_sweep.csv").exists(), "the store's tables go beside it"
    assert pages == [], "the repository's pages were written from another store's tables"
    assert "docs/results/ left as it is" in capsys.readouterr().out
