"""Running the tests leaves the checkout as it was: the session's figures folder is a
temporary one, and the session's check of the checkout sees changed, added and deleted
files, but not ignored ones."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest_checkout", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_session_writes_figures_outside_the_checkout():
    from intattn_analysis import plots

    assert ROOT not in plots.figures_dir().resolve().parents
    assert plots.results_dir().resolve() == ROOT / "figures"  # the committed results are still read
    for name in _root_conftest().SEEDED_FIGURES:
        assert (plots.figures_dir() / name).read_bytes() == (ROOT / "figures" / name).read_bytes()


def test_the_checkout_state_sees_what_a_test_would_leave(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / ".gitignore").write_text("cache/\n")
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("b")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    state = _root_conftest().checkout_state
    before = state(tmp_path)
    assert before == {}
    (tmp_path / "kept.txt").write_text("changed")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "figure.png").write_bytes(b"new")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ignored.bin").write_bytes(b"x")
    after = state(tmp_path)
    assert set(after) == {"kept.txt", "gone.txt", "figure.png"}
    assert after["gone.txt"] == "absent"
    # a file already changed before the session counts when the session changes it again
    (tmp_path / "kept.txt").write_text("changed again")
    assert state(tmp_path)["kept.txt"] != after["kept.txt"]


def test_the_checkout_state_of_a_subfolder_and_of_a_rename(tmp_path):
    """The package may sit in a folder of a larger repository: the paths git reports are
    the top's, and only the folder's files count. A staged rename names its new path (its
    old path follows as an entry of its own, not a file of the state)."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    package = tmp_path / "package"
    package.mkdir()
    (package / "a.txt").write_text("a")
    (tmp_path / "outside.txt").write_text("o")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    state = _root_conftest().checkout_state
    assert state(package) == {}
    (tmp_path / "outside.txt").write_text("changed outside")
    subprocess.run([*git, "mv", "package/a.txt", "package/b.txt"], check=True)
    after = state(package)
    assert set(after) == {"package/b.txt"}
    assert after["package/b.txt"] == hashlib.sha256(b"a").hexdigest()


def test_outside_a_checkout_there_is_nothing_to_check(tmp_path):
    assert _root_conftest().checkout_state(tmp_path) is None
