"""Experiment ``tune``: choose an editor's settings on train records.

A grid of one method's hparam values, each run on the same batch of train records beside
MEMIT with the model's defaults, with each metric's mean and 95% interval and the paired
difference from MEMIT. Settings are chosen on train records (KnowEdit's ZsRE test
records are for reporting). ``intattn tune METHOD --grid NAME=V1,V2 ...`` runs it.

Every grid point is a unit of the ``editors`` experiment (:func:`.editors.run_methods`,
the same keys), stored under ``<cache root>/tuning/<model>/<dataset>-<facts>-<hash of
the defaults>`` (:func:`store_folder`), so a killed run resumes and a grown grid reuses
what is done. The table is written to ``figures/tuning/<method>-<model>.csv``; its
``baseline`` column names the MEMIT defaults that the ``MEMIT`` row and every paired
difference were measured against, so rows measured before a change of defaults are kept
beside the new ones rather than replaced (:func:`grown`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..hparams import hparams_for
from ..loading import ModelHandle, cache_root
from . import editors
from .common import dataset_batches, dataset_label
from .store import ResultStore, unit_id

__all__ = ["NAME", "TABLE_METRICS", "describe", "grid_settings", "grown", "parse_grid", "run", "store_folder",
           "table_path", "write_table"]

NAME = "tune"
#: The metrics of the written table.
TABLE_METRICS = ("Edit Succ.", "Rephrase", "Portability", "Locality", "Fluency")


def parse_grid(items: Sequence[str], option: str = "--grid") -> dict[str, list]:
    """``["name=v1,v2", ...]`` as ``{name: [v1, v2]}``; values are read as JSON where they
    parse (numbers, booleans) and as strings otherwise; ``layers=3`` means ``(3,)`` and
    ``layers=3-5`` means ``(3, 4, 5)``."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"{option} {item!r}: write NAME=VALUE[,VALUE...]")
        parsed = []
        for text in values.split(","):
            if name == "layers":
                first, _, last = text.partition("-")
                parsed.append(tuple(range(int(first), int(last or first) + 1)))
                continue
            try:
                parsed.append(json.loads(text))
            except json.JSONDecodeError:
                parsed.append(text)
        grid[name] = parsed
    return grid


def grid_settings(model: ModelHandle | str, method: str, grid: Mapping[str, Sequence] | None = None,
                  fixed: Mapping[str, Sequence] | None = None, each_alone: bool = False
                  ) -> tuple[dict[str, tuple[str, Any]], Any, Any]:
    """``({row name: (method, hparams)}, MEMIT's hparams, the method's hparams)``: MEMIT
    with the model's defaults, then one row per point of ``grid`` on the method's
    defaults. ``fixed`` (``{field: [value]}``, the form :func:`parse_grid` gives) changes
    a field for every row, MEMIT's included. Unknown fields, and a fixed field with more
    than one value, are errors that name them, raised before any work."""
    base = hparams_for(model, method)
    memit = hparams_for(model, "memit")
    fixed = dict(fixed or {})
    several = [name for name, values in fixed.items() if len(values) != 1]
    if several:
        raise ValueError(f"--set takes one value per field ({several}); use --grid to try several")
    fixed = {name: values[0] for name, values in fixed.items()}
    unknown = [name for name in fixed if not (hasattr(base, name) and hasattr(memit, name))]
    if unknown:
        raise ValueError(f"--set: {type(base).__name__} and MEMIT's hparams do not both have field(s) {unknown}")
    base, memit = base.replace(**fixed), memit.replace(**fixed)
    grid = dict(grid or {})
    unknown = [name for name in grid if not hasattr(base, name)]
    if unknown:
        raise ValueError(f"{type(base).__name__} has no field(s) {unknown}")
    settings = {"MEMIT": ("memit", memit)}
    for values in itertools.product(*grid.values()):
        changes = dict(zip(grid, values))
        label = method + (" alone" if each_alone else "") + "".join(
            f" {k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in changes.items())
        settings[label] = (method, base.replace(**changes))
    return settings, memit, base


def describe(hp) -> str:
    """The settings of ``hp`` that differ from its class's own defaults, in the grid's
    ``name=value`` form (the layers always): ``"layers=3-4-5 lambda_mlp=250.0 ..."``."""
    plain = type(hp)(layers=hp.layers).effective_dict()
    parts = [f"layers={'-'.join(map(str, hp.layers))}"]
    for name, value in hp.effective_dict().items():
        if name != "layers" and value != plain.get(name):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def store_folder(model: str, dataset: str, facts: int, defaults: tuple = ()) -> Path:
    """Where a grid's units live: one store per (model, dataset, number of facts, defaults).
    A batch of 50 facts and one of 100 are different configurations of the same labels
    (``MEMIT`` on batch 0), and so are the same labels before and after a change of the
    defaults the grid is built on; one store may hold only one of them. ``defaults`` are
    the hparams the labels are relative to (MEMIT's and the method's)."""
    name = f"{dataset_label(dataset)}-{facts}"
    if defaults:  # the store's own key hash: readable label, then 16 hex digits
        name = unit_id({"defaults": [hp.effective_dict() for hp in defaults]}, name)
    return cache_root() / "tuning" / model / name


def run(model: ModelHandle, method: str, *, dataset: str = "zsre-train", facts: int = 50,
        grid: Mapping[str, Sequence] | None = None, fixed: Mapping[str, Sequence] | None = None,
        each_alone: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) the grid on the first ``facts`` editable records of ``dataset``;
    returns the table: per (setting, metric), the mean with its interval and the paired
    difference from MEMIT (``diff``, ``ci_low_vs_memit``, ...), and the ``baseline``."""
    settings, memit, base = grid_settings(model, method, grid, fixed, each_alone)
    batches = dataset_batches(dataset, facts, 1)
    label = dataset_label(dataset)  # a file's stem, as the editors experiment stores it
    store = ResultStore(store_folder(model.name, dataset, facts, (memit, base)), editors.NAME)
    alone = [name for name in settings if name != "MEMIT"] if each_alone else []
    editors.run_methods(model, batches, settings, store, dataset=label, alone=alone, progress=progress)
    summary = editors.summarise(store)
    names = list(settings)
    intervals = summary["intervals"].query("protocol == 'teacher-forced'").drop(columns="protocol")  # tuned as scored
    intervals = intervals[intervals["setting"].isin(names) & (intervals["dataset"] == label)]
    paired = summary["paired"].query("protocol == 'teacher-forced'").drop(columns="protocol")
    paired = paired[paired["setting"].isin(names) & (paired["dataset"] == label)]
    table = intervals.merge(paired[["setting", "metric", "diff", "ci_low", "ci_high"]],
                            on=["setting", "metric"], how="left", suffixes=("", "_vs_memit"))
    table = table[table["metric"].isin(TABLE_METRICS)]
    return table.assign(baseline="memit " + describe(memit))


def grown(previous: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The written table after a new grid: earlier grids' rows (on any model, dataset or
    number of facts) are kept, and a row measured again on as many facts replaces its old
    value."""
    key = ["model", "dataset", "setting", "metric"]
    for column in ("n_edits", "baseline"):
        if column in previous and column in table:
            key.append(column)
    return pd.concat([previous, table]).drop_duplicates(key, keep="last").reset_index(drop=True)


def table_path(method: str, model: str) -> Path:
    """``figures/tuning/<method>-<model>.csv``."""
    from ..plots import results_dir

    return results_dir() / "tuning" / f"{method}-{model}.csv"


def write_table(table: pd.DataFrame, method: str, model: str) -> Path:
    """Add ``table`` to the method's tuning table (:func:`grown`), written whole or not at
    all; returns its path."""
    from ..loading import write_atomic

    path = table_path(method, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        table = grown(pd.read_csv(path), table)
    write_atomic(path, lambda staging: table.to_csv(staging, index=False, float_format="%.6g"))
    return path
