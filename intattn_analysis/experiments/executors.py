"""Where an experiment's shards run: in this process, as Slurm array tasks, or as Ray tasks.

An experiment run is cut into shards (``--shard I/N``: every N-th batch or chunk of facts
from the I-th, :func:`.units.shard_batches`). A :class:`ShardTask` is one shard of one
experiment on one model and dataset; it loads the model by name in whatever process it
lands in and runs the experiment into the store folder it names. The executors only
decide where the tasks run:

* :class:`InProcessExecutor`: one after another, here (``--executor local``);
* :class:`SlurmExecutor`: one Slurm array task per shard, through submitit
  (``--executor slurm``). ``cluster="local"`` runs the same array as local processes,
  which is how the tests run it;
* :class:`RayExecutor`: one Ray task per shard, on a running cluster (``address``) or a
  local one started for the run (``--executor ray``).

**The store is the source of truth.** Units are idempotent: a task computes only the
units its shard lacks and writes each whole or not at all, so a re-submitted array
computes only what is missing, and shards that land on one folder (a shared file system
on a cluster) merge by themselves. Whatever the executor, the store holds the rows of the
in-process run (the tests compare them). A failed task is reported by name with the error
and, for Slurm, its log files; the other tasks keep going. The tables are written once,
after every task has succeeded.

Work that every shard needs before its own units (estimator (e)'s train units in
``alpha-estimators``) is computed by each shard that finds it missing: the same files,
written atomically, so concurrent shards agree, at the cost of repeated work. Run such an
experiment's first shard alone first when that work is long.

submitit and Ray are optional: ``pip install intattn-analysis[executors]``.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

__all__ = ["EXECUTORS", "InProcessExecutor", "RayExecutor", "ShardTask", "SlurmExecutor", "TaskOutcome",
           "outcomes_table", "shard_tasks"]


@dataclass(frozen=True)
class ShardTask:
    """One shard of one experiment on one model and dataset, runnable in any process.

    ``model`` is what :func:`~intattn_analysis.loading.load_model` takes (an embedded
    name, a hub id or a directory: the task's process loads it); ``scale`` a scale name or
    the experiment's scale object; ``keywords`` further arguments of the experiment's
    ``run`` (``protocol``, ``method``, ``variants``...); ``threads`` the torch threads of
    the task's process (0 leaves torch's default, which on a cluster node may be every
    core of the node); ``environment`` the ``INTATTN_*`` variables of the submitting
    process (cache, data and results folders), set in the task's process where it has
    none of its own, since a Ray worker does not inherit them; ``dtype`` the dtype the
    model is loaded in.
    """

    experiment: str
    model: str
    dataset: str
    scale: Any
    root: str
    shard: tuple[int, int] | None = None
    keywords: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 0
    environment: Mapping[str, str] = field(default_factory=dict)
    dtype: str = "float32"

    @property
    def name(self) -> str:
        """``experiment / model / dataset / shard I/N``: how reports name the task."""
        where = f"shard {self.shard[0]}/{self.shard[1]}" if self.shard else "whole"
        return f"{self.experiment} / {self.model} / {self.dataset} / {where}"

    def __call__(self) -> dict:
        """Run the shard; returns its name, seconds and the units its store holds after."""
        import torch

        from ..loading import load_model
        from . import experiment
        from .store import ResultStore

        for name, value in self.environment.items():
            os.environ.setdefault(name, value)
        if self.threads:
            torch.set_num_threads(self.threads)
        module = experiment(self.experiment)
        started = time.perf_counter()
        model = load_model(self.model, dtype=self.dtype)
        module.run(model, self.dataset, self.scale, self.root, shard=self.shard, progress=False,
                   **dict(self.keywords))
        return {"task": self.name, "seconds": time.perf_counter() - started,
                "units": len(ResultStore(self.root, module.NAME))}


def shard_tasks(experiment: str, model: str, dataset: str, scale: Any, root, shards: int, *,
                keywords: Mapping[str, Any] | None = None, threads: int = 0,
                dtype: str = "float32") -> list[ShardTask]:
    """The ``shards`` tasks ``1/N`` ... ``N/N`` of one run (one task, unsharded, for 1).
    The store folder, and a model given as a local directory, are made absolute (a worker's
    working directory may differ); the ``INTATTN_*`` variables travel with each task."""
    from . import experiment as experiment_module

    experiment_module(experiment)  # an unknown name fails here, not in every task
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    parts = [None] if shards == 1 else [(i, shards) for i in range(1, shards + 1)]
    model = str(Path(model).resolve()) if Path(str(model)).exists() else str(model)
    environment = {k: v for k, v in os.environ.items() if k.startswith("INTATTN_")}
    return [ShardTask(experiment, model, dataset, scale, str(Path(root).resolve()), part, dict(keywords or {}),
                      threads, environment, dtype) for part in parts]


@dataclass
class TaskOutcome:
    """What became of one task: ``ok``, its seconds, and where it failed, the error (the
    last lines of its traceback) and any log files."""

    task: str
    ok: bool
    seconds: float | None = None
    error: str = ""
    logs: tuple[str, ...] = ()


def outcomes_table(outcomes: Sequence[TaskOutcome]) -> pd.DataFrame:
    """One row per task: ``task``, ``ok``, ``seconds``, ``error``, ``logs``."""
    return pd.DataFrame([{"task": o.task, "ok": o.ok, "seconds": o.seconds, "error": o.error,
                          "logs": " ".join(o.logs)} for o in outcomes],
                        columns=["task", "ok", "seconds", "error", "logs"])


def _short(error: BaseException | str, lines: int = 6) -> str:
    """The last ``lines`` lines of an error's text (a remote traceback is long), before
    any footer submitit adds below a line of dashes (where to find the logs: they are
    reported apart)."""
    text = error if isinstance(error, str) else "".join(traceback.format_exception_only(type(error), error))
    kept = text.strip().splitlines()
    dashes = [i for i, line in enumerate(kept) if line.strip() and set(line.strip()) == {"-"} and i > 0]
    if dashes:
        kept = kept[:dashes[-1]]
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept[-lines:])


@dataclass
class InProcessExecutor:
    """The tasks one after another in this process; a failed task is reported and the next
    one runs."""

    def run(self, tasks: Sequence[ShardTask]) -> list[TaskOutcome]:
        outcomes = []
        for task in tasks:
            started = time.perf_counter()
            try:
                task()
            except Exception as error:  # noqa: BLE001 - reported by name, the others go on
                outcomes.append(TaskOutcome(task.name, False, time.perf_counter() - started, _short(error)))
            else:
                outcomes.append(TaskOutcome(task.name, True, time.perf_counter() - started))
        return outcomes


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ImportError("the Slurm executor needs submitit: pip install 'intattn-analysis[executors]' "
                          "(or pip install submitit)") from None
    return submitit


@dataclass
class SlurmExecutor:
    """One Slurm array task per shard, through submitit.

    Args:
        folder: where submitit keeps the pickled tasks, their results and the logs (on a
            file system the nodes share).
        partition: the Slurm partition (``None``: the cluster's default).
        gpus: GPUs per task.
        cpus: CPU cores per task (the task's torch threads, unless the task sets its own).
        time_min: the time limit of each task, in minutes.
        array_parallelism: how many array tasks may run at once.
        mem_gb: memory per task (``None``: the partition's default).
        cluster: ``None`` for Slurm; ``"local"`` runs the array as local processes
            (submitit's local executor, for tests and a single machine), ``"debug"`` in
            this process.
        extra: further ``slurm_*`` parameters for submitit (``{"slurm_account": ...}``).
    """

    folder: str | Path
    partition: str | None = None
    gpus: int = 0
    cpus: int = 2
    time_min: int = 240
    array_parallelism: int = 32
    mem_gb: int | None = None
    cluster: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        """The parameters given to submitit's ``update_parameters``."""
        params: dict[str, Any] = {"timeout_min": int(self.time_min), "cpus_per_task": int(self.cpus),
                                  "name": "intattn"}
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        if self.cluster in (None, "slurm"):
            params["slurm_array_parallelism"] = int(self.array_parallelism)
            if self.gpus:
                params["slurm_gpus_per_task"] = int(self.gpus)
            if self.partition:
                params["slurm_partition"] = self.partition
            params.update(self.extra)
        elif self.gpus:
            params["gpus_per_node"] = int(self.gpus)
        return params

    def run(self, tasks: Sequence[ShardTask]) -> list[TaskOutcome]:
        submitit = _submitit()
        executor = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster or "slurm")
        executor.update_parameters(**self.parameters())
        jobs = executor.map_array(_call, list(tasks))
        outcomes = []
        for task, job in zip(tasks, jobs):
            try:
                report = job.result()
            except Exception as error:  # noqa: BLE001 - a failed array task, reported by name
                logs = tuple(str(p) for p in (getattr(job.paths, "stderr", None), getattr(job.paths, "stdout", None))
                             if p is not None)
                outcomes.append(TaskOutcome(task.name, False, None, _short(error), logs))
            else:
                outcomes.append(TaskOutcome(task.name, True, report["seconds"]))
        return outcomes


def _call(task: ShardTask) -> dict:
    """A task run by an executor (a module-level function, so that it pickles by name)."""
    return task()


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray executor needs Ray: pip install 'intattn-analysis[executors]' "
                          "(or pip install ray)") from None
    return ray


@dataclass
class RayExecutor:
    """One Ray task per shard.

    Args:
        address: the cluster to join (``"auto"``, ``"ray://host:10001"``); ``None`` starts
            a local cluster for the run, with ``local_cpus`` CPUs, and stops it after (it
            does not join a cluster that ``RAY_ADDRESS`` or a running ``ray start`` names).
        num_gpus: GPUs per task (fractions share a GPU).
        num_cpus: CPUs per task.
        local_cpus: the CPUs of a local cluster (``None``: every core).
    """

    address: str | None = None
    num_gpus: float = 0
    num_cpus: float = 1
    local_cpus: int | None = None

    def run(self, tasks: Sequence[ShardTask]) -> list[TaskOutcome]:
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options.update(address="local", num_cpus=self.local_cpus)
            else:
                options["address"] = self.address
            ray.init(**options)
        try:
            remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_call)
            refs = [remote.remote(task) for task in tasks]
            outcomes = []
            for task, ref in zip(tasks, refs):
                try:
                    report = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - a failed task (RayTaskError), reported by name
                    outcomes.append(TaskOutcome(task.name, False, None, _short(str(error))))
                else:
                    outcomes.append(TaskOutcome(task.name, True, report["seconds"]))
            return outcomes
        finally:
            if started_here:
                ray.shutdown()


#: ``--executor`` names.
EXECUTORS = {"local": InProcessExecutor, "slurm": SlurmExecutor, "ray": RayExecutor}
