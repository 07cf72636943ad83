"""Every experiment's units, run through the runner, give the rows the code that wrote the
committed store gave (``tests/data/runner_rows.json``, see ``runner_cases.py``).

The comparison covers each unit's key (exactly, so the stores already written are read
as they are, not recomputed), its file label, its row labels, the names of its timing
columns and every value; floats to
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
                                  "localization", "edit_batches"])
def test_each_experiments_units_are_the_rows_stored_before(computed, case):
    stored = json.loads(STORED.read_text())[case]
    found = differences(computed[case], stored, case)
    assert not found, f"{len(found)} differences, first: {found[:8]}"


# ------------------------------------------------------------------ the paper store
PAPER_STORE = Path(__file__).resolve().parents[1] / "figures" / "paper" / "store"


def _missing(store_name: str, cells) -> list[str]:
    from intattn_analysis.experiments.store import ResultStore

    store = ResultStore(PAPER_STORE, store_name)
    return [unit.label for cell in cells for unit in cell.units.values() if not store.has(unit.key, unit.label)]


@pytest.mark.parametrize("model_fixture", ["smollm2", "gemma3"])
@pytest.mark.parametrize("dataset", ["zsre", "counterfact"])
def test_the_editors_paper_units_are_found_in_the_committed_store(request, data_dir, model_fixture, dataset):
    """The units ``intattn run editors --scale paper`` plans today are the committed
    store's files, key for key: the run would compute nothing."""
    from intattn_analysis.experiments import editors
    from intattn_analysis.experiments.common import dataset_batches

    model = request.getfixturevalue(model_fixture)
    scale = editors.SCALES["paper"]
    settings = editors.method_settings(model, scale.rows, scale.mom2_n_tokens)
    cells = editors.method_cells(model, dataset_batches(dataset, scale.batch_size, scale.n_batches), settings,
                                 dataset=dataset, metrics=scale.metrics, fluency_tokens=scale.fluency_tokens)
    assert len(cells) == 1 + len(editors.METHODS)
    assert _missing(editors.NAME, cells) == []


def test_the_alpha_sweep_paper_units_are_found_in_the_committed_store(gemma3, data_dir):
    """Gemma-3's alpha sweep on ZsRE (computed at the model's current defaults) is found
    unit for unit."""
    from intattn_analysis.experiments import alpha_sweep
    from intattn_analysis.experiments.alpha_settings import alpha_cells
    from intattn_analysis.experiments.common import dataset_batches
    from intattn_analysis.hparams import hparams_for

    scale = alpha_sweep.SCALES["paper"]
    cells = alpha_cells(gemma3, dataset_batches("zsre", scale.batch_size, scale.n_batches),
                        alpha_sweep.settings(gemma3, scale), hparams_for(gemma3), dataset="zsre",
                        metrics=scale.metrics, fluency_tokens=scale.fluency_tokens)
    assert len(cells) == 27
    assert _missing(alpha_sweep.NAME, cells) == []


def test_every_experiments_default_rows_are_the_committed_stores():
    """The rows each experiment runs by default at paper scale are the settings its
    committed store holds: a paper-scale run adds no row of its own accord."""
    from intattn_analysis.experiments import batch_scaling, editors, outdated, sequential
    from intattn_analysis.experiments.store import ResultStore

    def stored(experiment: str) -> set[str]:
        return {first["setting"] for first in ResultStore(PAPER_STORE, experiment).first_rows().values()} - {"pre-edit"}

    assert set(editors.SCALES["paper"].rows) == stored(editors.NAME)
    assert set(batch_scaling.SCALES["paper"].rows) == stored(batch_scaling.NAME)
    assert set(outdated.SCALES["paper"].rows) == stored(outdated.NAME)
    assert set(sequential.default_rows()) == stored(sequential.NAME)
    assert sequential.SCALES["paper"].methods is None  # the paper scale runs the default rows
