"""The generated result pages (:mod:`intattn_analysis.report`): the committed pages are
what the committed tables give, and a changed table value makes the check fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from intattn_analysis import cli
from intattn_analysis.report import Tables, markdown_table, protocol_coverage, render_pages, stale_pages

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "figures" / "paper"
PAGES = ROOT / "docs" / "results"


def test_the_committed_pages_are_what_the_committed_tables_give():
    assert stale_pages(PAPER, PAGES) == [], "run `intattn report` and commit docs/results"


def test_a_changed_table_value_fails_the_check(tmp_path, capsys):
    tables = tmp_path / "tables"
    tables.mkdir()
    for path in PAPER.glob("*.csv"):
        shutil.copy(path, tables / path.name)
    out = tmp_path / "pages"
    assert cli.main(["report", "--tables", str(tables), "--out", str(out)]) == 0
    assert cli.main(["report", "--tables", str(tables), "--out", str(out), "--check"]) == 0

    intervals = pd.read_csv(tables / "editors_intervals.csv", dtype={"setting": str})
    shown = intervals.index[(intervals["setting"] == "MEMIT") & (intervals["protocol"] == "generation")
                            & (intervals["metric"] == "Edit Succ.")]
    assert len(shown), "the committed tables hold MEMIT under generation"
    first = shown[0]
    before = render_pages(tables)["generation.md"]
    intervals.loc[first, "mean"] += 1.0
    intervals.to_csv(tables / "editors_intervals.csv", index=False)
    capsys.readouterr()
    assert cli.main(["report", "--tables", str(tables), "--out", str(out), "--check"]) == 1
    assert "generation.md: differs" in capsys.readouterr().out
    assert render_pages(tables)["generation.md"] != before


def test_a_missing_tables_folder_is_named(tmp_path, capsys):
    assert cli.main(["report", "--tables", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "--tables:" in capsys.readouterr().err


def test_coverage_names_what_was_not_measured(tmp_path):
    rows = [{"model": "m", "dataset": "d", "setting": s, "metric": "Edit Succ.", "mean": 50.0, "ci_low": 40.0,
             "ci_high": 60.0, "n_edits": 10} for s in ("pre-edit", "MEMIT")]
    pd.DataFrame(rows).to_csv(tmp_path / "editors_intervals.csv", index=False)
    pd.DataFrame([{**rows[1], "protocol": p} for p in ("teacher-forced", "generation")]).to_csv(
        tmp_path / "sequential_intervals.csv", index=False)
    coverage = protocol_coverage(Tables(tmp_path)).set_index("experiment")
    assert coverage.loc["editors", ["teacher-forced", "generation"]].tolist() == ["10", "not measured"]
    assert coverage.loc["sequential", ["teacher-forced", "generation"]].tolist() == ["10", "10"]
    assert coverage.loc["outdated", "generation"] == "not run"


def test_markdown_tables_escape_their_separators():
    text = markdown_table(pd.DataFrame({"a": ["x|y", None], "b": [1, 2]}))
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| x\\|y | 1 |", "|  | 2 |"]


def test_settings_name_what_differs_from_todays_defaults(tmp_path):
    from intattn_analysis.experiments.store import ResultStore
    from intattn_analysis.hparams import hparams_for
    from intattn_analysis.report import settings_table

    today = hparams_for("smollm2-135m", "memit").effective_dict()
    store = ResultStore(tmp_path, "editors")
    labels = {"model": "smollm2-135m", "dataset": "zsre", "setting": "MEMIT"}
    store.write_unit({"method": "memit", "hparams": today, "batch": 0}, [{"position": 0}], "a", labels)
    store.write_unit({"method": "memit", "hparams": {**today, "v_steps": 7}, "batch": 0}, [{"position": 0}], "b",
                     labels)
    store.write_unit({"unit": "pre-edit"}, [{"position": 0}], "c", {**labels, "setting": "pre-edit"})
    table = settings_table(tmp_path, ["editors"]).set_index("settings")
    assert table.loc["today's defaults", "units"] == 1
    assert table.loc[f"differs: v_steps 7 (today {today['v_steps']})", "units"] == 1
    assert len(table) == 2  # the unedited model's unit has no settings


# The experiments' table names in figures/paper (localization's CSVs start with its name).
@pytest.mark.parametrize("experiment", ["localization", "alpha-sweep", "alpha-estimators", "editors", "sequential",
                                        "batch-scaling", "outdated"])
def test_the_committed_tables_are_what_the_committed_store_gives(experiment, tmp_path):
    """Every paper-scale CSV is current: summarising the committed store again writes the
    same files with the same values. Numbers are compared to 2e-5 relative: they are
    written with 6 significant digits, and a float sum in another order (another machine's
    BLAS, another pandas) may move the last digit written."""
    import numpy as np

    from intattn_analysis.cli import _table_name, write_tables
    from intattn_analysis.experiments import experiment as experiment_module

    written = write_tables(experiment, experiment_module(experiment).tables(PAPER / "store"), tmp_path)
    prefix = _table_name(experiment)
    committed = {p.name for p in PAPER.glob(f"{prefix}*.csv")
                 if p.stem == prefix or p.stem.startswith(f"{prefix}_")}
    assert {p.name for p in written} == committed, "run `intattn run ... --tables-only --scale paper`"
    for path in written:
        new, old = pd.read_csv(path, dtype=str), pd.read_csv(PAPER / path.name, dtype=str)
        assert list(new.columns) == list(old.columns), path.name
        assert new.shape == old.shape, path.name
        for column in new.columns:
            a, b = pd.to_numeric(new[column], errors="coerce"), pd.to_numeric(old[column], errors="coerce")
            numeric = a.notna() & b.notna()
            assert (new[column][~numeric].fillna("") == old[column][~numeric].fillna("")).all(), (path.name, column)
            assert np.allclose(a[numeric], b[numeric], rtol=2e-5, atol=0), (path.name, column)


def test_the_precision_page_reads_a_store_with_one_dtype_and_with_two(tmp_path):
    """With float32 rows alone the page shows them and says nothing is paired; with a
    bfloat16 row paired, it shows the difference and the verdict, and an unmeasured
    difference (NaN) is left out of the verdict instead of breaking it."""
    from intattn_analysis.report import precision_page

    base = {"model": "m", "dataset": "zsre", "protocol": "teacher-forced", "setting": "MEMIT", "metric": "Edit Succ.",
            "mean": 90.0, "ci_low": 85.0, "ci_high": 95.0, "n_edits": 100}
    pd.DataFrame([{**base, "dtype": "float32"}]).to_csv(tmp_path / "precision_intervals.csv", index=False)
    alone = precision_page(Tables(tmp_path))
    assert "nothing is paired" in alone and "90.0 [85.0, 95.0]" in alone
    pd.DataFrame([{**base, "dtype": "float32"}, {**base, "dtype": "bfloat16", "mean": 89.0}]).to_csv(
        tmp_path / "precision_intervals.csv", index=False)
    pair = {"model": "m", "dataset": "zsre", "protocol": "teacher-forced", "dtype": "bfloat16", "reference": "float32",
            "setting": "MEMIT", "metric": "Edit Succ.", "diff": -1.0, "ci_low": -2.0, "ci_high": 0.0,
            "p_value": 0.04, "n_edits": 100, "p_holm": 0.04}
    unmeasured = {**pair, "metric": "Portability", "diff": float("nan"), "ci_low": float("nan"),
                  "ci_high": float("nan"), "p_value": float("nan"), "p_holm": float("nan")}
    pd.DataFrame([pair, unmeasured]).to_csv(tmp_path / "precision_paired.csv", index=False)
    both = precision_page(Tables(tmp_path))
    assert "bfloat16 − float32" in both and "-1.0 [-2.0, +0.0]" in both
    assert "1 of 1 differences on the KnowEdit metrics are decided" in both


def test_one_unit_stored_by_two_experiments_has_one_set_of_rows():
    """Batch-scaling's batch of 100 is the editors experiment's batch: where a stored unit of
    the one has the other's key but for the batch-size label (the same facts, method and
    settings), the two hold the same rows. ROME's fact-after-fact batch is the sensitive one
    (docs/design.md, batch-scaling): both of its units must come from one computation.

    Values are compared to 1e-4 relative: units computed by two versions of the code whose
    float32 forwards differ in their last digits hold probabilities that differ by up to
    3.4e-5 relative (PMET and the unedited model here); a score that changes, as ROME's did
    when its two units were two computations, moves by at least a token's share of it."""
    import gzip
    import json
    import math

    from intattn_analysis.experiments.store import KEY_FIELD, ResultStore

    def units(experiment):
        out = {}
        for path in ResultStore(PAPER / "store", experiment).files():
            with gzip.open(path, "rt") as handle:
                rows = [json.loads(line) for line in handle]
            key = {k: v for k, v in rows[0][KEY_FIELD].items() if k != "batch_size"}
            out[json.dumps(key, sort_keys=True)] = rows
        return out

    def same(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-4, abs_tol=0.0)
        return a == b

    editors, scaling = units("editors"), units("batch-scaling")
    shared = sorted(set(editors) & set(scaling))
    methods = {json.loads(key).get("method") for key in shared}
    assert "rome" in methods, "the committed store holds no ROME unit in both experiments"
    labels = {"unit", "experiment", "batch_size", "seconds", "edit_seconds", KEY_FIELD}
    for key in shared:
        ours, theirs = editors[key], scaling[key]
        assert len(ours) == len(theirs)
        for mine, other in zip(ours, theirs):
            differ = [c for c in (set(mine) | set(other)) - labels if not same(mine.get(c), other.get(c))]
            assert not differ, (f"{json.loads(key).get('method')}, fact {mine.get('fact_key')}: the same unit "
                                f"differs in {sorted(differ)}")
