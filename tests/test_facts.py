"""Validation of the Fact record."""

from __future__ import annotations

import pytest

from intattn_analysis import Fact, FactError, Probe


def make(**fields):
    base = dict(subject="France", prompt="The capital of {} is", target_true="Paris", target_new="Rome")
    base.update(fields)
    return Fact(**base)


def test_text_fills_the_subject():
    fact = make(paraphrases=["{} has its capital in", "Its capital city is"])
    assert fact.text == "The capital of France is"
    assert fact.paraphrase_texts == ["France has its capital in", "Its capital city is"]


def test_probes_accept_pairs_and_triples():
    fact = make(neighborhood=[("The capital of Spain is", "Madrid")],
                portability=[["The capital of France is in the country of", "Italy", "Reasoning"]])
    assert fact.neighborhood == (Probe("The capital of Spain is", "Madrid", ""),)
    assert fact.portability[0].kind == "Reasoning"


def test_from_text_places_the_slot_at_the_subject():
    fact = Fact.from_text("The Eiffel Tower is in", "Eiffel Tower", "Rome", target_true="Paris")
    assert fact.prompt == "The {} is in"


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(subject=""), "subject"),
        (dict(target_new=""), "target_new"),
        (dict(target_new="   "), "target_new"),
        (dict(target_true=""), "target_true"),
        (dict(prompt="The capital is"), "prompt"),
        (dict(prompt="{} and {}"), "prompt"),
        (dict(paraphrases="{} is"), "paraphrases"),
        (dict(paraphrases=["{} {}"]), "paraphrases[0]"),
        (dict(neighborhood=[("The capital of Spain is", "")]), "neighborhood[0].answer"),
        (dict(locality=[("only a prompt",)]), "locality[0]"),
        (dict(known={"m": "yes"}), "known"),
    ],
)
def test_malformed_fields_are_named(fields, field):
    with pytest.raises(FactError) as error:
        make(**fields)
    assert error.value.field == field
    assert repr(field) in str(error.value)


def test_subject_missing_from_text_says_how_to_fix():
    with pytest.raises(FactError, match="does not occur in prompt"):
        Fact.from_text("The capital of Spain is", "France", "Rome")


def test_round_trip_and_key():
    fact = make(neighborhood=[("The capital of Spain is", "Madrid")], known={"m": True})
    again = Fact.from_dict(fact.to_dict())
    assert again == fact and again.key == fact.key
    assert make(target_new="Berlin").key != fact.key
    with pytest.raises(FactError, match="not a Fact field"):
        Fact.from_dict({**fact.to_dict(), "colour": "red"})


def test_changes_answer_flags_records_that_ask_for_no_change():
    same = Fact(subject="USA-199", prompt="What day was {} launched?", target_true="20 December 2007",
                target_new=" 20 december 2007")
    assert not same.changes_answer
    assert Fact(subject="X", prompt="{} is", target_true="a", target_new="b").changes_answer
    assert Fact(subject="X", prompt="{} is", target_true=None, target_new="b").changes_answer
