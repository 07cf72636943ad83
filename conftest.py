"""The test tiers, for every test and notebook cell pytest collects from here down.

Every test belongs to one tier, chosen from what it uses, so that ``pytest -m TIER``
selects it whichever paths are named:

* ``unit``: pure functions and tiny randomly initialised models (seconds in all);
* ``models``: tests that load an embedded model (SmolLM2-135M, Gemma-3-270M);
* ``notebooks``: nbval over ``notebooks/`` (each cell of each notebook).

A test that loads an embedded model without one of the fixtures below carries
``@pytest.mark.models`` itself. The session ends with one line giving each tier's time.

Running the tests leaves the checkout as it was: the notebooks write their figures and
CSVs to a temporary folder (``INTATTN_FIGURES``), and a session that changes a file git
tracks, or adds one it does not ignore, fails with the files named.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

# one float path on every x86-64 machine, for this process and the notebook kernels it
# starts (they inherit the environment): see intattn_analysis/numerics.py
from intattn_analysis.numerics import pin_cpu_numerics  # noqa: E402

pin_cpu_numerics()

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
    _report_changed(terminalreporter)


# --------------------------------------------------------------------------- notebook numbers
#: A float as a notebook prints it: fixed point or scientific, not part of a word.
FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d+(?:[eE][+-]?\d+)?(?![\w.])|(?<![\w.])-?\d+[eE][+-]?\d+(?![\w.])")
#: Two printed floats agree when they differ by at most this relative amount, or by one
#: unit in the last digit printed (the display's own rounding). Float32 forwards under
#: another BLAS or thread count move a probability by ~1e-7; a ratio or difference of small
#: averages (an attention share, a balance factor from tiny effects) can move by ~1e-4 of
#: its value. Integers (counts, layers, token ids) must match exactly.
FLOAT_RTOL = 1e-3


def _last_digit_unit(text: str) -> float:
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def floats_agree(a: str, b: str) -> bool:
    """Whether two printed floats agree (see :data:`FLOAT_RTOL`)."""
    x, y = float(a), float(b)
    if x == y:
        return True
    tolerance = max(FLOAT_RTOL * max(abs(x), abs(y)), max(_last_digit_unit(a), _last_digit_unit(b)))
    return abs(x - y) <= tolerance * (1 + 1e-9)


def _masked(outputs, found: list[str]):
    """A copy of a cell's outputs with every printed float replaced by a marker; the floats
    go to ``found``, in order."""
    def mask(value):
        if isinstance(value, str):
            found.extend(FLOAT.findall(value))
            return FLOAT.sub("<float>", value)
        if isinstance(value, list):
            return [mask(v) for v in value]
        if isinstance(value, dict):  # sorted, so that both sides list their floats alike
            return type(value)({k: mask(value[k]) for k in sorted(value)})
        return value

    return [mask(output) for output in outputs]


#: The mime type of a widget's view (a progress bar, in these notebooks).
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _without_widgets(outputs):
    """A cell's outputs less its widgets. A widget's state lives in the kernel; its output
    holds only a random model id (which nbval skips) and a text form, which for a progress
    bar is the bar as it started. How many bars a cell draws depends on the caches (second
    moments computed or read, targets solved or read), so bars are progress, not results,
    and are not compared; every other output is."""
    return [output for output in outputs if WIDGET_VIEW not in output.get("data", {})]


def _tolerant_compare_outputs(original):
    """nbval's comparison of a cell's outputs less its widgets (:func:`_without_widgets`),
    and where it fails, a second one in which the text must match exactly with the floats
    masked, and the floats must agree pairwise (:func:`floats_agree`). The sanitize file's
    3-digit cut handles most numbers; this handles the ones that sit on a digit boundary."""
    def compare_outputs(self, test, ref, skip_compare=None):
        test, ref = _without_widgets(test), _without_widgets(ref)
        if original(self, test, ref, skip_compare):
            return True
        failure = self.comparison_traceback
        test_floats, ref_floats = [], []
        if (original(self, _masked(test, test_floats), _masked(ref, ref_floats), skip_compare)
                and len(test_floats) == len(ref_floats)
                and all(floats_agree(a, b) for a, b in zip(test_floats, ref_floats))):
            self.comparison_traceback = []
            return True
        self.comparison_traceback = failure
        return False

    return compare_outputs


# --------------------------------------------------------------------------- a clean checkout
#: Files the notebooks read from ``figures/`` that an earlier notebook writes: the temporary
#: figures folder starts with the committed copies, so that one notebook runs on its own.
SEEDED_FIGURES = ("02_balance.json",)


def checkout_state(root: Path) -> dict[str, str] | None:
    """``{path: content hash}`` of every file ``git status`` reports (changed, added,
    deleted or untracked and not ignored) under ``root``; ``None`` outside a git checkout."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                             check=True).stdout.decode().strip()
        # porcelain paths are relative to the top of the repository, whatever the cwd
        listed = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all", "--", "."],
                                cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    state = {}
    entries = iter(listed.split(b"\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        if b"R" in entry[:2] or b"C" in entry[:2]:
            next(entries, None)  # a rename or copy: its source path follows as an entry of its own
        path = entry[3:].decode("utf-8", "surrogateescape")
        file = Path(top) / path
        state[path] = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "absent"
    return state


def _redirect_figures(config) -> None:
    """Point ``INTATTN_FIGURES`` (inherited by the notebook kernels nbval starts) at a
    temporary folder, unless it is set already."""
    if os.environ.get("INTATTN_FIGURES"):
        return
    folder = Path(tempfile.mkdtemp(prefix="intattn-figures-"))
    for name in SEEDED_FIGURES:
        if (ROOT / "figures" / name).is_file():
            shutil.copy2(ROOT / "figures" / name, folder / name)
    os.environ["INTATTN_FIGURES"] = str(folder)
    config._intattn_figures = folder


def pytest_unconfigure(config):
    folder = getattr(config, "_intattn_figures", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("INTATTN_FIGURES", None)


def pytest_sessionstart(session):
    session.config._intattn_checkout = checkout_state(ROOT)


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_intattn_checkout", None)
    after = checkout_state(ROOT) if before is not None else None
    if after is None:
        return
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    session.config._intattn_changed = changed
    if changed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _report_changed(terminalreporter) -> None:
    if getattr(terminalreporter.config, "_intattn_checkout", {}) is None:
        terminalreporter.write_line("the clean-checkout check did not run: `git status` failed here")
        return
    changed = getattr(terminalreporter.config, "_intattn_changed", None)
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        terminalreporter.write_line(
            f"FAILED: the tests changed {len(changed)} file(s) of the checkout: {shown}. A test or notebook "
            "must write under a temporary folder (notebooks: plots.figures_dir(), which the session "
            "points at one)", red=True)


def pytest_configure(config):
    _redirect_figures(config)
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: no notebooks to compare
        return
    if not getattr(IPyNbCell.compare_outputs, "_tolerant", False):
        IPyNbCell.compare_outputs = _tolerant_compare_outputs(IPyNbCell.compare_outputs)
        IPyNbCell.compare_outputs._tolerant = True
