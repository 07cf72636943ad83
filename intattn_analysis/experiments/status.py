"""``intattn status``: per experiment, model and dataset, units done, stale and missing.

Each experiment's own ``run`` is called inside :func:`.planning.planning`, which lists the
units a real run would look for without computing any (see :mod:`.planning`):

* **done**: planned units the store holds;
* **missing**: planned units it lacks, with an estimate of the time to compute them
  from the ``seconds`` of the units already stored;
* **stale**: stored units of the same experiment and model that no plan names (computed
  at settings other than today's defaults, under another protocol setting, or for facts
  no longer asked).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .planning import PlanIncomplete, PlannedUnit, planning
from .store import ResultStore

__all__ = ["PAPER_GRID", "RunPlan", "StaleUnitsError", "plan_runs", "reproduce", "status", "stored_units"]


def stored_units(root: str | Path, experiment: str) -> pd.DataFrame:
    """One row per unit file of ``experiment`` under ``root``: ``uid``, ``model``,
    ``dataset``, ``setting``, ``protocol`` and the unit's ``seconds`` (NaN where untimed)."""
    out = []
    for uid, first in ResultStore(root, experiment).first_rows().items():
        out.append({"uid": uid, "model": first.get("model"), "dataset": first.get("dataset"),
                    "setting": first.get("setting", first.get("variant")),
                    "protocol": first.get("protocol") or "teacher-forced",
                    "seconds": first.get("seconds", math.nan)})
    return pd.DataFrame(out, columns=["uid", "model", "dataset", "setting", "protocol", "seconds"])


def _estimate(missing: Sequence[PlannedUnit], timed: pd.DataFrame, model: str) -> float:
    """Seconds to compute ``missing``: each unit at the mean seconds of the stored units
    of its setting, the first of these that exists: under its protocol for this model,
    under its protocol for any model, under any protocol for this model, under any
    protocol for any model; else at the mean of this model's units, else of any unit.
    NaN when nothing of the experiment was ever timed."""
    if timed.empty:
        return math.nan
    own = timed[timed["model"] == model]
    tables = [own.groupby(["setting", "protocol"])["seconds"].mean(),
              timed.groupby(["setting", "protocol"])["seconds"].mean(),
              own.groupby("setting")["seconds"].mean(),
              timed.groupby("setting")["seconds"].mean()]
    fallback = float((own if not own.empty else timed)["seconds"].mean())
    total = 0.0
    for unit in missing:
        setting = unit.labels.get("setting", unit.labels.get("variant"))
        wanted = [(setting, unit.labels.get("protocol") or "teacher-forced")] * 2 + [setting] * 2
        for table, key in zip(tables, wanted):
            if key in table.index and not math.isnan(table[key]):
                total += float(table[key])
                break
        else:
            total += fallback
    return total


#: The paper-scale grid: each experiment and the datasets it is run on, on every embedded
#: model (``intattn status`` and the coverage of the documents).
PAPER_GRID: dict[str, tuple[str, ...]] = {
    "localization": ("builtin",),
    "alpha-sweep": ("zsre", "counterfact"),
    "alpha-estimators": ("zsre", "counterfact"),
    "editors": ("zsre", "counterfact"),
    "batch-scaling": ("zsre", "counterfact"),
    "sequential": ("zsre", "counterfact"),
    "outdated": ("builtin",),
}


@dataclass
class RunPlan:
    """One (experiment, model, dataset)'s plan: the units of its own experiment, the unit
    files of that experiment and model that no plan names (``stale``; ``None`` where the
    plan is incomplete), and the ``note`` of an incomplete plan."""

    experiment: str
    model: str
    dataset: str
    units: list[PlannedUnit]
    stale: list[str] | None
    note: str = ""


def plan_runs(root, runs: Sequence[tuple[str, Any, str]], scale: str = "paper", protocol: str | None = "both"
              ) -> list[RunPlan]:
    """The plan of each (experiment, model, dataset) of ``runs`` (the model a loaded
    handle), with the stale unit files (their ids) of each."""
    from . import experiment as experiment_module
    from .store import MissingResultsError

    plans: dict[tuple[str, str, str], tuple[list[PlannedUnit], str]] = {}
    for name, model, dataset in runs:
        module = experiment_module(name)
        keywords = {"protocol": protocol} if protocol is not None and _takes_protocol(module) else {}
        note = ""
        with planning() as plan, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the datasets' and balances' notes are a real run's to show
            try:
                module.run(model, dataset, scale, root, progress=False, **keywords)
            except (PlanIncomplete, MissingResultsError) as waiting:
                note = str(waiting)
        plans[name, model.name, dataset] = (plan.units, note)
    named: dict[str, set[str]] = {}
    for units, _ in plans.values():
        for unit in units:
            named.setdefault(unit.experiment, set()).add(unit.uid)
    stored = {name: stored_units(root, name) for name in {n for n, _, _ in runs}}
    # a stored unit no plan names is stale; it is counted once, in the first run of its
    # experiment and model whose units carry its dataset label (the estimators' train
    # units are labelled with the train split, which the test dataset's run asks for)
    counted: set[str] = set()
    out = []
    for (name, model, dataset), (units, note) in plans.items():
        own = [u for u in units if u.experiment == name]
        labels = {u.labels.get("dataset") for u in own} | {_label(dataset)}
        files = stored[name]
        mine = files[(files["model"] == model) & files["dataset"].isin(labels)
                     & ~files["uid"].isin(named.get(name, set())) & ~files["uid"].isin(counted)]
        counted.update(mine["uid"])
        # an incomplete plan does not name every unit it will ask for: what it did not
        # name is not known to be stale
        out.append(RunPlan(name, model, dataset, own, None if note else list(mine["uid"]), note))
    return out


def status(root, runs: Sequence[tuple[str, Any, str]], scale: str = "paper", protocol: str | None = "both"
           ) -> pd.DataFrame:
    """Per (experiment, model, dataset) of ``runs`` (the model a loaded handle): units
    ``done``, ``stale`` (stored for that experiment, model and dataset, named by no plan of
    ``runs``; ``None`` where the plan is incomplete), ``missing``, ``estimated_seconds`` to
    compute the missing ones, and a ``note`` where the plan waits on results not stored
    yet (its units past that point are not counted)."""
    out = []
    timed = {}
    for plan in plan_runs(root, runs, scale, protocol):
        if plan.experiment not in timed:
            timed[plan.experiment] = stored_units(root, plan.experiment).dropna(subset=["seconds"])
        missing = [u for u in plan.units if not u.done]
        out.append({"experiment": plan.experiment, "model": plan.model, "dataset": plan.dataset,
                    "done": sum(u.done for u in plan.units),
                    "stale": None if plan.stale is None else len(plan.stale), "missing": len(missing),
                    "estimated_seconds": _estimate(missing, timed[plan.experiment], plan.model) if missing else 0.0,
                    "note": plan.note})
    return pd.DataFrame(out, columns=["experiment", "model", "dataset", "done", "stale", "missing",
                                      "estimated_seconds", "note"])


def reproduce(root, runs: Sequence[tuple[str, Any, str]], *, prune_stale: bool = False,
              shard: tuple[int, int] | None = None, protocol: str = "both", progress: bool = True,
              log=print) -> list[str]:
    """Bring every result of ``runs`` to today's defaults at paper scale, experiment by
    experiment in the order given (an experiment that reads another's results comes after
    it): plan each run, remove its stale unit files when ``prune_stale`` (they stay in the
    repository's history) or refuse, naming them, when not, then run it (resumable; a
    stopped call computes only what is missing the next time). A plan that waits on
    results not stored yet does not name all its units, so its stale units are known, and
    removed or refused, only once an unsharded run has stored what it waited on. Returns
    the experiments run, whose tables the caller writes."""
    from . import experiment as experiment_module

    done: list[str] = []
    for name in dict.fromkeys(n for n, _, _ in runs):
        group = [run for run in runs if run[0] == name]
        waiting = _clear_stale(root, name, group, protocol, prune_stale, log)
        module = experiment_module(name)
        keywords = {"protocol": protocol} if _takes_protocol(module) else {}
        for _, model, dataset in group:
            log(f"{name} / {model.name} / {dataset}: running")
            module.run(model, dataset, "paper", root, shard=shard, progress=progress, **keywords)
        if waiting and shard is None:
            # a plan that waited on results not stored then (the units past that point
            # were not named) is whole now: what it does not name is known to be stale
            _clear_stale(root, name, group, protocol, prune_stale, log)
        done.append(name)
    return done


def _clear_stale(root, name: str, group, protocol: str, prune_stale: bool, log) -> bool:
    """Remove (``prune_stale``) or refuse the stale units of ``group``'s plans; returns
    whether some plan was incomplete, so that its stale units are not known yet."""
    waiting = False
    for plan in plan_runs(root, group, "paper", protocol):
        if plan.stale is None:
            waiting = True
            log(f"{name} / {plan.model} / {plan.dataset}: stale units are not known until the run has "
                f"stored what its plan waits on ({plan.note})")
            continue
        if not plan.stale:
            continue
        folder = Path(root) / name
        if not prune_stale:
            raise StaleUnitsError(
                f"{len(plan.stale)} stale unit(s) of {name} / {plan.model} / {plan.dataset} would sit beside "
                f"today's (for example unit {plan.stale[0]} in {folder}); pass --prune-stale to remove them "
                "(they stay in the repository's history)")
        store = ResultStore(root, name)
        for uid in plan.stale:
            store.remove(uid)
        log(f"{name} / {plan.model} / {plan.dataset}: removed {len(plan.stale)} stale unit(s)")
    return waiting


class StaleUnitsError(ValueError):
    """Stale units would be summarised beside today's; the message says how to remove them."""


def _takes_protocol(module) -> bool:
    import inspect

    return "protocol" in inspect.signature(module.run).parameters


def _label(dataset: str) -> str:
    from .common import dataset_label

    return dataset_label(dataset)
