"""Tests for the benchmark loaders in intattn_analysis.datasets."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from intattn_analysis import datasets
from intattn_analysis.datasets import (
    ERRATA,
    FORMATS,
    DatasetError,
    DatasetWarning,
    detect_format,
    load_facts,
    mquake_rewrites,
    write_rome_counterfact,
)
from intattn_analysis.facts import Fact, Probe

# file -> (format, records in the file as the data README counts them)
DATA_FILES = {
    "knowedit/ZsRE-test-all.json": ("knowedit", 1304),
    "knowedit/wiki_counterfact_test_cf.json": ("knowedit", 885),
    "knowedit/wiki_counterfact_train_cf.json": ("knowedit", 1428),
    "counterfact/counterfact-val.json": ("counterfact-flat", 1919),
    "counterfact/counterfact-edit.json": ("counterfact-flat", 10000),
    "zsre/zsre_mend_edit_portability.json": ("mend-zsre", 1037),
    "zsre/zsre_mend_train-1k.json": ("mend-zsre", 1000),
    "mquake/MQuAKE-hard.json": ("mquake", 429),
}
# Records 534 and 723 of zsre_mend_train-1k.json have an empty new target (alt == ""):
# no edit can be built from them, so a strict load stops at 534.
MEND_TRAIN_EMPTY_ALT = (534, 723)


def load_quietly(path: Path, **kwargs) -> list[Fact]:
    """load_facts without the per-file DatasetWarnings (tested on their own below)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return load_facts(path, **kwargs)


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ------------------------------------------------------------------ the shared data files
@pytest.mark.parametrize("name", DATA_FILES)
def test_readme_record_count(data_dir, name):
    records = json.loads((data_dir / name).read_text(encoding="utf-8"))
    assert len(records) == DATA_FILES[name][1]


@pytest.mark.parametrize("name", DATA_FILES)
def test_detects_format(data_dir, name):
    records = json.loads((data_dir / name).read_text(encoding="utf-8"))
    assert detect_format(records) == DATA_FILES[name][0]


@pytest.mark.parametrize("name", [n for n in DATA_FILES if not n.endswith("train-1k.json")])
def test_loads_every_record_strictly(data_dir, name):
    facts = load_quietly(data_dir / name, strict=True)
    assert len(facts) == DATA_FILES[name][1]
    assert all(isinstance(f, Fact) for f in facts)
    assert {f.source for f in facts} == {Path(name).name}
    assert len({f.case_id for f in facts}) == len(facts)


def test_mend_train_records_without_new_target(data_dir):
    path = data_dir / "zsre/zsre_mend_train-1k.json"
    with pytest.raises(DatasetError) as caught:
        load_facts(path)
    assert (caught.value.path, caught.value.index, caught.value.field) == (path, 534, "alt")
    with pytest.warns(DatasetWarning, match="skipped 2 bad record"):
        facts = load_facts(path, strict=False)
    assert len(facts) == 1000 - len(MEND_TRAIN_EMPTY_ALT)
    assert not {str(i) for i in MEND_TRAIN_EMPTY_ALT} & {f.case_id for f in facts}


def test_large_file_loads_fast(data_dir):
    start = time.perf_counter()
    facts = load_facts(data_dir / "counterfact/counterfact-edit.json")
    assert len(facts) == 10000
    assert time.perf_counter() - start < 5


def test_limit(data_dir):
    facts = load_facts(data_dir / "counterfact/counterfact-val.json", limit=5)
    assert len(facts) == 5
    assert [f.case_id for f in facts[:4]] == ["10", "42", "43", "66"]
    assert load_facts(data_dir / "counterfact/counterfact-val.json", limit=0) == []


# ------------------------------------------------------------------ spot checks per format
def test_knowedit_zsre(data_dir):
    facts = load_quietly(data_dir / "knowedit/ZsRE-test-all.json")
    fact = facts[0]
    assert fact.subject == "Epaspidoceras"
    assert fact.prompt == "Which family does {} belong to?"
    assert (fact.target_true, fact.target_new) == ("Aspidoceratidae", "Noctuidae")
    assert fact.paraphrases == ("What family are {}?",)
    assert fact.locality == (
        Probe("The taxon rank of Epaspidoceras is", "genus", "Relation_Specificity"),
        Probe("Epaspidoceras taxon rank", "genus", "Relation_Specificity"),
    )
    assert fact.portability == (
        Probe("What is the common name for the family Epaspidoceras belongs to?",
              "Owlet moths", "Reasoning"),
    )
    assert (fact.source, fact.case_id) == ("ZsRE-test-all.json", "0")
    # A rephrase that does not name the subject verbatim is kept as plain text.
    assert facts[4].subject == "Charlotte of Schaumburg-Lippe"
    assert facts[4].paraphrases == ("What was Charlotte the mother's name Schaumburg-Lippe?",)


def test_knowedit_zsre_errata(data_dir):
    with pytest.warns(DatasetWarning, match="corrected the subject of 3 record") as caught:
        facts = load_facts(data_dir / "knowedit/ZsRE-test-all.json")
    assert sum("corrected" in str(w.message) for w in caught) == 1
    fact = facts[396]
    assert fact.subject == "D&RGW 463"
    assert fact.prompt == "By which company, {} has been manufactured?"
    assert fact.paraphrases == ("Which company is known as the {} producer?",)
    assert facts[597].subject == "Prince Frederick Adolf"
    assert facts[676].subject == "Raja Zarith Sofia"
    assert facts[676].text == "Who is Raja Zarith Sofia's father?"
    assert set(ERRATA.values()) == {facts[i].subject for i in (396, 597, 676)}


def test_knowedit_wiki_counterfact(data_dir):
    with pytest.warns(DatasetWarning, match="dropped 27 probe"):
        facts = load_facts(data_dir / "knowedit/wiki_counterfact_test_cf.json")
    fact = facts[0]
    assert fact.subject == "Leonardo DiCaprio"
    assert fact.prompt == "The name of the country of citizenship of {} is"
    assert (fact.target_true, fact.target_new) == ("United States of America", "Syria")
    assert fact.paraphrases == ()
    assert fact.portability[0] == Probe(
        "The name of the currency in the country of citizenship of Leonardo DiCaprio is",
        "Syrian pound", "Reasoning", ("SYP", "LS", "Syrian lira"))
    assert {p.kind for p in fact.portability} == {"Reasoning", "Subject_Aliasing"}
    assert {p.kind for p in fact.locality} == {"Relation_Specificity", "Forgetfulness"}
    # Record 43's alias list starts with an empty list: the first string is taken.
    # Its other answers become the probe's aliases.
    award = [p for p in facts[43].locality if p.prompt == "The name of the award Abdul Rashid Dostum won is"]
    assert [p[:3] for p in award] == [("The name of the award Abdul Rashid Dostum won is",
                                       "Hero of the Democratic Republic of Afghanistan", "Relation_Specificity")]
    assert award[0].aliases == ("Order of the Star", "Order of the Red Banner", "Order of friendship of peoples")
    # One of record 14's five Logical_Generalization probes has no answer ([[]]): dropped.
    generalization = [p.prompt for p in facts[14].portability if p.kind == "Logical_Generalization"]
    assert len(generalization) == 4
    assert "The name of the father of Shiban is" not in generalization


def test_knowedit_wiki_counterfact_train(data_dir):
    with pytest.warns(DatasetWarning, match="dropped 2 probe"):
        facts = load_facts(data_dir / "knowedit/wiki_counterfact_train_cf.json")
    assert facts[0].portability[0] == Probe(
        "The name of the capital city of the country Goursez Vreizh is associated with is",
        "Besançon", "Reasoning")
    # Record 630's ground_truth is "": no true answer.
    assert facts[630].subject == "Gisenius, Johannes"
    assert facts[630].target_true is None


def test_knowedit_directory_split(data_dir):
    facts = load_quietly(data_dir / "knowedit", split="train")
    assert len(facts) == 1428
    assert facts[0].source == "wiki_counterfact_train_cf.json"
    with pytest.raises(DatasetError, match="matches 2 files"):
        load_facts(data_dir / "knowedit", split="test")


def test_counterfact_flat(data_dir):
    fact = load_facts(data_dir / "counterfact/counterfact-val.json", limit=1)[0]
    assert (fact.subject, fact.prompt) == ("BBC One", "{}, by")
    assert (fact.target_true, fact.target_new) == ("BBC", "Sega")
    assert fact.paraphrases == ("{} is my favorite product out of everything owned by",)
    assert fact.neighborhood == (Probe("BBC Radio, by", "BBC", ""),)
    assert (fact.portability, fact.locality) == ((), ())
    assert (fact.case_id, fact.source) == ("10", "counterfact-val.json")


def test_counterfact_flat_braces_in_text(data_dir):
    facts = load_facts(data_dir / "counterfact/counterfact-edit.json")
    fact = next(f for f in facts if f.case_id == "15515")
    assert fact.paraphrases == ("Television\n{| class=wikitable\n|-\n! {} is a citizen of",)
    assert fact.paraphrase_texts[0].endswith("! Monica Niculescu is a citizen of")


def test_mend_zsre_with_portability(data_dir):
    fact = load_facts(data_dir / "zsre/zsre_mend_edit_portability.json", limit=1)[0]
    assert fact.subject == "IAAF Combined Events Challenge"
    assert fact.prompt == "When was the inception of {}?"
    assert (fact.target_true, fact.target_new) == ("1998", "2006")  # answers[0], not pred
    assert fact.paraphrases == ("When was the {} launched?",)
    assert fact.locality == (
        Probe("nq question: what is the name of the last episode of spongebob", "The String", ""),
    )
    assert fact.portability == (
        Probe("What type of sports event is the IAAF Combined Events Challenge, which was "
              "established in 2006?", "Athletics", "Reasoning"),
    )


def test_mend_zsre_without_portability(data_dir):
    fact = load_facts(data_dir / "zsre/zsre_mend_train-1k.json", limit=1)[0]
    assert (fact.subject, fact.prompt) == ("UniFirst", "What is the product made by {}?")
    assert (fact.target_true, fact.target_new) == ("uniform", "unmanned aircraft")
    assert fact.portability == ()


def test_mquake(data_dir):
    facts = load_facts(data_dir / "mquake/MQuAKE-hard.json")
    fact = facts[0]
    assert (fact.case_id, fact.subject, fact.prompt) == ("7417", "Hey Jude", "{} was performed by")
    assert (fact.target_true, fact.target_new, fact.relation) == ("The Beatles", "Madonna", "P175")
    assert fact.paraphrases == ("Who performed {}?",)
    multi = [p for p in fact.portability if p.kind == "multi_hop"]
    single = [p for p in fact.portability if p.kind == "single_hop"]
    assert len(multi) == 3 and {p.answer for p in multi} == {"Arabic"}
    assert single[0] == Probe("Hey Jude was performed by", "Madonna", "single_hop",
                             ("Madonna Ciccone", "Madonna Louise Ciccone", "Madonna Louise Veronica Ciccone"))
    assert single[-1][:3] == ("The official language of Australia is", "Arabic", "single_hop")
    assert set(single[-1].aliases) == {"ar", "Arabian language", "Arabic language"}


def test_mquake_rewrites(data_dir):
    path = data_dir / "mquake/MQuAKE-hard.json"
    cases = mquake_rewrites(path)
    assert len(cases) == 429 and {len(c) for c in cases} == {4}
    assert [c[0] for c in cases] == load_facts(path)
    second = cases[0][1]
    assert (second.subject, second.prompt) == ("Madonna", "The director of {} is")
    assert (second.target_new, second.case_id) == ("Narendra Modi", "7417.1")
    assert second.portability == ()
    assert len(mquake_rewrites(path, limit=3)) == 3


# ------------------------------------------------------------------ ROME CounterFact
def hand_built_facts() -> list[Fact]:
    return [
        Fact(
            subject="Danielle Darrieux",
            prompt="The mother tongue of {} is",
            target_true="French",
            target_new="English",
            paraphrases=("Where {} is from, people speak the language of",
                         "She grew up speaking the language of"),
            neighborhood=(Probe("Michel Rocard is a native speaker of", "French"),
                          Probe("The mother tongue of Jean Gabin is", "French")),
            locality=(Probe("Barack Obama speaks the language", "English", "attribute"),),
            relation="P103",
            case_id="0",
        ),
        Fact(
            subject="Edwin of Northumbria",
            prompt="The official religion of {} is",
            target_true="Christianity",
            target_new="Islam",
            relation="P140",
            case_id="1",
        ),
    ]


def test_rome_counterfact_round_trip(tmp_path):
    facts = hand_built_facts()
    path = write_rome_counterfact(facts, tmp_path / "counterfact.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    assert detect_format(records) == "rome-counterfact"
    assert records[0]["case_id"] == 0
    assert records[0]["requested_rewrite"]["prompt"] == "The mother tongue of {} is"
    assert records[0]["requested_rewrite"]["target_new"]["str"] == "English"
    assert records[0]["paraphrase_prompts"][0] == (
        "Where Danielle Darrieux is from, people speak the language of")
    assert records[0]["attribute_prompts"] == ["Barack Obama speaks the language"]
    loaded = load_facts(path)
    assert loaded == [replace(f, source="counterfact.json") for f in facts]


def test_rome_counterfact_writer_drops_what_it_cannot_hold(tmp_path):
    fact = replace(hand_built_facts()[1],
                   portability=(Probe("Edwin's faith is", "Islam", "Reasoning"),),
                   neighborhood=(Probe("Paul's religion is", "Judaism"),))
    with pytest.warns(DatasetWarning, match="dropped 2 probe"):
        path = write_rome_counterfact([fact], tmp_path / "cf.json")
    assert load_facts(path)[0] == replace(fact, portability=(), neighborhood=(), source="cf.json")
    with pytest.raises(DatasetError) as caught:
        write_rome_counterfact([replace(fact, target_true=None)], tmp_path / "cf2.json")
    assert (caught.value.index, caught.value.field) == (0, "target_true")


# ------------------------------------------------------------------ the built-in set
@pytest.fixture
def builtin_file(tmp_path, monkeypatch) -> list[Fact]:
    """A stand-in built-in fact set: 40 facts as Fact.to_dict() records."""
    facts = [
        Fact(subject=f"Entity {i}", prompt="{} is located in", target_true=f"Town {i}",
             target_new=f"City {i}", case_id=str(i), source="builtin")
        for i in range(40)
    ]
    path = write_json(tmp_path / "builtin_facts.json", [f.to_dict() for f in facts])
    monkeypatch.setattr(datasets, "_builtin_resource", lambda: path)
    return facts


def test_builtin(builtin_file):
    assert load_facts("builtin") == builtin_file
    assert load_facts("builtin", limit=3) == builtin_file[:3]


def test_builtin_split(builtin_file):
    train = load_facts("builtin", split="train")
    test = load_facts("builtin", split="test")
    assert load_facts("builtin", split="train") == train  # deterministic
    assert sorted(train + test, key=lambda f: int(f.case_id)) == builtin_file
    assert not {f.key for f in train} & {f.key for f in test}
    assert 10 <= len(train) <= 30
    assert load_facts("builtin", split="test", limit=2) == test[:2]
    with pytest.raises(DatasetError, match="unknown split"):
        load_facts("builtin", split="validation")


def test_builtin_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_builtin_resource", lambda: tmp_path / "absent.json")
    with pytest.raises(DatasetError, match="built-in fact set is missing"):
        load_facts("builtin")


def test_packaged_builtin_file_loads():
    facts = load_facts("builtin")
    assert facts and {f.source for f in facts} == {"builtin"}


def test_facts_format_from_a_file(tmp_path):
    facts = hand_built_facts()
    path = write_json(tmp_path / "mine.json", [f.to_dict() for f in facts])
    assert detect_format(json.loads(path.read_text())) == "facts"
    assert load_facts(path) == [replace(f, source="mine.json") for f in facts]
    assert load_facts(path, format="builtin") == load_facts(path, format="facts")


def test_jsonl(tmp_path):
    facts = hand_built_facts()
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(f.to_dict()) for f in facts) + "\n\n")
    assert load_facts(path) == [replace(f, source="mine.jsonl") for f in facts]


# ------------------------------------------------------------------ bad input
KNOWEDIT_RECORD = {
    "subject": "Epaspidoceras",
    "prompt": "Which family does Epaspidoceras belong to?",
    "target_new": "Noctuidae",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                            "ground_truth": ["genus"]}]},
    "portability": {},
}
MEND_RECORD = {
    "subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft",
    "answers": ["uniform"], "loc": "nq question: who wrote it", "loc_ans": "someone",
    "cond": "",
}
MQUAKE_RECORD = {
    "case_id": 7,
    "requested_rewrite": [{"prompt": "{} was performed by", "subject": "Hey Jude",
                           "relation_id": "P175", "question": "Who performed Hey Jude?",
                           "target_new": {"str": "Madonna", "id": "Q1744"},
                           "target_true": {"str": "The Beatles", "id": "Q1299"}}],
    "questions": ["Who is the performer of Hey Jude?"], "answer": "The Beatles",
    "new_answer": "Madonna", "single_hops": [], "new_single_hops": [],
}


def with_changes(record: dict, **changes) -> dict:
    return {**record, **changes}


def without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def with_rewrite(**changes) -> dict:
    return with_changes(MQUAKE_RECORD, requested_rewrite=[
        with_changes(MQUAKE_RECORD["requested_rewrite"][0], **changes)])


# case -> (good record, bad record, field named in the error, hint in the message)
BAD_RECORDS = {
    "subject not in prompt": (KNOWEDIT_RECORD, with_changes(KNOWEDIT_RECORD, subject="Aspido"),
                              "prompt", "does not occur"),
    "empty target": (KNOWEDIT_RECORD, with_changes(KNOWEDIT_RECORD, target_new=" "),
                     "target_new", "non-empty string"),
    "missing field": (KNOWEDIT_RECORD, without(KNOWEDIT_RECORD, "target_new"),
                      "target_new", "is missing"),
    "null ground truth": (KNOWEDIT_RECORD, with_changes(KNOWEDIT_RECORD, ground_truth=None),
                          "ground_truth", "string or a list"),
    "malformed section": (KNOWEDIT_RECORD, with_changes(KNOWEDIT_RECORD, locality=["x"]),
                          "locality", "sub-type names"),
    "malformed probe": (KNOWEDIT_RECORD, with_changes(
        KNOWEDIT_RECORD, portability={"Reasoning": [{"prompt": "", "ground_truth": "x"}]}),
        "portability.Reasoning[0].prompt", "non-empty string"),
    "mend subject not in src": (MEND_RECORD, with_changes(MEND_RECORD, subject="Unifirst"),
                                "src", "does not occur"),
    "mend empty alt": (MEND_RECORD, with_changes(MEND_RECORD, alt=""), "alt", "non-empty string"),
    "mquake bad template": (MQUAKE_RECORD, with_rewrite(prompt="Hey Jude"),
                            "requested_rewrite[0].prompt", "exactly one '{}'"),
    "mquake missing target": (MQUAKE_RECORD, with_rewrite(target_new={}),
                              "requested_rewrite[0].target_new.str", "is missing"),
    "rome paraphrase not a string": (
        {"case_id": 3, "requested_rewrite": MQUAKE_RECORD["requested_rewrite"][0]},
        {"case_id": 4, "requested_rewrite": MQUAKE_RECORD["requested_rewrite"][0],
         "paraphrase_prompts": ["ok", 5]},
        "paraphrase_prompts[1]", "non-empty string"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_names_file_index_and_field(tmp_path, case):
    good, bad, field, hint = BAD_RECORDS[case]
    path = write_json(tmp_path / "bad.json", [good, good, bad])
    with pytest.raises(DatasetError) as caught:
        load_facts(path)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.path, error.index, error.field) == (path, 2, field)
    assert str(path) in str(error) and "record 2" in str(error) and repr(field) in str(error)
    assert hint in str(error)


def test_non_object_record(tmp_path):
    path = write_json(tmp_path / "bad.json", [KNOWEDIT_RECORD, "oops"])
    with pytest.raises(DatasetError, match="record 1: expected a JSON object") as caught:
        load_facts(path)
    assert (caught.value.path, caught.value.index, caught.value.field) == (path, 1, None)


def test_not_strict_skips_with_one_warning(tmp_path):
    records = [KNOWEDIT_RECORD, with_changes(KNOWEDIT_RECORD, target_new=""), KNOWEDIT_RECORD,
               with_changes(KNOWEDIT_RECORD, subject="nope"), "oops", KNOWEDIT_RECORD]
    path = write_json(tmp_path / "mixed.json", records)
    with pytest.warns(DatasetWarning) as caught:
        facts = load_facts(path, strict=False)
    assert len(facts) == 3 and [f.case_id for f in facts] == ["0", "2", "5"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 3 bad record" in message
    assert "record 1" in message and "'target_new'" in message
    with pytest.warns(DatasetWarning, match="skipped 1 bad record"):
        assert load_facts(path, strict=False, limit=2) == facts[:2]


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file") as caught:
        load_facts(tmp_path / "absent.json", strict=False)
    assert caught.value.path == tmp_path / "absent.json"


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"subject": "x",\n  "prompt": }]')
    with pytest.raises(DatasetError, match="invalid JSON at line 2") as caught:
        load_facts(path)
    assert caught.value.path == path and str(path) in str(caught.value)


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(KNOWEDIT_RECORD) + "\n{oops\n")
    with pytest.raises(DatasetError, match="invalid JSON on line 2") as caught:
        load_facts(path)
    assert caught.value.index == 1


def test_not_a_list(tmp_path):
    path = write_json(tmp_path / "object.json", {"data": [KNOWEDIT_RECORD]})
    with pytest.raises(DatasetError, match="expected a JSON list of records"):
        load_facts(path)


def test_unknown_shape(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError) as caught:
        load_facts(path)
    message = str(caught.value)
    assert "format=" in message and all(repr(name) in message for name in FORMATS)


def test_unknown_format_name(tmp_path):
    path = write_json(tmp_path / "ok.json", [KNOWEDIT_RECORD])
    with pytest.raises(DatasetError, match="unknown format 'zsre'.*'mend-zsre'"):
        load_facts(path, format="zsre")


def test_format_override(tmp_path):
    path = write_json(tmp_path / "ok.json", [KNOWEDIT_RECORD])
    assert load_facts(path, format="knowedit")[0].target_true == "Aspidoceratidae"
    with pytest.raises(DatasetError) as caught:
        load_facts(path, format="mend-zsre")
    assert (caught.value.index, caught.value.field) == (0, "src")


def test_split_with_a_plain_file(tmp_path):
    path = write_json(tmp_path / "ok.json", [KNOWEDIT_RECORD])
    with pytest.raises(DatasetError, match="already one split"):
        load_facts(path, split="train")


def test_split_in_a_directory(tmp_path):
    write_json(tmp_path / "a_train.json", [KNOWEDIT_RECORD])
    write_json(tmp_path / "a_test.json", [KNOWEDIT_RECORD, KNOWEDIT_RECORD])
    (tmp_path / "notes_test.txt").write_text("not data")
    assert len(load_facts(tmp_path, split="test")) == 2
    assert load_facts(tmp_path, split="train")[0].source == "a_train.json"
    with pytest.raises(DatasetError, match="matches no file"):
        load_facts(tmp_path, split="val")
    with pytest.raises(DatasetError, match="is a directory"):
        load_facts(tmp_path)


def test_empty_file(tmp_path):
    assert load_facts(write_json(tmp_path / "empty.json", [])) == []


def test_bad_limit(tmp_path):
    with pytest.raises(DatasetError, match="limit"):
        load_facts(write_json(tmp_path / "ok.json", [KNOWEDIT_RECORD]), limit=-1)


def test_detect_format_needs_records():
    with pytest.raises(DatasetError, match="pass format="):
        detect_format([])
