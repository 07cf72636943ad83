"""Verdicts under both protocols (:mod:`intattn_analysis.experiments.protocols`) and Holm's
correction, on hand-made rows whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import intattn_analysis as ia
from intattn_analysis.experiments.protocols import disagreements, rankings, reading, verdicts
from intattn_analysis.experiments.editors import protocol_gaps
from intattn_analysis.intervals import formatted_intervals, holm, tidy_intervals


def test_holm_on_a_hand_computed_family():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert np.allclose(holm(p)[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(holm(p)[4])
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0]


N = 40


def _rows():
    """MEMIT right on every fact under both protocols; A right under teacher forcing only
    (so it equals MEMIT there and falls behind under generation); B right on half the
    facts under both."""
    rows = []
    for setting, forced, generated in (("MEMIT", 1.0, 1.0), ("A", 1.0, 0.0), ("B", None, None)):
        for i in range(N):
            f = forced if forced is not None else float(i % 2)
            g = generated if generated is not None else float(i % 2)
            base = {"model": "m", "dataset": "d", "setting": setting, "batch": 0, "position": i,
                    "fact_key": f"k{i}"}
            rows.append({**base, "Edit Succ.": f})
            rows.append({**base, "protocol": "generation", "Edit Succ.": g, "Edit Succ. prefix": g,
                         "answer": "yes" if g else "no"})
    return pd.DataFrame(rows)


def test_verdicts_say_what_changes_between_protocols():
    table = verdicts(_rows(), ["Edit Succ."]).set_index("setting")
    assert table.loc["A", "verdict"] == "separates"        # equal, then 100 points behind
    assert table.loc["A", "diff generation"] == pytest.approx(-100.0)
    assert table.loc["B", "verdict"] == "same"             # 50 points behind under both
    assert table.loc["B", "diff teacher-forced"] == pytest.approx(-50.0)
    assert (table["p_holm generation"] >= table["p_value generation"]).all()
    # a setting with teacher-forced rows only has no verdict
    rows = _rows()
    rows = rows[~((rows["setting"] == "B") & (rows["protocol"] == "generation"))]
    assert "B" not in set(verdicts(rows, ["Edit Succ."])["setting"])


def test_rankings_and_gaps_and_reading():
    rows = _rows()
    rows["protocol"] = rows["protocol"].fillna("teacher-forced")
    intervals = tidy_intervals(rows, ["model", "dataset", "protocol", "setting"], ["Edit Succ."])
    ranked = rankings(intervals).set_index("setting")
    assert ranked.loc["A", "rank teacher-forced"] == 1 and ranked.loc["A", "rank generation"] == 3
    gaps = protocol_gaps(rows, ["Edit Succ."]).set_index("setting")
    assert gaps.loc["A", "diff"] == pytest.approx(-100.0) and gaps.loc["MEMIT", "diff"] == 0.0
    lines = reading(verdicts(rows, ["Edit Succ."]), rankings(intervals), gaps.reset_index())
    assert any("A minus MEMIT on Edit Succ. separates" in line for line in lines)
    assert any("from -100.0" in line for line in lines)


def test_disagreements_show_what_the_model_said():
    facts = {f"k{i}": ia.Fact.from_text(f"Fact {i} is about", f"Fact {i}", "yes", target_true="no")
             for i in range(N)}
    table = disagreements(_rows(), facts, n=2)
    assert set(table["setting"]) == {"A"}
    assert table["direction"].tolist() == ["teacher forcing only"] * 2
    assert table["prompt"].tolist() == ["Fact 0 is about", "Fact 1 is about"]
    assert table["answer"].tolist() == ["no", "no"]
    with pytest.raises(KeyError, match="not among the facts"):
        disagreements(_rows(), {}, n=2)


def test_a_table_of_two_protocols_needs_the_protocol_in_its_index():
    rows = _rows()
    rows["protocol"] = rows["protocol"].fillna("teacher-forced")
    intervals = tidy_intervals(rows, ["model", "dataset", "protocol", "setting"], ["Edit Succ."])
    with pytest.raises(ValueError, match="add the column that tells them apart.*protocol"):
        formatted_intervals(intervals, ["model", "dataset", "setting"])
    assert formatted_intervals(intervals, ["model", "dataset", "protocol", "setting"]).shape == (6, 1)


def test_holm_within_adjusts_each_family_apart():
    from intattn_analysis.intervals import holm_within

    table = pd.DataFrame({"model": ["a", "a", "b"], "p_value": [0.01, 0.04, 0.04], "diff": [1.0, 2.0, 3.0]})
    adjusted = holm_within(table, ["model"])
    assert list(adjusted.columns) == ["model", "p_value", "p_holm", "diff"]
    assert adjusted["p_holm"].tolist() == pytest.approx([0.02, 0.04, 0.04])  # b's family has one member
    assert "p_holm" in holm_within(table.iloc[:0], ["model"]).columns
