"""The generation protocol's text side: the natural stop, the normalisation and the three
scores (:mod:`intattn_analysis.answers`), and probe aliases as facts carry them.

Every case is a string with a known answer, so comparisons are exact.
"""

from __future__ import annotations

import pytest

import intattn_analysis as ia
from intattn_analysis.answers import (
    GenerationSettings,
    answer_text,
    match_answer,
    normalize_answer,
    render_prompts,
    stopped,
)
from intattn_analysis.experiments.units import aliases_digest, facts_digest


@pytest.mark.parametrize("generated, answer", [
    (" Brazil that has been making waves in the automotive industry.",
     "Brazil that has been making waves in the automotive industry"),
    ("\n\nParis.\nThe capital", "Paris"),             # leading newlines skipped, then the sentence ends
    (" Italy.\n\nThe sentence is correct", "Italy"),
    (" Washington, D.C. is a city", "Washington, D.C. is a city"),  # an initial ends no sentence
    (" Dr. Who is a series. It ran", "Dr. Who is a series"),       # nor an abbreviation
    (" 3.5 million people. More", "3.5 million people"),           # a decimal point is no stop
    (" the U.S.", "the U.S."),
    (" Noctuidae", "Noctuidae"),                      # the cap, no stop: the whole text
    ("", ""),
])
def test_the_answer_is_the_text_before_the_natural_stop(generated, answer):
    assert answer_text(generated) == answer


def test_decoding_stops_once_the_answer_has_ended():
    assert not stopped(" Paris")
    assert not stopped("\n\n")                        # nothing said yet
    assert not stopped(" Paris.")                     # the next token decides (could be "Paris.com")
    assert stopped(" Paris. It")
    assert stopped(" Paris\n")
    assert not stopped(" Washington, D. C")


def test_normalisation_is_squads():
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple a day") == "apple day"


def test_the_three_scores():
    brazil = match_answer("Brazil that has been making waves", ["Brazil"])
    assert (brazil.exact, brazil.prefix) == (0.0, 1.0)
    assert brazil.f1 == pytest.approx(2 * (1 / 6) * 1 / (1 / 6 + 1))
    assert match_answer("The Parisian", ["Paris"]).prefix == 0.0  # words, not characters
    assert match_answer("the Beatles.", ["The Beatles"]) == match_answer("Beatles", ["Beatles"])
    assert match_answer("Beatles", ["Beatles"]).exact == 1.0
    # the best alias counts, each score on its own
    aliased = match_answer("SYP", ["Syrian pound", "SYP"])
    assert (aliased.exact, aliased.prefix, aliased.f1) == (1.0, 1.0, 1.0)
    assert match_answer("", ["Paris"]) == match_answer("London", ["Paris"])


def test_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt_form"):
        GenerationSettings(prompt_form="cloze")
    assert GenerationSettings().key() == {"max_new_tokens": 32, "prompt_form": "plain",
                                          "stop": "eos,newline,sentence"}


def test_prompt_forms():
    class NoTemplate:
        chat_template = None

    assert render_prompts(NoTemplate(), ["Who wrote Hamlet?"], "plain") == ["Who wrote Hamlet?"]
    assert render_prompts(NoTemplate(), ["Who wrote Hamlet? "], "qa") == ["Q: Who wrote Hamlet?\nA:"]
    with pytest.raises(ValueError, match="chat template"):
        render_prompts(NoTemplate(), ["Who wrote Hamlet?"], "chat")


def test_probe_aliases_travel_with_facts_and_leave_the_digest_alone():
    plain = ia.Fact.from_text("The currency of Syria is", "Syria", "pound", target_true="lira",
                              portability=[("The currency of Syria is", "Syrian pound", "Reasoning")])
    aliased = ia.Fact.from_text("The currency of Syria is", "Syria", "pound", target_true="lira",
                                portability=[("The currency of Syria is", "Syrian pound", "Reasoning", ["SYP"])])
    assert aliased.portability[0].aliases == ("SYP",)
    assert ia.Fact.from_dict(aliased.to_dict()) == aliased
    assert ia.Fact.from_dict(plain.to_dict()) == plain
    # teacher-forced units (keyed by facts_digest) are the same; generation units are not
    assert facts_digest([plain]) == facts_digest([aliased])
    assert aliases_digest([plain]) != aliases_digest([aliased])
    with pytest.raises(ia.FactError, match=r"portability\[0\].aliases\[0\]"):
        ia.Fact.from_text("The currency of Syria is", "Syria", "pound", target_true="lira",
                          portability=[("The currency of Syria is", "Syrian pound", "Reasoning", [""])])


def test_a_probe_without_aliases_reads_as_before():
    assert repr(ia.Probe("p", "a", "k")) == "Probe(prompt='p', answer='a', kind='k')"
    assert repr(ia.Probe("p", "a", "k", ("b",))) == "Probe(prompt='p', answer='a', kind='k', aliases=('b',))"
