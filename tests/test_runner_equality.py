"""Every experiment's units, run through the one runner, give the rows the separate unit
loops gave before it (``tests/data/runner_rows.json``, see ``runner_cases.py``).

The comparison covers each unit's key (exactly, so the stores already written are read
as they are, not recomputed), its file label, its row labels and every value; floats to
1e-6 relative, since the stored rows were made on one machine and another CPU may round
float32 sums differently in the last bits. The in-memory runs of ``intattn evaluate``
and notebook 03 (``ia.edit_batches``) are compared by their tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner_cases import differences, row_sets

pytestmark = pytest.mark.usefixtures("one_thread")

STORED = Path(__file__).parent / "data" / "runner_rows.json"


@pytest.fixture(scope="module")
def computed(tiny_llama, tmp_path_factory):
    return row_sets(tiny_llama, tmp_path_factory.mktemp("runner"))


@pytest.mark.parametrize("case", ["alpha-settings", "editors", "batch-scaling", "sequential", "outdated",
                                  "edit_batches"])
def test_each_experiments_units_are_the_rows_stored_before(computed, case):
    stored = json.loads(STORED.read_text())[case]
    found = differences(computed[case], stored, case)
    assert not found, f"{len(found)} differences, first: {found[:8]}"
