"""The generation protocol on SmolLM2-135M: ``evaluate(..., protocol=...)``.

Hand-built facts whose greedy answers are known (" Paris, France." after "The Eiffel
Tower is located in the city of") check each score; the unedited model against itself
keeps every locality answer; ``"both"`` is exactly the two single protocols; the stop rule
cuts the same greedy continuation that an uncut decoding gives. Scores are 0/1 shares of
small counts, exact in float64, so they compare with ``==``.
"""

from __future__ import annotations

import pandas as pd
import pytest

import intattn_analysis as ia
from intattn_analysis.answers import answer_text, stopped
from intattn_analysis.metrics import evaluate, greedy_generations

from model_noise import noisy_mlps
from test_metrics import EIFFEL, HAND

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

SETS = ("knowedit", "residue")


@pytest.fixture(scope="module")
def generated_pre(smollm2):
    return evaluate(smollm2, HAND, metrics=SETS, protocol="generation", progress=False)


def test_the_stop_cuts_the_greedy_continuation(smollm2):
    texts = [EIFFEL.text, "The Colosseum is located in the city of", *[p.prompt for p in EIFFEL.locality]]
    whole = greedy_generations(smollm2, texts, 32, progress=False)
    cut = greedy_generations(smollm2, texts, 32, progress=False, stop=stopped)
    for long, short in zip(whole, cut):
        assert long.startswith(short)
        assert answer_text(long) == answer_text(short)
    assert [answer_text(t) for t in cut] == ["Paris, France", "Rome, Italy", "Berlin",
                                             "helium, with a mass of approximately 1.008 times that of a proton"]
    assert len(cut[1]) < len(whole[1])  # " Rome, Italy. It" stops; the whole runs on to the cap


def test_scores_are_what_the_model_says(generated_pre):
    rows = generated_pre.per_fact.set_index("case_id")
    # " Paris, France." is not "Paris", but begins with it
    assert rows.loc["eiffel-true", ["Edit Succ.", "Edit Succ. prefix"]].tolist() == [0.0, 1.0]
    assert rows.loc["eiffel-true", "Edit Succ. F1"] == pytest.approx(2 / 3)
    assert rows.loc["weird", ["Edit Succ.", "Edit Succ. prefix", "Edit Succ. F1"]].tolist() == [0.0, 0.0, 0.0]
    assert rows.loc["eiffel", "answer"] == "Paris, France"
    assert rows.loc["eiffel", "answers"]["locality"][0] == "Berlin"
    # residue: the answer still begins with the true answer; no target_true, no value
    assert rows.loc["eiffel", "Residue old top-1 pre"] == 1.0
    assert pd.isna(rows.loc["no-true", "Residue old top-1 pre"])
    assert "Residue p(true) pre" not in rows.columns
    answers = generated_pre.answers
    assert {"generated", "answer_text", "exact", "prefix", "f1", "aliases"} <= set(answers.columns)
    assert generated_pre.protocol == "generation"


def test_the_unedited_model_keeps_every_locality_answer(smollm2, generated_pre):
    again = evaluate(smollm2, HAND, pre=generated_pre, metrics=SETS, protocol="generation", progress=False)
    assert again.per_fact["Locality"].dropna().tolist() == [1.0]
    assert again.per_fact["Residue old top-1 post"].equals(again.per_fact["Residue old top-1 pre"])
    without_pre = generated_pre.per_fact["Locality"]
    assert without_pre.isna().all()  # not measured, never 1.0


def test_a_changed_answer_is_not_kept(smollm2, generated_pre):
    """Noise in four MLP layers changes answers: Locality is the
    share of locality answers that stayed the same, and drops below 1."""
    with noisy_mlps(smollm2):
        post = evaluate(smollm2, HAND, pre=generated_pre, metrics=SETS, protocol="generation", progress=False)
    before, after = generated_pre.locality_predictions[0], post.locality_predictions[0]
    kept = [float(a == b) for a, b in zip(after, before)]
    assert post.per_fact.loc[0, "Locality"] == sum(kept) / len(kept) < 1.0


def test_both_is_the_two_protocols(smollm2, generated_pre):
    forced = evaluate(smollm2, HAND, metrics=SETS, progress=False)
    both = evaluate(smollm2, HAND, metrics=SETS, protocol="both", progress=False)
    assert isinstance(both, ia.Evaluations) and list(both) == ["teacher-forced", "generation"]
    pd.testing.assert_frame_equal(both["teacher-forced"].per_fact, forced.per_fact)
    pd.testing.assert_frame_equal(both["generation"].per_fact, generated_pre.per_fact)
    assert both.per_fact["protocol"].tolist() == ["teacher-forced"] * 4 + ["generation"] * 4
    table = both.table()
    assert table[("generation", "mean")]["Edit Succ. prefix"] == generated_pre.summary["Edit Succ. prefix"]
    assert pd.isna(table[("teacher-forced", "mean")]["Edit Succ. prefix"])
    # a "both" evaluation serves as pre for either protocol, and select keeps both
    post = evaluate(smollm2, HAND, pre=both, metrics=SETS, protocol="generation", progress=False)
    assert post.per_fact["Locality"].dropna().tolist() == [1.0]
    assert both.select([0])["generation"].per_fact["case_id"].tolist() == ["eiffel"]


def test_bad_protocol_arguments_are_refused_by_name(smollm2, generated_pre):
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(smollm2, HAND, protocol="free", progress=False)
    with pytest.raises(ValueError, match="'counterfact'.*no generation form"):
        evaluate(smollm2, HAND, metrics=("knowedit", "counterfact"), protocol="generation", progress=False)
    with pytest.raises(ValueError, match="pre was computed under protocol='generation'"):
        evaluate(smollm2, HAND, pre=generated_pre, metrics=SETS, progress=False)
    with pytest.raises(TypeError, match="GenerationSettings"):
        evaluate(smollm2, HAND, protocol="generation", generation={"max_new_tokens": 8}, progress=False)


def test_the_chat_form_asks_as_a_user_turn(smollm2):
    settings = ia.GenerationSettings(max_new_tokens=12, prompt_form="chat")
    chat = evaluate(smollm2, [EIFFEL], metrics=("knowedit",), protocol="generation", generation=settings,
                    progress=False)
    plain = evaluate(smollm2, [EIFFEL], metrics=("knowedit",), protocol="generation",
                     generation=ia.GenerationSettings(max_new_tokens=12), progress=False)
    assert chat.answers["generated"].tolist() != plain.answers["generated"].tolist()
    assert chat.answers["prompt"].tolist() == plain.answers["prompt"].tolist()  # the probe, not its rendering
