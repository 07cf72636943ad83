"""The cached known flag (:func:`intattn_analysis.known.is_known_cached`)."""

from __future__ import annotations

import intattn_analysis as ia
from intattn_analysis.known import is_known, is_known_cached


def test_the_cached_flag_is_the_checked_one_and_is_read_back(tiny_llama, tmp_path, monkeypatch):
    facts = ia.load_facts("builtin")[:3]
    flags = [is_known_cached(tiny_llama, fact, tmp_path) for fact in facts]
    assert flags == [is_known(tiny_llama, fact)[0] for fact in facts]
    assert len(list(tmp_path.rglob("known-*.json"))) == 3

    def decode_again(*args, **kwargs):
        raise AssertionError("a cached flag was decoded again")

    monkeypatch.setattr("intattn_analysis.known.is_known", decode_again)
    assert [is_known_cached(tiny_llama, fact, tmp_path) for fact in facts] == flags
