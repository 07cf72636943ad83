"""The test tiers, for every test and notebook cell pytest collects from here down.

Every test belongs to one tier, chosen from what it uses, so that ``pytest -m TIER``
selects it whichever paths are named:

* ``unit``: pure functions and tiny randomly initialised models (seconds in all);
* ``models``: tests that load an embedded model (SmolLM2-135M, Gemma-3-270M);
* ``notebooks``: nbval over ``notebooks/`` (each cell of each notebook).

A test that loads an embedded model without one of the fixtures below carries
``@pytest.mark.models`` itself. The session ends with one line giving each tier's time.
"""

from __future__ import annotations

import pytest

TIERS = ("unit", "models", "notebooks")
#: Fixtures that load an embedded model: a test that uses one is in the ``models`` tier.
MODEL_FIXTURES = {"smollm2", "gemma3", "embedded"}
#: The tier of each collected test, by node id (filled at collection).
_TIER_OF: dict[str, str] = {}


def _uses_a_model(item) -> bool:
    """Whether a test asks for a model fixture, directly or as a parameter that it looks
    up with ``request.getfixturevalue``."""
    if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v in MODEL_FIXTURES for v in params.values())


def _tier(item) -> str:
    marked = next((t for t in TIERS if item.get_closest_marker(t)), None)
    if marked is not None:
        return marked
    if str(getattr(item, "path", "")).endswith(".ipynb"):
        return "notebooks"
    return "models" if _uses_a_model(item) else "unit"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier(item)
        item.add_marker(getattr(pytest.mark, tier))
        _TIER_OF[item.nodeid] = tier


def pytest_terminal_summary(terminalreporter):
    """Each tier's time: setup, call and teardown of its tests."""
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            tier = _TIER_OF.get(getattr(report, "nodeid", None))
            if tier is None or not hasattr(report, "duration"):
                continue
            seconds[tier] = seconds.get(tier, 0.0) + report.duration
            counts[tier] = counts.get(tier, 0) + (report.when == "call")
    if seconds:
        parts = [f"{t} {seconds[t]:.0f} s ({counts[t]} tests)" for t in TIERS if t in seconds]
        terminalreporter.write_line("time per tier: " + ", ".join(parts))
