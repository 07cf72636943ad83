"""Experiments under both evaluation protocols, on a tiny random Llama.

A generation unit is its own stored unit beside the teacher-forced one: the teacher-forced
units keep their keys and rows (so a store written before the generation protocol is read
as it is), a rerun with ``protocol="both"`` computes only the generation units, and the
tables split every number by ``protocol``.
"""

from __future__ import annotations

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
