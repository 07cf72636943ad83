"""The cached known flag (:func:`intattn_analysis.known.is_known_cached`)."""

from __future__ import annotations

import intattn_analysis as ia
from intattn_analysis.known import is_known_cached


def test_the_cached_flag_is_the_checked_one_and_is_read_back(tiny_llama, tmp_path, monkeypatch):
    import intattn_analysis.known as known

    facts = ia.load_facts("builtin")[:3]
    # a tiny random model knows nothing: let the check say yes for the second fact, so
    # that a cache storing (or returning) one constant would be seen
    real = known.is_known
    monkeypatch.setattr(known, "is_known", lambda model, fact: (True, " yes") if fact is facts[1] else real(model, fact))
    flags = [is_known_cached(tiny_llama, fact, tmp_path) for fact in facts]
    assert flags == [False, True, False] == [known.is_known(tiny_llama, fact)[0] for fact in facts]
    assert len(list(tmp_path.rglob("known-*.json"))) == 3

    def decode_again(*args, **kwargs):
        raise AssertionError("a cached flag was decoded again")

    monkeypatch.setattr("intattn_analysis.known.is_known", decode_again)
    assert [is_known_cached(tiny_llama, fact, tmp_path) for fact in facts] == flags
