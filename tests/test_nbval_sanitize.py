"""The nbval sanitising rules: numbers that differ only beyond 3 significant digits
compare equal; numbers that differ within them, integers and words do not change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nbval.plugin import get_sanitize_patterns

RULES = get_sanitize_patterns((Path(__file__).parent / "nbval_sanitize.cfg").read_text())


def sanitize(text: str) -> str:
    for regex, replace in RULES:
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("5.094e-04", "5.095e-04"),  # notebook 01 on two machines
        ("<td>2.544e-02</td>", "<td>2.545e-02</td>"),
        ("0.02545", "0.02544"),
        ("0.12345678", "0.12349999"),
        ("3.14159", "3.14170"),
        ("91.63", "91.67"),
        ("1234.5678", "1234.1"),
        ("-0.000", "0.000"),
        ("alpha 0.05531, 0.04634", "alpha 0.05539, 0.04637"),
    ],
)
def test_differences_beyond_three_digits_vanish(committed, fresh):
    assert sanitize(committed) == sanitize(fresh)


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("5.09e-04", "5.10e-04"),
        ("0.0254", "0.0264"),
        ("91.6", "91.7"),
        ("1261 editable", "1262 editable"),
        ("layers 3-5", "layers 3-6"),
        ("0.5", "-0.5"),
        ("1234.5", "1235.5"),
    ],
)
def test_differences_within_three_digits_remain(committed, fresh):
    assert sanitize(committed) != sanitize(fresh)


def test_words_and_versions_are_left_alone():
    for text in ("w10 w11", "transformer-lens 4.3.0", "smollm2-135m@b179c9523d0e6a0f", "layer3.5"):
        assert sanitize(text) == text
