"""Experiments at a scale that decides: resumable, shardable, stored as plain files.

Each experiment is a module with ``run(model, dataset, scale, root, shard=...)``, which
computes (or resumes) its units of work into a
:class:`~intattn_analysis.experiments.store.ResultStore` under ``root``, and
``summarise(store)``, which turns whatever is stored into tidy tables with intervals.
``intattn run EXPERIMENT --model M --dataset D --scale ci|paper [--shard I/N] [--out DIR]``
calls them from the command line.

An experiment declares *what* it runs: its units (:mod:`.units` names them: the model
state, the facts, the method and its settings) and its tables. *How* a unit is run is
:mod:`.runner`'s, the same for every experiment: put the model in the unit's state
(write a batch, or rounds of batches), measure, restore, store.

* ``localization``: causal traces of every known fact (:mod:`.localization`), the
  per-layer AIE of attention and MLP with intervals and the alphas they imply;
* ``alpha-sweep``: IntAttn-Edit at fixed alphas and the traced alpha (:mod:`.alpha_sweep`);
* ``alpha-estimators``: the balance factor derived six ways and each version evaluated
  (:mod:`.estimators`);
* ``editors``: the main table, every editor of the family on the same batches
  (:mod:`.editors`);
* ``sequential``: rounds of edits piling up on one model, evaluated after each round
  (:mod:`.sequential`);
* ``batch-scaling``: every editor at growing batch sizes on the same facts
  (:mod:`.batch_scaling`);
* ``outdated``: how much of the old answer survives each editor, where it flows, and
  whether a context brings it back (:mod:`.outdated`);
* ``precision``: the closed-form editors with the model in bfloat16, paired with float32
  on the same facts (:mod:`.precision`).

``intattn tune`` runs :mod:`.tuning`: a grid of one editor's settings on train records,
as units of the ``editors`` experiment.
"""

from __future__ import annotations

from types import ModuleType

from . import alpha_sweep, batch_scaling, editors, estimators, localization, outdated, precision, sequential
from ..intervals import mean_interval, paired_difference, tidy_intervals
from .store import ResultStore, StoreError, merge_stores

__all__ = ["EXPERIMENTS", "ResultStore", "StoreError", "mean_interval", "merge_stores",
           "paired_difference", "tidy_intervals", "experiment"]

#: The experiments ``intattn run`` knows, by name.
EXPERIMENTS: dict[str, ModuleType] = {
    module.NAME: module for module in (localization, alpha_sweep, estimators, editors, sequential,
                                       batch_scaling, outdated, precision)
}


def experiment(name: str) -> ModuleType:
    """The experiment module registered under ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]
