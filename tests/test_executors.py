"""Executors: the shards of a run as Slurm array tasks (submitit, its local executor here)
and as Ray tasks (a local cluster), each in processes of its own, give exactly the store
of the in-process run; a failed task is reported by name and the others finish."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from intattn_analysis import cli
from intattn_analysis.experiments.executors import (InProcessExecutor, RayExecutor, ShardTask, SlurmExecutor,
                                                    outcomes_table, shard_tasks)
from intattn_analysis.experiments.store import ResultStore, read_unit_file

#: 17 known facts are two chunks of the localization experiment (16 + 1), so two shards
#: each have a unit; AtP on the `modules` variant keeps the run to seconds.
FACTS, SAMPLES = 17, 2


def _extra(module: str):
    """The optional executor package, or a skip; where the project's CI runs
    (``INTATTN_REQUIRE_EXTRAS=1``) a missing one is a failure."""
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("INTATTN_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"{module} is not installed; CI installs the [executors] extra")
        raise


# ------------------------------------------------------------------------------ unit
def test_shard_tasks_name_each_shard_and_check_their_arguments(tmp_path):
    tasks = shard_tasks("localization", "smollm2-135m", "builtin", "ci", tmp_path, 3, keywords={"method": "attribution"})
    assert [t.shard for t in tasks] == [(1, 3), (2, 3), (3, 3)]
    assert tasks[1].name == "localization / smollm2-135m / builtin / shard 2/3"
    assert tasks[0].keywords == {"method": "attribution"} and tasks[0].root == str(tmp_path)
    whole = shard_tasks("editors", "m", "zsre", "ci", tmp_path, 1)
    assert [t.shard for t in whole] == [None] and whole[0].name.endswith("/ whole")
    assert whole[0].dtype == "float32"
    assert {t.dtype for t in shard_tasks("editors", "m", "zsre", "ci", tmp_path, 2, dtype="bfloat16")} == {"bfloat16"}
    with pytest.raises(ValueError, match="unknown experiment"):
        shard_tasks("no-such", "m", "zsre", "ci", tmp_path, 2)
    with pytest.raises(ValueError, match="shards must be a positive integer"):
        shard_tasks("editors", "m", "zsre", "ci", tmp_path, 0)


class _Task:
    def __init__(self, name: str, fail: bool):
        self.name, self.fail, self.ran = name, fail, False

    def __call__(self):
        self.ran = True
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        return {"seconds": 0.0}


def test_a_failed_task_is_reported_by_name_and_the_others_run():
    tasks = [_Task("a", False), _Task("b", True), _Task("c", False)]
    outcomes = InProcessExecutor().run(tasks)
    assert all(t.ran for t in tasks)
    table = outcomes_table(outcomes)
    assert list(table["task"]) == ["a", "b", "c"] and list(table["ok"]) == [True, False, True]
    assert "RuntimeError: b broke" in table.loc[1, "error"]


def test_an_error_is_shortened_to_its_end_before_submitits_footer():
    from intattn_analysis.experiments.executors import _short

    text = "\n".join(["Traceback (most recent call last):", *[f"  frame {i}" for i in range(9)],
                       "ValueError: no such model", "", "----------------------",
                       "You can check full logs with 'job.stderr(0)'", "  - /logs/1_0_log.err", "  - /logs/1_0_log.out"])
    assert _short(text, 2) == "  frame 8\nValueError: no such model"


def test_slurm_parameters_follow_the_options(tmp_path):
    slurm = SlurmExecutor(tmp_path, partition="gpu", gpus=1, cpus=8, time_min=90, array_parallelism=4,
                          mem_gb=64, extra={"slurm_account": "lab"})
    assert slurm.parameters() == {"timeout_min": 90, "cpus_per_task": 8, "name": "intattn", "mem_gb": 64,
                                  "slurm_array_parallelism": 4, "slurm_gpus_per_task": 1,
                                  "slurm_partition": "gpu", "slurm_account": "lab"}
    local = SlurmExecutor(tmp_path, cluster="local", cpus=1)
    assert local.parameters() == {"timeout_min": 240, "cpus_per_task": 1, "name": "intattn"}


def test_the_run_command_checks_its_executor_options(tmp_path, capsys):
    out = str(tmp_path / "store")
    assert cli.main(["run", "localization", "--dataset", "builtin", "--shards", "2", "--out", out]) == 2
    assert "need --executor" in capsys.readouterr().err
    assert cli.main(["run", "localization", "--dataset", "builtin", "--executor", "local", "--shard", "1/2",
                     "--out", out]) == 2
    assert "give --shards N instead" in capsys.readouterr().err
    assert cli.main(["run", "localization", "--dataset", "builtin", "--executor", "local", "--shards", "0",
                     "--out", out]) == 2
    assert "--shards must be at least 1" in capsys.readouterr().err


def test_the_run_command_loads_the_model_in_the_dtype_asked_for(tmp_path, monkeypatch):
    """``intattn run --dtype`` reaches the model load in process and in every shard task."""
    import types

    from intattn_analysis import experiments, loading

    loaded = []

    def fake_load(name, dtype=None, **kwargs):
        loaded.append((name, dtype))
        return types.SimpleNamespace(name=name)

    def run(model, dataset, scale, root, shard=None, progress=True):
        pass

    def tables(root):
        import pandas as pd

        return {"intervals": pd.DataFrame({"value": [1.0]})}

    monkeypatch.setattr(loading, "load_model", fake_load)
    monkeypatch.setitem(experiments.EXPERIMENTS, "fake", types.SimpleNamespace(NAME="fake", run=run, tables=tables,
                                                                                  SCALES={"ci": None}))
    out = str(tmp_path / "store")
    assert cli.main(["run", "fake", "--dataset", "builtin", "--dtype", "bfloat16", "--out", out,
                     "--tables", str(tmp_path / "tables")]) == 0
    assert cli.main(["run", "fake", "--dataset", "builtin", "--dtype", "float16", "--executor", "local",
                     "--shards", "2", "--out", out, "--tables", str(tmp_path / "tables")]) == 0
    assert loaded == [("smollm2-135m", "bfloat16"), ("smollm2-135m", "float16"), ("smollm2-135m", "float16")]
    assert cli.main(["run", "fake", "--dataset", "builtin", "--dtype", "bfloat16"]) == 2  # the float32 store


def test_the_sbatch_script_runs_its_array_task_as_a_shard(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_array.sbatch"
    fake = tmp_path / "env" / "bin" / "python"  # prints the arguments it is given
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "INTATTN_ENV": str(tmp_path / "env"), "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_CPUS_PER_TASK": "8"}
    ran = subprocess.run(["bash", str(script), "editors", "--model", "m"], env=env, capture_output=True, text=True)
    assert ran.stdout.split() == ["-m", "intattn_analysis.cli", "run", "editors", "--model", "m", "--scale", "paper",
                                  "--threads", "8", "--shard", "2/4"]
    ran = subprocess.run(["bash", str(script), "editors", "--scale", "ci", "--threads", "1"], env=env,
                         capture_output=True, text=True)
    assert ran.stdout.split()[-6:] == ["--scale", "ci", "--threads", "1", "--shard", "2/4"]
    ran = subprocess.run(["bash", str(script), "editors", "--scale=ci"], env=env, capture_output=True, text=True)
    assert ran.stdout.split()[-5:] == ["--scale=ci", "--threads", "8", "--shard", "2/4"]
    # resubmitting some tasks of an array of 8: N is named, not counted
    some = {**env, "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3",
            "SLURM_ARRAY_TASK_MAX": "7"}
    ran = subprocess.run(["bash", str(script), "editors"], env=some, capture_output=True, text=True)
    assert ran.returncode == 2 and "INTATTN_SHARDS" in ran.stderr
    ran = subprocess.run(["bash", str(script), "editors"], env={**some, "INTATTN_SHARDS": "8"}, capture_output=True,
                         text=True)
    assert ran.stdout.split()[-2:] == ["--shard", "7/8"]
    outside = {k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}
    ran = subprocess.run(["bash", str(script), "editors"], env=outside, capture_output=True, text=True)
    assert ran.returncode == 2 and "sbatch --array=1-N" in ran.stderr


# ------------------------------------------------------------------------------ models
def _rows(root) -> dict[str, list[dict]]:
    """Every unit's rows with the timing left out (``seconds`` measures the run)."""
    store = ResultStore(root, "localization")
    return {path.name: [{k: v for k, v in row.items() if k != "seconds"} for row in read_unit_file(path)]
            for path in store.files()}


@pytest.fixture(scope="module")
def in_process(smollm2, tmp_path_factory):
    """The in-process run's store: AtP of the first 17 known facts, `modules` variant."""
    from intattn_analysis.experiments import localization

    root = tmp_path_factory.mktemp("in-process")
    localization.run(smollm2, "builtin", _scale(), root, method="attribution", variants=("modules",),
                     progress=False)
    rows = _rows(root)
    assert len(rows) == 2  # one unit per chunk
    return rows


def _scale():
    from intattn_analysis.experiments.localization import LocalizationScale

    return LocalizationScale(n_facts=FACTS, samples=SAMPLES)


def _tasks(root) -> list[ShardTask]:
    return shard_tasks("localization", "smollm2-135m", "builtin", _scale(), root, 2,
                       keywords={"method": "attribution", "variants": ("modules",)},
                       threads=torch.get_num_threads())


@pytest.mark.models
def test_slurm_array_tasks_give_the_in_process_store(in_process, tmp_path):
    _extra("submitit")
    root = tmp_path / "store"
    broken = ShardTask("localization", str(tmp_path / "no-such-model"), "builtin", _scale(), str(root), (1, 2))
    outcomes = SlurmExecutor(tmp_path / "logs", cluster="local", cpus=1, time_min=20).run([*_tasks(root), broken])
    table = outcomes_table(outcomes)
    assert list(table["ok"]) == [True, True, False], table.to_string()
    assert table.loc[2, "task"] == broken.name and "no-such-model" in table.loc[2, "error"]
    assert any(Path(p).exists() for p in table.loc[2, "logs"].split())
    assert _rows(root) == in_process


@pytest.mark.models
def test_ray_tasks_give_the_in_process_store(in_process, tmp_path):
    _extra("ray")
    root = tmp_path / "store"
    outcomes = RayExecutor(num_cpus=1, local_cpus=2).run(_tasks(root))
    assert all(o.ok for o in outcomes), outcomes_table(outcomes).to_string()
    assert _rows(root) == in_process
