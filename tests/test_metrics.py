"""Evaluation metrics: KnowEdit, CounterFact, residue and fluency on SmolLM2-135M.

Hand-built facts check each metric against what it must be (the true answer scores 1,
an unchanged model is perfectly local, efficacy agrees with the probabilities), a
temporary weight perturbation stands in for an edit, and a few real KnowEdit ZsRE records
check that the file's sub-types come through. Batching must not change any number.

Accuracies, locality and the 0/1 CounterFact scores are ratios of small counts, exact in
float64, so they compare with ``==``; each tolerance on a probability is explained in place.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.known import greedy_continuation
from intattn_analysis.metrics import (
    METRICS,
    Evaluation,
    answer_token_ids,
    evaluate,
    greedy_generations,
    n_gram_entropy,
    score_answers,
    word_tokens,
)
from intattn_analysis.predictions import answer_probability, first_answer_token
from model_noise import noisy_mlps

FAST = ("knowedit", "counterfact", "residue")  # everything but fluency (generation)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


EIFFEL = ia.Fact(
    subject="Eiffel Tower",
    prompt="The {} is located in the city of",
    target_true="Paris",
    target_new="Rome",
    paraphrases=["Where is the {}? It stands in the city of", "The {} can be found in"],
    neighborhood=[ia.Probe("The Louvre is located in the city of", "Paris")],
    portability=[
        ia.Probe("The Eiffel Tower is in the country of", "Italy", "Reasoning"),
        ia.Probe("La tour Eiffel is located in the city of", "Rome", "Subject_Aliasing"),
    ],
    locality=[
        ia.Probe("The capital of Germany is", "Berlin", "Relation_Specificity"),
        ia.Probe("Water is made of hydrogen and", "oxygen", "Forgetfulness"),
    ],
    case_id="eiffel",
)
# target_new is the model's own (true) answer: every accuracy on it is 1.
EIFFEL_TRUE = ia.Fact(
    subject="Eiffel Tower", prompt="The {} is located in the city of",
    target_true="Paris", target_new="Paris", case_id="eiffel-true",
)
WEIRD = ia.Fact(
    subject="Eiffel Tower", prompt="The {} is located in the city of",
    target_true="Paris", target_new="Zxqvortlemberg Quasi", case_id="weird",
)
NO_TRUE = ia.Fact(
    subject="Colosseum", prompt="The {} is located in the city of",
    target_true=None, target_new="Paris", case_id="no-true",
)
HAND = [EIFFEL, EIFFEL_TRUE, WEIRD, NO_TRUE]


@pytest.fixture(scope="module")
def hand_pre(smollm2):
    return evaluate(smollm2, HAND, metrics=FAST, progress=False)


@pytest.fixture(scope="module")
def zsre_facts(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ia.load_facts(data_dir / "knowedit" / "ZsRE-test-all.json", limit=4)


# --------------------------------------------------------------------------- n-grams
def test_word_tokens_split_words_and_punctuation():
    assert word_tokens("Paris, France. It's big!") == [
        "Paris", ",", "France", ".", "It's", "big", "!"
    ]


def test_n_gram_entropy_on_hand_computed_texts():
    # "a b a b": bigrams ab x2, ba x1; trigrams aba, bab
    # (float64 logs of small rationals, computed in another order: ~1e-16 apart, so
    # pytest.approx's default rel 1e-6; one distinct n-gram gives -1 * log2(1) = 0 exactly)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # four distinct words: 3 equally likely bigrams, 2 trigrams
    assert n_gram_entropy("one two three four") == pytest.approx(
        (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    )
    assert n_gram_entropy("the the the the the") == 0.0
    assert n_gram_entropy("") == 0.0  # no n-grams contribute 0, as in ROME
    assert n_gram_entropy("x y", ns=[1], weights=[1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        n_gram_entropy("a b", ns=[2, 3], weights=[1.0])


# --------------------------------------------------------------------------- primitives
def test_answer_tokens_follow_first_answer_token(smollm2):
    ids = answer_token_ids(smollm2, "The capital of France is", "Paris")
    assert ids[0] == first_answer_token(smollm2, "Paris")
    # after a trailing space the answer carries no space of its own
    bare = answer_token_ids(smollm2, "Answer: ", "Paris")
    assert bare == smollm2.tokenizer("Paris", add_special_tokens=False)["input_ids"]


def test_scores_agree_with_a_single_unpadded_forward(smollm2):
    context, answer = EIFFEL.text, "Paris"
    (score,) = score_answers(smollm2, [(context, answer)], progress=False)
    assert len(score.answer_ids) == 1
    expected = answer_probability(smollm2, context, answer)
    # Forwards of different lengths (prompt and answer, prompt alone) differ in float32
    # summation order only: |dp| <= max|dl|/2, within 1e-5 for logit gaps under 2e-5
    # (about ten ulps at |l| ~ 30), as in the tracing tests.
    assert score.probability == pytest.approx(expected, abs=1e-5)
    # a multi-token answer: mean NLL over its tokens, by hand
    answer = "Zxqvortlemberg Quasi"
    (score,) = score_answers(smollm2, [(context, answer)], progress=False)
    prompt_ids = smollm2.tokenize(context)[0]
    answer_ids = answer_token_ids(smollm2, context, answer)
    assert len(answer_ids) > 2
    with torch.no_grad():
        logits = smollm2.bridge(torch.tensor([prompt_ids + answer_ids]))[0]
    log_probs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    nll = -float(log_probs[torch.arange(len(answer_ids)), answer_ids].mean())
    # The same forward (same ids, same shape) gives the same log-probs; only the mean differs,
    # float32 here and float64 in AnswerScore: <= k·u·mean|log p| ~ 9 × 6e-8 × 10 ~ 5e-6.
    assert score.nll == pytest.approx(nll, abs=1e-5)


def test_batched_greedy_generation_equals_greedy_continuation(smollm2):
    texts = [
        "The Eiffel Tower is located in the city of",
        "The Colosseum is located in the city of",  # same length as the first
        "The capital of Germany is",
        "Water is made of",
    ]
    batched = greedy_generations(smollm2, texts, 6, batch_size=2, progress=False)
    assert batched == [greedy_continuation(smollm2, t, 6) for t in texts]


def test_padded_scores_equal_unpadded_scores(smollm2, zsre_facts):
    """Right-padded batches (no mask, causal attention) give the unpadded scores.

    Tolerances: log-probabilities agree to 1e-5 relative and probabilities to 1e-5
    absolute. Padding changes only the shapes of the float32 matmuls, so logits move by a
    few ulps of |l| ~ 30 (~2e-6 each); a log-probability of ~-10 sums those errors over the
    softmax: measured at most 1.9e-5 absolute on 150 ZsRE probes, 2e-6 relative.
    Argmax tokens agree exactly (no near-tie among these probes).
    """
    pairs = []
    for fact in zsre_facts:
        pairs += [(fact.text, fact.target_new)]
        pairs += [(text, fact.target_new) for text in fact.paraphrase_texts]
        pairs += [(p.prompt, p.answer) for p in (*fact.portability, *fact.locality)]
    assert len({len(smollm2.tokenize(c)[0]) for c, _ in pairs}) > 2  # really padded
    padded = score_answers(smollm2, pairs, batch_size=64, progress=False)
    alone = score_answers(smollm2, pairs, padded=False, progress=False)
    for a, b in zip(padded, alone):
        assert a.answer_ids == b.answer_ids and a.predicted == b.predicted
        np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-6)
        assert a.probability == pytest.approx(b.probability, abs=1e-5)


def test_cached_generation_equals_uncached_generation(smollm2):
    """The key-value-cached loop (prompts of different lengths left-padded and masked in
    one batch) writes the tokens that full forwards write, step after step."""
    texts = [
        "The Eiffel Tower is located in the city of",
        "The capital of Germany is",
        "Water is made of",
        "In 1969 the first people to walk on the Moon were",
    ]
    assert len({len(smollm2.tokenize(t)[0]) for t in texts}) == len(texts)
    cached = greedy_generations(smollm2, texts, 12, batch_size=4, progress=False)
    uncached = greedy_generations(smollm2, texts, 12, kv_cache=False, progress=False)
    assert cached == uncached
    assert cached == [greedy_continuation(smollm2, t, 12) for t in texts]


def test_fast_evaluation_equals_the_unbatched_path(smollm2, zsre_facts, monkeypatch):
    """evaluate() with padded scoring and cached generation gives the metrics of
    same-length scoring and uncached generation: accuracies, locality and fluency rest on
    argmax tokens and are identical; probabilities agree to 1e-5 (see above)."""
    from functools import partial

    from intattn_analysis import metrics

    facts = HAND + zsre_facts[:3]
    fast = evaluate(smollm2, facts, fluency_tokens=8, progress=False)
    monkeypatch.setattr(metrics, "score_answers", partial(metrics.score_answers, padded=False))
    monkeypatch.setattr(metrics, "greedy_generations",
                        partial(metrics.greedy_generations, kv_cache=False))
    slow = evaluate(smollm2, facts, fluency_tokens=8, progress=False)
    exact = [c for c in fast.per_fact.columns
             if c.split("/")[0] in ("Edit Succ.", "Rephrase", "Portability", "Fluency",
                                    "Efficacy", "Paraphrase", "Neighborhood", "old_top1")
             or c.startswith("Residue old")]
    pd.testing.assert_frame_equal(fast.per_fact[exact], slow.per_fact[exact])
    assert list(fast.per_fact["generation"]) == list(slow.per_fact["generation"])
    close = [c for c in fast.per_fact.select_dtypes("number").columns if c not in exact]
    np.testing.assert_allclose(fast.per_fact[close].to_numpy(float),
                               slow.per_fact[close].to_numpy(float), atol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------- metrics
def test_edit_success_is_one_for_the_known_answer_and_low_for_a_weird_one(hand_pre):
    rows = hand_pre.per_fact.set_index("case_id")
    assert rows.loc["eiffel-true", "Edit Succ."] == 1.0
    assert rows.loc["weird", "Edit Succ."] < 0.5
    assert rows.loc["eiffel", "Edit Succ."] == 0.0  # the unedited model says Paris, not Rome


def test_portability_is_averaged_per_sub_type(hand_pre):
    answers = hand_pre.answers
    probes = answers[(answers.fact == 0) & (answers.role == "portability")]
    by_kind = probes.groupby("kind").accuracy.mean()
    row = hand_pre.per_fact.iloc[0]
    # float64 means of token accuracies, pandas against numpy: ~1e-16 apart, so
    # pytest.approx's default rel 1e-6
    for kind in ("Reasoning", "Subject_Aliasing"):
        assert row[f"Portability/{kind}"] == pytest.approx(by_kind[kind])
    assert row["Portability"] == pytest.approx(by_kind.mean())
    assert math.isnan(hand_pre.per_fact.iloc[1]["Portability"])  # no probes: NaN, not 0


def test_efficacy_agrees_with_the_probabilities(hand_pre):
    rows = hand_pre.per_fact.set_index("case_id")
    for case in ("eiffel", "weird"):
        row = rows.loc[case]
        assert row["Efficacy"] == float(row["p_new"] > row["p_true"])
        # exact: the same float64 subtraction of the same two probabilities
        assert row["Efficacy magnitude"] == row["p_new"] - row["p_true"]
        assert row["Efficacy"] == 0.0  # the model prefers Paris
    assert rows.loc["eiffel", "Neighborhood"] == 1.0  # the Louvre stays in Paris
    summary = hand_pre.summary
    parts = summary[["Efficacy", "Paraphrase", "Neighborhood"]].to_numpy()
    hmean = len(parts) / (1 / parts).sum() if (parts > 0).all() else 0.0
    assert summary["Score"] == pytest.approx(hmean)  # float64, 3 terms: ~1e-16, default rel 1e-6


def test_missing_fields_give_nan_and_counts(hand_pre):
    row = hand_pre.per_fact.set_index("case_id").loc["no-true"]
    for column in ("Efficacy", "Efficacy magnitude", "Paraphrase", "Rephrase",
                   "Residue p(true) pre", "Neighborhood"):
        assert math.isnan(row[column]), column
    assert not math.isnan(row["Edit Succ."])
    counts = hand_pre.counts
    assert counts["Edit Succ."] == 4
    assert counts["Efficacy"] == 3
    assert counts["Rephrase"] == 1
    assert counts["Neighborhood"] == 1
    assert counts["Locality"] == 0 and math.isnan(hand_pre.summary["Locality"])  # no pre


def test_unchanged_model_is_perfectly_local_and_keeps_its_residue(smollm2, hand_pre):
    post = evaluate(smollm2, HAND, pre=hand_pre, metrics=FAST, progress=False)
    assert post.with_pre
    row = post.per_fact.iloc[0]
    assert row["Locality"] == 1.0
    assert row["Locality/Relation_Specificity"] == 1.0
    assert row["Locality/Forgetfulness"] == 1.0
    for column in ("Residue p(true) pre", "Residue p(true) post",
                   "Residue old top-1 pre", "Residue old top-1 post"):
        assert column in post.summary.index
    # exact: the same requests in the same batches on unchanged weights
    assert row["Residue p(true) post"] == row["Residue p(true) pre"]
    assert row["Residue old top-1 pre"] == 1.0  # the model answers Paris
    assert math.isnan(hand_pre.per_fact.iloc[0]["Residue p(true) post"])


def test_pre_values_are_reused_not_recomputed(smollm2, hand_pre):
    tampered = Evaluation(**{**hand_pre.__dict__, "per_fact": hand_pre.per_fact.copy()})
    tampered.per_fact["p_true"] = 0.125
    tampered.locality_predictions = [
        [tuple(-1 for _ in tokens) for tokens in fact] for fact in hand_pre.locality_predictions
    ]
    post = evaluate(smollm2, HAND, pre=tampered, metrics=FAST, progress=False)
    assert (post.per_fact["Residue p(true) pre"] == 0.125).all()
    assert post.summary["Locality"] == 0.0  # compared with the (tampered) pre tokens


def test_a_perturbed_model_changes_locality_and_residue(smollm2):
    facts = [EIFFEL]
    pre = evaluate(smollm2, facts, metrics=FAST, progress=False)
    with noisy_mlps(smollm2):
        post = evaluate(smollm2, facts, pre=pre, metrics=FAST, progress=False)
    row = post.per_fact.iloc[0]
    assert row["Locality"] < 1.0
    # Noise of std 0.5, far above the weights' own size, wrecks these layers; float32
    # rounding moves a probability by ~1e-6 at most, so a change above 1e-3 is the weights'.
    assert row["Residue p(true) post"] != pytest.approx(row["Residue p(true) pre"], abs=1e-3)
    assert row["Residue p(true) pre"] == pre.per_fact.iloc[0]["p_true"]  # copied: exact


def test_batch_size_does_not_change_any_number(smollm2, zsre_facts):
    facts = HAND + zsre_facts[:2]
    one = evaluate(smollm2, facts, batch_size=1, fluency_tokens=3, progress=False)
    eight = evaluate(smollm2, facts, batch_size=8, fluency_tokens=3, progress=False)
    assert list(one.per_fact.columns) == list(eight.per_fact.columns)
    numbers = one.per_fact.select_dtypes("number").columns
    assert "Fluency" in numbers and "Edit Succ." in numbers
    # 1 or 8 rows per forward (right-padded to the longest) change only the float32
    # summation order (see test_padded_scores_equal_unpadded_scores). Probabilities move by <= max|dl|/2 and magnitudes (differences of two)
    # by <= max|dl|, within 1e-5 for logit gaps under 1e-5 (~5 ulps at |l| ~ 30; seen:
    # 1.5e-6); accuracies and fluency rest on argmax tokens and agree exactly.
    np.testing.assert_allclose(
        one.per_fact[numbers].to_numpy(float), eight.per_fact[numbers].to_numpy(float),
        atol=1e-5, equal_nan=True,
    )
    assert list(one.per_fact["generation"]) == list(eight.per_fact["generation"])
    second = evaluate(smollm2, facts, pre=one, batch_size=8, metrics=FAST, progress=False)
    assert (second.per_fact["Locality"].dropna() == 1.0).all()


def test_knowedit_zsre_records_give_sub_type_columns(smollm2, zsre_facts):
    pre = evaluate(smollm2, zsre_facts, metrics=FAST, progress=False)
    post = evaluate(smollm2, zsre_facts, pre=pre, metrics=FAST, progress=False)
    kinds = {p.kind for f in zsre_facts for p in f.portability}
    assert kinds  # the first records have portability probes
    for kind in kinds:
        assert f"Portability/{kind}" in post.summary.index
    assert "Locality/Relation_Specificity" in post.summary.index
    assert post.summary["Locality"] == 1.0
    assert list(post.per_fact["case_id"]) == [f.case_id for f in zsre_facts]
    for name in ("Edit Succ.", "Rephrase", "Portability", "Efficacy", "Paraphrase"):
        assert 0.0 <= post.summary[name] <= 1.0
    assert math.isnan(post.summary["Neighborhood"]) and post.counts["Neighborhood"] == 0


def test_fluency_scores_the_prompt_and_its_generation(smollm2):
    result = evaluate(smollm2, [EIFFEL], metrics="fluency", fluency_tokens=5, progress=False)
    row = result.per_fact.iloc[0]
    assert row["generation"] == greedy_continuation(smollm2, EIFFEL.text, 5)
    # exact: the same function of the same text
    assert row["Fluency"] == n_gram_entropy(EIFFEL.text + row["generation"])
    assert list(result.summary.index) == ["Fluency"]


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(smollm2, hand_pre):
    with pytest.raises(ValueError, match="facts is empty"):
        evaluate(smollm2, [], progress=False)
    with pytest.raises(TypeError, match="single Fact"):
        evaluate(smollm2, EIFFEL, progress=False)
    broken = ia.Fact(subject="Eiffel Tower", prompt="The {} is in", target_true=None,
                     target_new="x")
    object.__setattr__(broken, "target_new", "")
    with pytest.raises(ValueError, match=r"facts\[1\]\.target_new"):
        evaluate(smollm2, [EIFFEL, broken], progress=False)
    with pytest.raises(ValueError, match="unknown metric 'efficacy'.*knowedit"):
        evaluate(smollm2, [EIFFEL], metrics=("knowedit", "efficacy"), progress=False)
    with pytest.raises(ValueError, match="metrics is empty"):
        evaluate(smollm2, [EIFFEL], metrics=(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(smollm2, [EIFFEL], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="fluency_tokens"):
        evaluate(smollm2, [EIFFEL], fluency_tokens=0, progress=False)
    with pytest.raises(ValueError, match="4 facts, but 3"):
        evaluate(smollm2, HAND[:3], pre=hand_pre, metrics=FAST, progress=False)
    with pytest.raises(ValueError, match=r"different facts: facts\[1\]"):
        evaluate(smollm2, [EIFFEL, WEIRD, EIFFEL_TRUE, NO_TRUE], pre=hand_pre, metrics=FAST,
                 progress=False)
    knowedit_only = evaluate(smollm2, [EIFFEL], metrics="knowedit", progress=False)
    with pytest.raises(ValueError, match="'residue'"):
        evaluate(smollm2, [EIFFEL], pre=knowedit_only, metrics=FAST, progress=False)
    with pytest.raises(TypeError, match="pre must be an Evaluation"):
        evaluate(smollm2, [EIFFEL], pre=hand_pre.summary, metrics=FAST, progress=False)
    assert set(METRICS) == {"knowedit", "counterfact", "residue", "fluency"}
