"""The notebook comparison: nbval's, then, where it fails, the same text with the floats
masked and the floats compared at the stated precision (``conftest.floats_agree``)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbval.plugin import IPyNbCell, get_sanitize_patterns, nocolors


def _root_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


floats_agree = _root_conftest().floats_agree


@pytest.mark.parametrize("a, b", [
    ("0.5496", "0.5499"),  # a balance factor from tiny effects, on two thread counts
    ("0.6370", "0.6369"),  # either side of a rounding boundary
    ("91.6", "91.7"),  # one unit of the last printed digit
    ("5.094e-04", "5.095e-04"),
    ("1.0000", "1.0000"),
])
def test_printed_floats_that_agree(a, b):
    assert floats_agree(a, b) and floats_agree(b, a)


@pytest.mark.parametrize("a, b", [
    ("0.5496", "0.5526"),  # 3e-3: more than the display's rounding and 1e-3 relative
    ("91.6", "91.8"),
    ("5.094e-04", "5.194e-04"),
    ("0.00", "0.02"),
])
def test_printed_floats_that_differ(a, b):
    assert not floats_agree(a, b)


def _cell():
    """An nbval cell object with this project's sanitize rules, detached from a run."""
    rules = get_sanitize_patterns((Path(__file__).parent / "nbval_sanitize.cfg").read_text())
    cell = object.__new__(IPyNbCell)
    cell.parent = SimpleNamespace(skip_compare=("metadata", "execution_count"),
                                  sanitize_patterns=OrderedDict(rules))
    cell.colors = nocolors
    # nbval's diff report needs a pytest session; a plain note is enough here
    cell.format_output_compare = lambda key, ref, test: cell.comparison_traceback.append(key)
    return cell


def _output(text: str, html: str = ""):
    data = {"text/plain": text}
    if html:
        data["text/html"] = html
    return nbformat.v4.new_output("execute_result", data=data, execution_count=1)


def test_boundary_values_pass_and_real_changes_fail():
    cell = _cell()
    ref = [_output("alpha [0.163, 0.514, 0.776, 0.692, 0.549]", "<td>0.6370</td>")]
    same = [_output("alpha [0.163, 0.514, 0.776, 0.692, 0.55]", "<td>0.6369</td>")]
    assert cell.compare_outputs(same, ref)
    moved = [_output("alpha [0.163, 0.514, 0.776, 0.692, 0.61]", "<td>0.6369</td>")]
    assert not cell.compare_outputs(moved, ref)
    assert cell.comparison_traceback  # the failure is reported
    other_text = [_output("alpha [0.163, 0.514, 0.776, 0.692, 0.55] layers 3-6", "<td>0.6369</td>")]
    assert not cell.compare_outputs(other_text, ref)
    counts = [_output("1262 editable", "")]
    assert not cell.compare_outputs(counts, [_output("1261 editable", "")])  # integers exactly


def _bar(desc: str, model_id: str):
    return nbformat.v4.new_output("display_data", data={
        "text/plain": f"{desc}:   0%|          | 0/3 [00:00<?, ?it/s]",
        "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": model_id}})


def test_progress_widgets_are_not_compared_and_everything_else_is():
    """A cold cache draws a bar a warm one does not (second moments computed, not read):
    widgets are left out on both sides, the cell's results are still compared."""
    cell = _cell()
    ref = [_bar("key moments", "a" * 32), _output("Edit Succ. 0.91")]
    assert cell.compare_outputs([_output("Edit Succ. 0.91")], ref)
    assert cell.compare_outputs([_bar("targets", "b" * 32), _bar("edit", "c" * 32), _output("Edit Succ. 0.91")], ref)
    assert not cell.compare_outputs([_bar("targets", "b" * 32), _output("Edit Succ. 0.87")], ref)
