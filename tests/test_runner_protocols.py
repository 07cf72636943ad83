"""Experiments under both evaluation protocols, on a tiny random Llama.

A generation unit is its own stored unit beside the teacher-forced one: the teacher-forced
units keep their keys and rows (so a store written before the generation protocol is read
as it is), a rerun with ``protocol="both"`` computes only the generation units, and the
tables split every number by ``protocol``.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

import intattn_analysis as ia
from intattn_analysis.experiments import editors
from intattn_analysis.experiments.store import ResultStore
from intattn_analysis.experiments.units import GENERATION_PART

from runner_cases import ALIASED, FACTS, family, store_rows, tiny_setting

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ia.GenerationSettings(max_new_tokens=4)


def _run(model, root, protocol, rows=("MEMIT", "ROME, each alone")):
    hp, moments = tiny_setting(model)
    settings = {name: family(hp)[name] for name in rows}
    store = ResultStore(root, editors.NAME)
    computed = editors.run_methods(model, [FACTS[:2], ALIASED], settings, store, dataset="hand", moments=moments,
                                   fluency_tokens=3, protocol=protocol, generation=SHORT, progress=False)
    return store, computed


def test_generation_units_sit_beside_the_teacher_forced_ones(tiny_llama, tmp_path):
    forced, n_forced = _run(tiny_llama, tmp_path / "forced", "teacher-forced")
    assert n_forced == 6  # 2 batches x (pre-edit, MEMIT, ROME each alone)
    both, n_both = _run(tiny_llama, tmp_path / "both", "both")
    assert n_both == 12
    want = store_rows(forced, tiny_llama)
    got = store_rows(both, tiny_llama)
    assert {label: got[label] for label in want} == want  # same keys, same rows
    generation = {label: unit for label, unit in got.items() if label not in want}
    assert sorted(generation) == sorted(f"{label}-gen" for label in want)
    for unit in generation.values():
        assert unit["key"]["evaluation"] == "generation"
        assert unit["key"]["generation"] == SHORT.key()
        assert {row["protocol"] for row in unit["rows"]} == {"generation"}
        assert {row["prompt_form"] for row in unit["rows"]} == {"plain"}
        assert all(isinstance(row["answers"], dict) for row in unit["rows"])


def test_a_rerun_with_both_protocols_computes_only_the_generation_units(tiny_llama, tmp_path):
    store, _ = _run(tiny_llama, tmp_path, "teacher-forced")
    before = store_rows(store, tiny_llama)
    _, computed = _run(tiny_llama, tmp_path, "both")
    assert computed == 6
    after = store_rows(store, tiny_llama)
    assert {label: after[label] for label in before} == before
    _, again = _run(tiny_llama, tmp_path, "generation")
    assert again == 0


def test_aliases_enter_only_the_generation_key(tiny_llama):
    hp, _ = tiny_setting(tiny_llama)
    settings = {"MEMIT": family(hp)["MEMIT"]}
    aliased = list(ALIASED)
    with_alias = [ia.Fact.from_dict({**aliased[0].to_dict(), "portability": [
        [p.prompt, p.answer, p.kind, ["w60"]] for p in aliased[0].portability]}), aliased[1]]
    cells = {name: editors.method_cells(tiny_llama, [facts], settings, dataset="hand", metrics=("knowedit",),
                                        fluency_tokens=3, protocol="both", generation=SHORT)
             for name, facts in (("plain", aliased), ("aliased", with_alias))}
    for plain, other in zip(cells["plain"], cells["aliased"]):
        assert plain.units[""].key == other.units[""].key
        assert plain.units[GENERATION_PART].key != other.units[GENERATION_PART].key


def test_the_tables_split_by_protocol(tiny_llama, tmp_path):
    store, _ = _run(tiny_llama, tmp_path, "both")
    tables = editors.summarise(store)
    intervals = tables["intervals"]
    assert set(intervals["protocol"]) == {"teacher-forced", "generation"}
    generation = intervals[intervals["protocol"] == "generation"]
    assert "Edit Succ. prefix" in set(generation["metric"])
    assert "Edit Succ. prefix" not in set(intervals[intervals["protocol"] == "teacher-forced"]["metric"])
    assert set(tables["paired"]["protocol"]) == {"teacher-forced", "generation"}
    gaps = tables["protocols"]
    assert set(gaps["setting"]) == {"pre-edit", "MEMIT", "ROME, each alone"}
    # a gap is the per-fact difference of the two protocols' rows on the same facts
    rows = store.rows()
    rows["protocol"] = rows["protocol"].fillna("teacher-forced")
    memit = rows[rows["setting"] == "MEMIT"].pivot_table(index=["batch", "position"], columns="protocol",
                                                         values="Edit Succ.")
    gap = gaps[(gaps["setting"] == "MEMIT") & (gaps["metric"] == "Edit Succ.")]["diff"].item()
    assert gap == pytest.approx(100 * (memit["generation"] - memit["teacher-forced"]).mean())


def test_a_teacher_forced_store_gets_the_protocol_column(tiny_llama, tmp_path):
    store, _ = _run(tiny_llama, tmp_path, "teacher-forced", rows=("MEMIT",))
    tables = editors.summarise(store)
    assert set(tables["intervals"]["protocol"]) == {"teacher-forced"}
    assert tables["protocols"].empty
    assert isinstance(tables["protocols"], pd.DataFrame)


def test_outdated_asks_the_old_answer_under_generation(tiny_llama, tmp_path):
    """Part (d): an ``answers`` unit per model state beside the survival and trace units
    (which keep their keys), each row what :func:`outdated.answer_rows` gives on the model
    in that state."""
    from intattn_analysis.experiments import outdated

    hp, moments = tiny_setting(tiny_llama)
    settings = {"MEMIT": ("memit", hp.replace(alpha=0.0))}

    def run(root, protocol):
        store = ResultStore(root, outdated.NAME)
        n = outdated.run_batches(tiny_llama, [ALIASED], settings, store, dataset="hand", n_traced=1, samples=2,
                                 moments=moments, protocol=protocol, generation=SHORT, progress=False)
        return store, n

    forced, n_forced = run(tmp_path / "forced", "teacher-forced")
    both, n_both = run(tmp_path / "both", "both")
    assert (n_forced, n_both) == (4, 6)
    want, got = store_rows(forced, tiny_llama), store_rows(both, tiny_llama)
    assert {label: got[label] for label in want} == want
    rows = both.rows()
    answers = rows[rows["part"] == "answers"].set_index(["setting", "position"])
    assert set(answers["protocol"]) == {"generation"}
    pre = ia.evaluate(tiny_llama, ALIASED, metrics=("knowedit",), protocol="generation", generation=SHORT,
                      progress=False)
    expected = {"pre-edit": outdated.answer_rows(tiny_llama, ALIASED, generation=SHORT)}
    with ia.edit(tiny_llama, ALIASED, method="memit", hparams=settings["MEMIT"][1], moments=moments, progress=False):
        expected["MEMIT"] = outdated.answer_rows(tiny_llama, ALIASED, pre=pre, generation=SHORT)
    for name, rows_ in expected.items():
        for row in rows_:
            for metric in (*outdated.ANSWER_METRICS, "Edit Succ.", "Locality", "answer", "context answer"):
                got_, want_ = answers.loc[(name, row["position"]), metric], row[metric]
                assert got_ == want_ or (pd.isna(got_) and pd.isna(want_)), (name, metric)
    tables = outdated.summarise(both)
    assert {"answers", "answers_paired", "answers_returned"} <= set(tables)
    assert "Context old answer" in set(tables["answers"]["metric"])


def test_batch_scaling_tables_split_by_protocol(tiny_llama, tmp_path):
    from intattn_analysis.experiments import batch_scaling

    hp, moments = tiny_setting(tiny_llama)
    settings = {"MEMIT": ("memit", hp.replace(alpha=0.0)), "AlphaEdit": family(hp)["AlphaEdit"]}
    scale = batch_scaling.ScalingScale(sizes=(1, 2), n_facts=2, methods=("MEMIT", "AlphaEdit"), metrics=("knowedit",),
                                       protocol="both", generation=SHORT)
    store = ResultStore(tmp_path, batch_scaling.NAME)
    assert batch_scaling.run_sizes(tiny_llama, FACTS, scale, settings, store, dataset="hand", moments=moments,
                                   progress=False) == 2 * (2 * 3 + 3)
    tables = batch_scaling.summarise(store)
    for name in ("intervals", "paired", "scaling"):
        assert set(tables[name]["protocol"]) == {"teacher-forced", "generation"}, name
    assert "protocol" not in tables["seconds"].columns
    # the teacher-forced part is what a teacher-forced run gives
    only = ResultStore(tmp_path / "forced", batch_scaling.NAME)
    batch_scaling.run_sizes(tiny_llama, FACTS, replace(scale, protocol="teacher-forced"), settings, only,
                            dataset="hand", moments=moments, progress=False)
    want = batch_scaling.summarise(only)["intervals"]
    got = tables["intervals"][tables["intervals"]["protocol"] == "teacher-forced"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


def test_sequential_rounds_measured_under_both_protocols(tiny_llama, tmp_path):
    """Each round gets a generation unit beside its teacher-forced one (which keeps its key
    and rows); a run that has the teacher-forced rounds replays them to add only the
    generation units; the generation rows of a round hold every edit so far."""
    from intattn_analysis.experiments import sequential

    hp, moments = tiny_setting(tiny_llama)
    settings = {"MEMIT": ("memit", hp.replace(alpha=0.0))}
    rounds = [FACTS[:1], FACTS[1:2], FACTS[2:3]]

    def run(root, protocol):
        store = ResultStore(root, sequential.NAME)
        n = sequential.run_sequences(tiny_llama, rounds, settings, store, dataset="hand", moments=moments,
                                     known=FACTS[3:], fluency_rounds=(3,), fluency_tokens=3, protocol=protocol,
                                     generation=SHORT, progress=False)
        return store, n

    forced, n_forced = run(tmp_path / "forced", "teacher-forced")
    both, n_both = run(tmp_path / "both", "both")
    assert (n_forced, n_both) == (3, 6)
    want, got = store_rows(forced, tiny_llama), store_rows(both, tiny_llama)
    assert {label: got[label] for label in want} == want
    _, added = run(tmp_path / "forced", "both")
    assert added == 3
    assert store_rows(forced, tiny_llama) == got
    rows = both.rows()
    generated = rows[rows["protocol"] == "generation"]
    assert sorted(generated[generated["round"] == 3]["edited_in"]) == [1, 2, 3]
    assert set(generated["kind"]) == {"edit"}  # Known kept is measured once, teacher-forced
    tables = sequential.summarise(both)
    assert set(tables["intervals"]["protocol"]) == {"teacher-forced", "generation"}


def test_the_protocol_options_are_checked_by_name(capsys):
    from intattn_analysis import cli

    assert cli.main(["run", "localization", "--protocol", "both"]) == 2
    assert "--protocol: the localization experiment evaluates no edit" in capsys.readouterr().err
    assert cli.main(["run", "editors", "--protocol", "both", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be a positive integer" in capsys.readouterr().err
    assert cli.main(["evaluate", "--protocol", "generation", "--metrics", "knowedit", "counterfact"]) == 2
    assert "'counterfact' compares answer probabilities" in capsys.readouterr().err
