"""The built-in fact set: its size and shape, and that its `known` flags are honest."""

from __future__ import annotations

import random
from collections import Counter

import pytest

import intattn_analysis as ia
from intattn_analysis.known import is_known


@pytest.fixture(scope="module")
def facts():
    return ia.load_facts("builtin")


def test_size_and_relations(facts):
    assert len(facts) >= 300
    relations = Counter(f.relation for f in facts)
    assert len(relations) >= 12, relations
    assert all(f.source == "builtin" for f in facts)
    assert len({f.key for f in facts}) == len(facts), "duplicate facts"


def test_every_fact_has_its_probes(facts):
    for fact in facts:
        assert fact.target_true and fact.target_new != fact.target_true, fact
        assert len(fact.paraphrases) >= 2, fact
        assert len(fact.neighborhood) >= 3, fact
        assert len(fact.portability) >= 1, fact
        # neighbourhood prompts are about other subjects, with their own answers
        for probe in fact.neighborhood:
            assert fact.subject not in probe.prompt, (fact, probe)


def test_flags_exist_for_both_embedded_models(facts):
    for name in ia.EMBEDDED_MODELS:
        assert all(name in f.known for f in facts), name
    assert sum(f.known["smollm2-135m"] for f in facts) >= 200


def test_smollm2_flags_are_honest(smollm2, facts):
    """Every stored flag equals a fresh greedy decode."""
    wrong = [f for f in facts if is_known(smollm2, f)[0] != f.known[smollm2.name]]
    assert not wrong, [str(f) for f in wrong[:5]]


def test_gemma_flags_are_honest_on_a_sample(gemma3, facts):
    sample = random.Random(0).sample(facts, 60)
    wrong = [f for f in sample if is_known(gemma3, f)[0] != f.known[gemma3.name]]
    assert not wrong, [str(f) for f in wrong[:5]]
