"""The ``intattn`` command.

``intattn reproduce``  executes the notebooks in order (figures land in ``figures/``).
``intattn known``      recomputes which built-in facts each embedded model knows.
``intattn models``     lists the embedded models and the supported architectures.
``intattn data``       lists the benchmark files, where each was found or that it is missing.
``intattn evaluate``   edits batches of benchmark facts with several methods and prints
                       (and saves, batch by batch) the main-table metrics, e.g.
                       ``intattn evaluate --data knowedit/ZsRE-test-all.json --batch-size 100``.
``intattn run``        runs (or resumes) an experiment of :mod:`intattn_analysis.experiments`
                       into a store of result files and writes its tables, e.g.
                       ``intattn run alpha-sweep --model smollm2-135m --dataset zsre --scale paper``.
``intattn merge``      copies the stores of several shards into one.

Every argument is checked before any work starts; an error in the input is printed as one
line that names it and the fix (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

__all__ = ["main"]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _reproduce(args: argparse.Namespace) -> int:
    if args.scale == "paper":
        return _reproduce_paper(args)
    if args.scale != "ci":
        raise UsageError(f"--scale must be ci (the notebooks) or paper (every paper-scale experiment), "
                         f"got {args.scale!r}")
    import nbformat
    from nbclient import NotebookClient

    notebooks_dir = Path(args.notebooks_dir)
    notebooks = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(p) for p in args.only)]
    if not notebooks:
        print(f"no notebooks matched in {notebooks_dir}", file=sys.stderr)
        return 2
    for path in notebooks:
        start = time.perf_counter()
        print(f"running {path.name} ...", flush=True)
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(notebooks_dir)}},
        )
        client.execute()
        nbformat.write(notebook, path)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"figures are in {notebooks_dir.parent / 'figures'}")
    return 0


def _paper_runs(args: argparse.Namespace, experiments: list[str]) -> list[tuple]:
    """(experiment, loaded model, dataset) for the paper grid, narrowed by ``--models``
    and ``--datasets`` (the experiments of the built-in facts run on them alone)."""
    from .experiments.status import PAPER_GRID
    from .loading import EMBEDDED_MODELS, load_model

    models = [load_model(name) for name in (args.models or list(EMBEDDED_MODELS))]

    def datasets(name: str) -> list[str]:
        grid = PAPER_GRID[name]
        if not args.datasets:
            return list(grid)
        return [d for d in args.datasets if (d == "builtin") == (grid == ("builtin",))]

    return [(name, model, dataset) for name in experiments for model in models for dataset in datasets(name)]


def _reproduce_paper(args: argparse.Namespace) -> int:
    import torch

    from .experiments import experiment
    from .experiments.common import parse_shard
    from .experiments.status import PAPER_GRID, StaleUnitsError, reproduce
    from .report import write_pages

    try:
        shard = parse_shard(args.shard)
    except ValueError as error:
        raise UsageError(str(error)) from None
    experiments = [n for n in PAPER_GRID if not args.only or n in args.only]
    if args.only:
        unknown = [n for n in args.only if n not in PAPER_GRID]
        if unknown:
            raise UsageError(f"--only: {unknown} are not experiments of the paper grid {list(PAPER_GRID)}")
    root = Path(args.out) if args.out else _default_out("paper")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = _paper_runs(args, experiments)
    try:
        done = reproduce(root, runs, prune_stale=args.prune_stale, shard=shard, log=lambda m: print(m, flush=True))
    except StaleUnitsError as error:
        raise UsageError(str(error)) from None
    if shard:
        print(f"shard {args.shard} done; write the tables once every shard is in one store "
              "(`intattn run NAME --tables-only --scale paper`)")
        return 0
    for name in done:
        for path in write_tables(name, experiment(name).tables(root), root.parent):
            print(f"wrote {path}")
    if root.resolve() != _default_out("paper").resolve():
        # the repository's pages are those of its own store; another store's tables would
        # replace them with pages of whatever that store holds
        print(f"docs/results/ left as it is: the tables are those of {root}; write pages of them with "
              f"`intattn report --tables {root.parent} --out FOLDER`")
        return 0
    for path in write_pages(root.parent, _repo_root() / "docs" / "results"):
        print(f"wrote {path}")
    return 0


def _known(args: argparse.Namespace) -> int:
    from . import datasets
    from .known import mark_known
    from .loading import load_model

    facts = datasets.load_facts("builtin")
    for name in args.models:
        model = load_model(name)
        facts = mark_known(model, facts)
        per_relation = Counter(f.relation for f in facts if f.known[name])
        total = Counter(f.relation for f in facts)
        print(f"{name}: {sum(per_relation.values())} of {len(facts)} facts known")
        for relation in sorted(total):
            print(f"  {relation:<28} {per_relation[relation]:>4} / {total[relation]}")
        del model
    if args.write:
        path = datasets.builtin_path()
        records = json.loads(path.read_text())
        if len(records) != len(facts):
            raise RuntimeError("the built-in file changed while flags were computed")
        for record, fact in zip(records, facts):
            record["known"] = {**record.get("known", {}), **fact.known}
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote flags to {path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .architectures import ARCHITECTURES
    from .loading import EMBEDDED_MODELS

    print("embedded models (load offline):")
    for model in EMBEDDED_MODELS.values():
        print(f"  {model.name:<14} {model.description}  [package: {model.package}]")
    print("architectures:")
    for spec in ARCHITECTURES.values():
        print(f"  {spec.name:<8} {', '.join(spec.hf_classes):<22} mlp: {spec.mlp_module}  attn: {spec.attn_module}")
    return 0


class UsageError(ValueError):
    """A command-line argument is wrong; the message names it and what would work."""


def _output_files(out: str) -> list[Path]:
    """The three files ``--out OUT`` writes, after checking that their folder can be
    written (before any work: a run must not end in an unwritable place)."""
    import tempfile

    base = Path(out)
    folder = base.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".intattn-write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write in {folder} ({error.strerror or error}); "
                         "choose a writable folder") from None
    return [base.with_name(base.name + suffix) for suffix in (".csv", "_per_fact.csv", ".md")]


def _check_evaluate_args(args: argparse.Namespace) -> list[Path] | None:
    """Every argument of ``intattn evaluate`` that can be checked without the model."""
    from .editing import METHODS
    from .metrics import METRICS

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"--metrics: unknown metric set(s) {unknown}; known: {list(METRICS)}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--batches", args.batches, 0),
                             ("--offset", args.offset, 0), ("--threads", args.threads, 0),
                             ("--fluency-tokens", args.fluency_tokens, 1),
                             ("--mom2-tokens", args.mom2_tokens, 1), ("--v-steps", args.v_steps, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.layers is not None and (any(l < 0 for l in args.layers) or len(set(args.layers)) != len(args.layers)):
        raise UsageError(f"--layers must be distinct layer indices >= 0, got {args.layers}")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1] (0: MLP only, 1: attention only), got {args.alpha}")
    if args.lambda_ is not None and not args.lambda_ >= 0:
        raise UsageError(f"--lambda must be >= 0, got {args.lambda_}")
    _generation_settings(args)
    if args.protocol == "generation" and "counterfact" in args.metrics:
        raise UsageError("--metrics: 'counterfact' compares answer probabilities and has no generation form; "
                         "leave it out or use --protocol both")
    return _output_files(args.out) if args.out else None


def _data(args: argparse.Namespace) -> int:
    import pandas as pd

    from .benchmarks import benchmark_status

    table = pd.DataFrame(benchmark_status())
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        print(table[["name", "found in", "sha256 ok", "path"]].to_string(index=False))
    missing = table[table["found in"] == "missing"]
    if len(missing):
        print(f"{len(missing)} missing: set INTATTN_DATA_DIR to a folder of copies, or load them "
              "by name where the network allows (ia.load_facts('knowedit/ZsRE-test-all')); "
              "sources are in intattn_analysis.benchmarks.BENCHMARKS")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """``intattn evaluate``: check the arguments, load the facts and the model, resolve
    the hparams, then edit and score batch after batch and print the tables."""
    import pandas as pd
    import torch

    from .covariance import second_moments
    from .loading import load_model

    outputs = _check_evaluate_args(args)  # before any work
    if args.batches == 0:
        args.batches = None
    if args.threads:
        torch.set_num_threads(args.threads)
    path, facts = _evaluate_facts(args)
    batches = _evaluate_batches(args, facts)
    model = load_model(args.model)
    if args.layers is not None and max(args.layers) >= model.n_layers:
        raise UsageError(f"--layers {max(args.layers)} is outside {model.name} (layers 0-{model.n_layers - 1})")
    hp = _evaluate_hparams(args, model)
    print(f"{model.name}: {len(batches)} batch(es) of {args.batch_size} from {path.name}; "
          f"layers {list(hp.layers)}, lambda {hp.lambda_mlp:g}, {hp.mom2_n_tokens} corpus tokens, "
          f"targets: {hp.v_steps} evaluations, stop on {hp.stop_on} < {hp.stop_loss:g}",
          flush=True)
    moments = second_moments(model, hp.layers, n_tokens=hp.mom2_n_tokens, max_len=hp.mom2_max_len,
                             dtype=hp.torch_mom2_dtype, progress=True)
    table, timings = _evaluate_each_batch(args, model, batches, hp, moments, path, outputs)
    print(table.to_string())
    timing = pd.concat(timings, ignore_index=True).groupby("method")[["targets_s", "solve", "total"]].mean()
    print(timing.round(1).to_string())
    return 0


def _evaluate_facts(args: argparse.Namespace) -> tuple[Path, list]:
    """The file ``--data`` names (``builtin``, a path, or a path inside the benchmark
    collection) and its facts; what the loader warns about is printed as notes."""
    import warnings

    from .datasets import benchmark_path, load_facts

    if args.data == "builtin":
        path = Path("builtin")
    else:
        path = Path(args.data)
        if not path.exists():
            path = benchmark_path(args.data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = load_facts("builtin" if args.data == "builtin" else path, strict=not args.lenient)
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    return path, facts


def _evaluate_batches(args: argparse.Namespace, facts: list) -> list:
    """The batches ``--batch-size``, ``--batches`` and ``--offset`` choose from the
    editable facts; the records left out (their new answer is the true one) are noted."""
    from .runs import editable_batches

    try:
        batches, unchanged = editable_batches(facts, args.batch_size, args.batches, offset=args.offset)
    except ValueError as error:  # more batches or a larger offset than the file holds
        raise UsageError(f"--batch-size / --batches / --offset: {error}") from None
    if unchanged:
        print(f"note: {len(unchanged)} record(s) left out: target_new equals target_true",
              file=sys.stderr)
    return batches


def _evaluate_hparams(args: argparse.Namespace, model):
    """The model's default hparams with the command line's changes. The changes apply
    to the methods that share these hparams; the others keep their own defaults, which
    a note says."""
    from .editing import METHODS
    from .hparams import hparams_for
    from .runs import SHARED_HPARAMS_METHODS

    hp = hparams_for(model)
    changes = {}
    if args.layers:
        changes["layers"] = tuple(args.layers)
    if args.alpha is not None:
        changes["alpha"] = args.alpha
    elif args.layers and isinstance(hp.alpha, dict):
        missing = [l for l in args.layers if l not in hp.alpha]
        reads_alpha = [m for m in args.methods if m in METHODS and METHODS[m].reads_alpha]
        if missing and reads_alpha:
            raise SystemExit(
                f"--methods {' '.join(reads_alpha)} need an alpha per edited layer, and the "
                f"default alpha has no value for layers {missing}; pass --alpha"
            )
        if missing:  # no requested method reads alpha
            changes["alpha"] = 0.0
    if args.lambda_ is not None:
        changes.update(lambda_mlp=args.lambda_, lambda_attn=args.lambda_)
    if args.mom2_tokens is not None:
        changes["mom2_n_tokens"] = args.mom2_tokens
    if args.v_steps is not None:
        changes["v_steps"] = args.v_steps
    if args.stop_on is not None:
        changes["stop_on"] = args.stop_on
    hp = hp.replace(**changes)
    own = [m for m in args.methods if m not in SHARED_HPARAMS_METHODS]
    if own and changes:
        print(f"note: {', '.join('--' + k.replace('_', '-') for k in changes)} apply to "
              f"{', '.join(SHARED_HPARAMS_METHODS)}; {', '.join(own)} run with their own defaults "
              "(ia.hparams_for(model, method))", file=sys.stderr)
    return hp


def _evaluate_each_batch(args: argparse.Namespace, model, batches: list, hp, moments, path: Path,
                         outputs: list[Path] | None):
    """Edit and score the batches one at a time, writing the tables so far after each
    (``--out``), so that what is done is written before the next batch starts. Returns
    the formatted main table and the timings of each batch's edits."""
    import pandas as pd

    from . import reporting
    from .loading import write_atomic
    from .runs import BatchRun, edit_batches

    records, per_fact, timings = [], [], []
    for b, batch in enumerate(batches):
        run = edit_batches(model, [batch], args.methods, hp, moments=moments, dataset=path.stem,
                           metrics=args.metrics, fluency_tokens=args.fluency_tokens, protocol=args.protocol,
                           generation=_generation_settings(args))
        records.append(run.records.assign(batch=b))
        per_fact.append(run.per_fact.assign(batch=b))
        timings.append(run.timings.assign(batch=b))
        table = reporting.formatted(BatchRun(pd.concat(records, ignore_index=True), run.timings).table())
        if outputs:  # each file whole or not at all, so a killed run keeps the finished batches
            frames = (pd.concat(records, ignore_index=True), pd.concat(per_fact, ignore_index=True))
            for frame, target in zip(frames, outputs):
                write_atomic(target, lambda staging, frame=frame: frame.to_csv(staging, index=False))
            markdown = reporting.markdown_table(table)
            write_atomic(outputs[2], lambda staging: Path(staging).write_text(markdown))
            print(f"batch {b + 1}/{len(batches)} written to {', '.join(p.name for p in outputs)}",
                  flush=True)
    return table, timings


def _generation_settings(args: argparse.Namespace):
    """The generation protocol's settings from ``--prompt-form`` and ``--max-new-tokens``."""
    from .answers import GenerationSettings

    try:
        return GenerationSettings(max_new_tokens=args.max_new_tokens, prompt_form=args.prompt_form)
    except ValueError as error:
        raise UsageError(str(error).replace("GenerationSettings.max_new_tokens", "--max-new-tokens")
                         .replace("GenerationSettings.prompt_form", "--prompt-form")) from None


def _add_protocol_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--protocol``, ``--prompt-form`` and ``--max-new-tokens``."""
    from .answers import PROMPT_FORMS
    from .metrics import PROTOCOLS

    parser.add_argument("--protocol", choices=PROTOCOLS, default=default,
                        help="how answers are judged: teacher-forced token accuracy, free generation "
                             "to a natural stop, or both" + ("" if default else " (default: the scale's)"))
    parser.add_argument("--prompt-form", choices=PROMPT_FORMS, default="plain",
                        help="the generation protocol's prompt: as it is, in a Q:/A: frame, or as a "
                             "chat user turn (instruction models)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="the generation protocol's cap on new tokens per answer")


#: Where ``intattn run`` stores results unless ``--out`` says otherwise.
def _default_out(scale: str) -> Path:
    from .loading import cache_root

    if scale == "paper":
        from .plots import results_dir

        return results_dir() / "paper" / "store"
    return cache_root() / "experiments" / scale


def _table_name(experiment: str) -> str:
    return experiment.replace("-", "_")


def write_tables(experiment: str, tables: dict, folder: Path) -> list[Path]:
    """Each table of an experiment's summary as ``<experiment>_<table>.csv`` in
    ``folder``; the main one (``intervals``, or ``aie`` for localization) also as
    ``<experiment>.csv``. Floats are written with 6 significant digits."""
    from .loading import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    main_table = "intervals" if "intervals" in tables else next(iter(tables))
    for key, frame in tables.items():
        if frame is None or frame.empty:
            continue
        names = [f"{_table_name(experiment)}_{key}.csv"]
        if key == main_table:
            names.insert(0, f"{_table_name(experiment)}.csv")
        for name in names:
            path = folder / name
            write_atomic(path, lambda staging, frame=frame: frame.to_csv(staging, index=False,
                                                                          float_format="%.6g"))
            written.append(path)
    return written


def _run(args: argparse.Namespace) -> int:
    import inspect

    import pandas as pd
    import torch

    from .experiments import experiment
    from .experiments.common import parse_shard

    try:
        module = experiment(args.experiment)
        shard = parse_shard(args.shard)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.scale not in module.SCALES:
        raise UsageError(f"--scale must be one of {sorted(module.SCALES)}, got {args.scale!r}")
    protocol = _run_protocol(args, module)
    if args.method is not None:
        if "method" not in inspect.signature(module.run).parameters:
            raise UsageError(f"--method: the {args.experiment} experiment traces nothing; --method is for "
                             "localization")
        protocol["method"] = args.method
    if args.dtype != "float32" and not args.out and args.experiment != "precision":
        raise UsageError(f"--dtype {args.dtype}: the default store holds float32 units, and a table of one store "
                         "cannot tell dtypes apart; give --out a folder of its own (or run the precision "
                         "experiment, which pairs bfloat16 with float32)")
    out = Path(args.out) if args.out else _default_out(args.scale)
    _output_files(str(out / "probe"))  # a writable folder, before any work
    if args.experiment == "localization" and args.dataset != "builtin" and not args.tables_only:
        raise UsageError("--dataset: localization traces the built-in facts a model knows; "
                         "pass --dataset builtin")
    if args.experiment != "localization" and not args.tables_only:
        from .experiments.common import dataset_facts

        dataset_facts(args.dataset)  # the file must be there and readable before any work
    if args.executor is None and (args.shards is not None or args.ray_address or args.partition):
        raise UsageError("--shards, --partition and --ray-address need --executor local|slurm|ray")
    if args.executor is not None:
        if shard:
            raise UsageError("--shard runs one shard here; with --executor, give --shards N instead")
        if args.tables_only:
            raise UsageError("--tables-only runs nothing; leave --executor out")
        return _run_with_executor(args, module, protocol, out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.tables_only:
        from .loading import load_model

        model = load_model(args.model, dtype=args.dtype)
        started = time.perf_counter()
        module.run(model, args.dataset, args.scale, out, shard=shard, progress=True, **protocol)
        print(f"{args.experiment}: {model.name} / {args.dataset} / {args.scale}"
              f"{f' / shard {args.shard}' if shard else ''} done in "
              f"{time.perf_counter() - started:.0f} s; store: {out}", flush=True)
    if shard and not args.tables:
        print(f"shard {args.shard} done; tables are written once the shards are merged "
              f"(`intattn run {args.experiment} --tables-only --out MERGED`)")
        return 0
    tables = _write_run_tables(args, module, out)
    with pd.option_context("display.width", 200, "display.max_rows", 200,
                           "display.float_format", "{:.3f}".format):
        for key, frame in tables.items():
            if frame is not None and not frame.empty and key != "intervals":
                print(f"\n{args.experiment}: {key}\n{frame.to_string(index=False)}")
    return 0


def _run_with_executor(args: argparse.Namespace, module, keywords: dict, out: Path) -> int:
    """``intattn run --executor``: the run's shard tasks on the executor named, a line per
    task, then the tables once every task has succeeded."""
    import pandas as pd

    from .experiments.executors import InProcessExecutor, RayExecutor, SlurmExecutor, outcomes_table, shard_tasks

    shards = 1 if args.shards is None else args.shards
    if shards < 1:
        raise UsageError(f"--shards must be at least 1, got {shards}")
    if args.gpus < 0 or args.cpus < 1:
        raise UsageError("--gpus must be >= 0 and --cpus >= 1")
    threads = args.threads or (args.cpus if args.executor in ("slurm", "ray") else 0)
    tasks = shard_tasks(args.experiment, args.model, args.dataset, args.scale, out, shards, keywords=keywords,
                        threads=threads, dtype=args.dtype)
    if args.executor == "slurm":
        if args.gpus != int(args.gpus):
            raise UsageError(f"--gpus: Slurm takes whole GPUs per task, got {args.gpus}")
        from .loading import cache_root

        logs = Path(args.log_dir) if args.log_dir else cache_root() / "submitit"
        executor = SlurmExecutor(logs, partition=args.partition, gpus=int(args.gpus), cpus=args.cpus,
                                 time_min=args.time_min, array_parallelism=args.array_parallelism,
                                 mem_gb=args.mem_gb)
    elif args.executor == "ray":
        executor = RayExecutor(address=args.ray_address, num_gpus=args.gpus, num_cpus=args.cpus)
    else:
        executor = InProcessExecutor()
    print(f"{args.experiment}: {len(tasks)} task(s) on the {args.executor} executor; store: {out}", flush=True)
    try:
        outcomes = executor.run(tasks)
    except ImportError as error:
        raise UsageError(str(error)) from None
    table = outcomes_table(outcomes)
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        print(table.to_string(index=False))
    failed = table[~table["ok"]]
    if len(failed):
        print(f"{len(failed)} of {len(table)} task(s) failed: {', '.join(failed['task'])}. Their units are "
              "missing from the store; run the same command again to compute only those.", file=sys.stderr)
        return 1
    _write_run_tables(args, module, out)
    return 0


def _write_run_tables(args: argparse.Namespace, module, out: Path) -> dict:
    """Summarise the store at ``out`` and write the experiment's CSVs (to ``--tables``, else
    the store's parent at paper scale and the store itself at CI scale); returns the tables."""
    try:
        tables = module.tables(out)
    except ValueError as error:  # an empty store, a store of two configurations
        raise UsageError(f"--out {out}: {error}") from None
    folder = Path(args.tables) if args.tables else (out.parent if args.scale == "paper" else out)
    for path in write_tables(args.experiment, tables, folder):
        print(f"wrote {path}")
    return tables


def _run_protocol(args: argparse.Namespace, module) -> dict:
    """The protocol keywords of the experiment's ``run`` (none where ``--protocol`` is not
    given); an experiment that evaluates no edit (``localization``) is refused by name."""
    import inspect

    if args.protocol is None:
        return {}
    if "protocol" not in inspect.signature(module.run).parameters:
        raise UsageError(f"--protocol: the {args.experiment} experiment evaluates no edit, so it has no "
                         "evaluation protocol; leave --protocol out")
    generation = _generation_settings(args)
    keywords = {"protocol": args.protocol}
    if "generation" in inspect.signature(module.run).parameters:
        keywords["generation"] = generation
    return keywords


def _tune(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from .experiments import tuning
    from .loading import load_model

    try:
        grid = tuning.parse_grid(args.grid)
        fixed = tuning.parse_grid(args.set, "--set")
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    try:
        tuning.grid_settings(model, args.method, grid, fixed, args.each_alone)  # every field, before any work
    except ValueError as error:
        raise UsageError(str(error)) from None
    table = tuning.run(model, args.method, dataset=args.dataset, facts=args.facts, grid=grid, fixed=fixed,
                       each_alone=args.each_alone)
    with pd.option_context("display.width", 250):
        print(table.pivot_table(index="setting", columns="metric", values="mean", sort=False).round(1).to_string())
    print("written", tuning.write_table(table, args.method, model.name))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .experiments.store import merge_stores

    copied = merge_stores(args.sources, args.out)
    print(f"copied {copied} unit file(s) into {args.out}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    import torch

    from .experiments import experiment
    from .experiments.status import PAPER_GRID, status

    experiments = args.experiments or list(PAPER_GRID)
    for name in experiments:
        try:
            experiment(name)
        except ValueError as error:
            raise UsageError(f"--experiments: {error}") from None
        if name not in PAPER_GRID:
            raise UsageError(f"--experiments: {name} has no datasets in the paper grid {sorted(PAPER_GRID)}")
    root = Path(args.out) if args.out else _default_out(args.scale)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = status(root, _paper_runs(args, experiments), scale=args.scale, protocol=args.protocol)
    if args.json:
        print(json.dumps(table.to_dict(orient="records"), default=float))
        return 0
    import pandas as pd

    with pd.option_context("display.width", 220, "display.max_colwidth", 90, "display.max_rows", 200):
        shown = table.assign(estimated=table["estimated_seconds"].map(_duration)).drop(columns="estimated_seconds")
        print(f"store: {root} (scale {args.scale}, protocol {args.protocol})")
        print(shown.to_string(index=False))
    return 0


def _duration(seconds: float) -> str:
    import math

    if math.isnan(seconds):
        return "unknown"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _report(args: argparse.Namespace) -> int:
    from .report import stale_pages, write_pages

    tables = Path(args.tables)
    if not tables.is_dir():
        raise UsageError(f"--tables: {tables} is not a folder of tables; run `intattn run ... --scale paper` "
                         "first or name the folder its CSVs are in")
    if args.check:
        stale = stale_pages(tables, args.out)
        for name in stale:
            print(f"{Path(args.out) / name}: differs from what {tables} gives; run `intattn report`")
        if not stale:
            print(f"every page under {args.out} is what {tables} gives")
        return 1 if stale else 0
    for path in write_pages(tables, args.out):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one ``intattn`` command; an input error is printed as one line (exit code 2)
    unless ``--debug`` asks for its traceback."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:
        if args.debug or not _is_input_error(error):
            raise
        print(f"intattn {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    """The ``intattn`` parser: one subcommand each, all of them with ``--debug``."""
    parser = argparse.ArgumentParser(prog="intattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show an error's full traceback instead of one line")
    for add_command in (_add_reproduce, _add_known, _add_models, _add_data, _add_evaluate, _add_run,
                        _add_tune, _add_merge, _add_report, _add_status, _add_plan):
        add_command(sub, common)
    return parser


def _add_reproduce(sub, common: argparse.ArgumentParser) -> None:
    """``intattn reproduce``: execute the notebooks in order."""
    reproduce = sub.add_parser("reproduce", help="execute the notebooks in order (--scale ci), or bring every "
                               "paper-scale result to today's defaults (--scale paper)", parents=[common])
    reproduce.add_argument("--scale", default="ci",
                           help="ci: execute the notebooks; paper: run every experiment of the paper grid, "
                                "resumably, then write its tables and docs/results")
    reproduce.add_argument("--notebooks-dir", default=str(_repo_root() / "notebooks"))
    reproduce.add_argument("--only", nargs="*", help="ci: notebook name prefixes, e.g. 00 01; paper: experiments")
    reproduce.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    reproduce.add_argument("--models", nargs="+", help="paper: default every embedded model")
    reproduce.add_argument("--datasets", nargs="+", help="paper: default each experiment's datasets")
    reproduce.add_argument("--shard", help="paper: I/N, every N-th batch from the I-th")
    reproduce.add_argument("--out", help="paper: the store folder (default figures/paper/store)")
    reproduce.add_argument("--prune-stale", action="store_true",
                           help="paper: remove the stale units of each experiment run (default: refuse)")
    reproduce.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    reproduce.set_defaults(run=_reproduce)


def _add_known(sub, common: argparse.ArgumentParser) -> None:
    """``intattn known``: recompute which built-in facts each embedded model knows."""
    from .loading import EMBEDDED_MODELS

    known = sub.add_parser("known", help="recompute the built-in facts' known flags", parents=[common])
    known.add_argument("--models", nargs="+", default=list(EMBEDDED_MODELS))
    known.add_argument("--write", action="store_true", help="store the flags in the package")
    known.set_defaults(run=_known)


def _add_models(sub, common: argparse.ArgumentParser) -> None:
    """``intattn models``: list the embedded models and the supported architectures."""
    models = sub.add_parser("models", help="list embedded models and architectures", parents=[common])
    models.set_defaults(run=_models)


def _add_data(sub, common: argparse.ArgumentParser) -> None:
    """``intattn data``: list the benchmark files and where each was found."""
    data = sub.add_parser("data", help="list the benchmark files: where each is, or missing",
                          parents=[common])
    data.set_defaults(run=_data)


def _add_evaluate(sub, common: argparse.ArgumentParser) -> None:
    """``intattn evaluate``: edit batches of benchmark facts and print the main table."""
    evaluate = sub.add_parser(
        "evaluate", help="edit batches of benchmark facts and print the main-table metrics",
        parents=[common],
    )
    evaluate.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or path")
    evaluate.add_argument("--data", default="knowedit/ZsRE-test-all.json",
                          help="a benchmark file, a path inside the benchmark collection, or 'builtin'")
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--batches", type=int, default=1, help="0: every full batch")
    evaluate.add_argument("--offset", type=int, default=0, help="editable facts to skip first")
    evaluate.add_argument("--methods", nargs="+", default=["memit", "intattn"])
    evaluate.add_argument("--metrics", nargs="+", default=["knowedit", "residue"])
    evaluate.add_argument("--layers", type=int, nargs="+", help="edited layers (default: the model's)")
    evaluate.add_argument("--alpha", type=float, help="one alpha for every layer")
    evaluate.add_argument("--lambda", dest="lambda_", type=float, help="lambda for both modules")
    evaluate.add_argument("--mom2-tokens", type=int, help="corpus tokens for the second moments")
    evaluate.add_argument("--v-steps", type=int,
                          help="loss evaluations of the target optimisation (MEMIT's v_num_grad_steps; "
                               "one update fewer)")
    evaluate.add_argument("--stop-on", choices=("loss", "nll"),
                          help="what must fall below stop_loss to end a fact's target optimisation "
                               "(loss: MEMIT's rule, the default; nll: the NLL alone)")
    evaluate.add_argument("--fluency-tokens", type=int, default=50)
    _add_protocol_options(evaluate, "teacher-forced")
    evaluate.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    evaluate.add_argument("--lenient", action="store_true",
                          help="skip (and list) malformed records instead of stopping")
    evaluate.add_argument("--out", help="write OUT.csv, OUT_per_fact.csv and OUT.md (OUT without a suffix)")
    evaluate.set_defaults(run=_evaluate)


def _add_run(sub, common: argparse.ArgumentParser) -> None:
    """``intattn run``: run or resume an experiment into a store and write its tables."""
    run = sub.add_parser("run", help="run or resume an experiment into a result store",
                         parents=[common])
    run.add_argument("experiment", help="localization, alpha-sweep, alpha-estimators, editors, sequential, "
                     "batch-scaling, outdated or precision")
    run.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or path")
    run.add_argument("--dataset", default="zsre",
                     help="zsre, counterfact, builtin (localization, outdated), or a benchmark file")
    run.add_argument("--scale", default="ci", help="ci (small) or paper")
    run.add_argument("--shard", help="I/N: run every N-th batch from the I-th (1-based)")
    run.add_argument("--out", help="store folder (paper: figures/paper/store; ci: the cache)")
    run.add_argument("--tables", help="where the CSV tables go (paper: the store's parent)")
    run.add_argument("--tables-only", action="store_true",
                     help="only summarise what the store holds")
    run.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    run.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="the model's dtype (docs/design.md, Precision). Unit keys name it but rows do not, so a "
                          "dtype other than float32 needs a store of its own (--out); the precision experiment "
                          "pairs dtypes itself")
    run.add_argument("--method", choices=("exact", "attribution", "attribution*"), default=None,
                     help="localization: exact causal tracing (default) or attribution patching (AtP, or AtP* "
                          "with GradDrop), stored beside the exact traces and compared with them")
    _add_protocol_options(run, None)
    where = run.add_argument_group("executors (docs/usage.md, 'More than one machine')")
    where.add_argument("--executor", choices=("local", "slurm", "ray"), default=None,
                       help="run --shards tasks here one after another (local), as a Slurm array through "
                            "submitit (slurm) or as Ray tasks (ray); default: this process, no tasks")
    where.add_argument("--shards", type=int, default=None, help="how many shard tasks (default 1)")
    where.add_argument("--partition", help="slurm: the partition")
    where.add_argument("--gpus", type=float, default=0, help="slurm, ray: GPUs per task")
    where.add_argument("--cpus", type=int, default=2, help="slurm: CPU cores per task; ray: CPUs per task (and "
                       "each task's torch threads unless --threads says otherwise)")
    where.add_argument("--time-min", type=int, default=240, help="slurm: the time limit per task, minutes")
    where.add_argument("--array-parallelism", type=int, default=32, help="slurm: array tasks at once")
    where.add_argument("--mem-gb", type=int, default=None, help="slurm: memory per task")
    where.add_argument("--log-dir", help="slurm: where submitit keeps tasks and logs, on a file system the nodes "
                       "share (default: submitit/ in the cache folder)")
    where.add_argument("--ray-address", help="ray: the cluster to join (default: a local one for this run)")
    run.set_defaults(run=_run)


def _add_tune(sub, common: argparse.ArgumentParser) -> None:
    """``intattn tune``: a grid of one editor's settings on train records."""
    tune = sub.add_parser("tune", help="a grid of one editor's settings on train records, paired with MEMIT",
                          parents=[common])
    tune.add_argument("method", help="an editor name: rome, pmet, alphaedit, ft-l, ...")
    tune.add_argument("--model", default="smollm2-135m", help="embedded name, hub id or path")
    tune.add_argument("--dataset", default="zsre-train", help="train records: zsre-train or a benchmark file")
    tune.add_argument("--facts", type=int, default=50, help="train records in the batch")
    tune.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                      help="an hparam and the values to try (repeatable: the grid is the product)")
    tune.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="an hparam changed for every setting, MEMIT's included (a field both have, "
                           "e.g. mom2_n_tokens=20000 for a cheaper corpus sample)")
    tune.add_argument("--each-alone", action="store_true",
                      help="edit each fact alone on the unedited model (the 'ROME, each alone' protocol)")
    tune.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    tune.set_defaults(run=_tune)


def _add_merge(sub, common: argparse.ArgumentParser) -> None:
    """``intattn merge``: copy several shards' stores into one."""
    merge = sub.add_parser("merge", help="copy several shards' stores into one", parents=[common])
    merge.add_argument("sources", nargs="+", help="store folders written by the shards")
    merge.add_argument("--out", required=True, help="the merged store folder")
    merge.set_defaults(run=_merge)


def _add_report(sub, common: argparse.ArgumentParser) -> None:
    """``intattn report``: write the result pages from the paper-scale tables."""
    report = sub.add_parser("report", help="write docs/results/*.md from the paper-scale tables (or --check them)",
                            parents=[common])
    report.add_argument("--tables", default=str(_repo_root() / "figures" / "paper"),
                        help="the folder of the tidy CSVs (default: figures/paper)")
    report.add_argument("--out", default=str(_repo_root() / "docs" / "results"), help="where the pages go")
    report.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a page differs from what the tables give")
    report.set_defaults(run=_report)


def _add_status(sub, common: argparse.ArgumentParser) -> None:
    """``intattn status``: per experiment, model and dataset, units done, stale, missing."""
    from .metrics import PROTOCOLS

    status = sub.add_parser("status", help="units done, stale and missing per experiment, model and dataset, "
                            "with the time to finish", parents=[common])
    status.add_argument("--scale", default="paper", help="ci or paper")
    status.add_argument("--out", help="store folder (paper: figures/paper/store; ci: the cache)")
    status.add_argument("--experiments", nargs="+", help="default: every experiment of the paper grid")
    status.add_argument("--models", nargs="+", help="default: every embedded model")
    status.add_argument("--datasets", nargs="+", help="default: each experiment's datasets in the paper grid")
    status.add_argument("--protocol", choices=PROTOCOLS, default="both",
                        help="the evaluation protocol the results should have (default: both)")
    status.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    status.add_argument("--json", action="store_true",
                        help="print a JSON list of {experiment, model, dataset, done, stale, missing, "
                             "estimated_seconds}")
    status.set_defaults(run=_status)


def _add_plan(sub, common: argparse.ArgumentParser) -> None:
    """``intattn plan``: a paper-scale run's units, memory and time from a model's config."""
    from .plan import DEVICES

    plan = sub.add_parser("plan", help="a paper-scale run's units, the memory each needs and its time, from the "
                          "model's configuration alone (no weights)", parents=[common])
    plan.add_argument("--model", required=True,
                      help="a directory or config.json, or a shipped configuration (Qwen/Qwen2.5-7B, "
                           "mistralai/Mistral-7B-v0.1, the embedded models)")
    plan.add_argument("--experiment", required=True, help="an experiment of `intattn run`")
    plan.add_argument("--scale", default="paper", help="paper (the only scale planned)")
    plan.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="the weights' dtype")
    plan.add_argument("--device", choices=sorted(DEVICES), help="check the plan against this device and give "
                      "its hours (default: the reference machine's hours)")
    plan.add_argument("--memory-gb", type=float, help="check the plan against this much memory (GiB; it overrides "
                      "the device's)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (a list of rows)")
    plan.set_defaults(run=_plan)


def _plan(args: argparse.Namespace) -> int:
    import pandas as pd

    from .plan import PlanDoesNotFit, plan, summary

    if args.scale != "paper":
        raise UsageError(f"--scale: plans are made for the paper scale, from the reference store; got {args.scale!r}")
    try:
        table = plan(args.model, args.experiment, dtype=args.dtype, device=args.device, memory_gib=args.memory_gb)
    except PlanDoesNotFit as error:
        print(f"does not fit: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print(table.to_json(orient="records", indent=1))
        return 0
    totals = summary(table)
    where = args.device or "the reference machine (2 CPU threads)"
    untimed = f" (and {totals['untimed']} units with no measured time)" if totals["untimed"] else ""
    print(f"{args.experiment} on {args.model} ({args.dtype}), paper scale, on {where}: {totals['units']} units, "
          f"the largest needs {totals['peak_gib']:.1f} GiB, about {totals['hours']:.2f} h{untimed}")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False))
    return 0


def _is_input_error(error: Exception) -> bool:
    """Errors whose message names the input and the fix: shown as one line."""
    from .corpus import CorpusError
    from .datasets import DatasetError
    from .editing import EditError
    from .experiments.store import MissingResultsError, StoreError
    from .loading import ModelLoadError

    return isinstance(error, (UsageError, DatasetError, ModelLoadError, EditError, CorpusError,
                              FileNotFoundError, MissingResultsError, StoreError))


if __name__ == "__main__":
    sys.exit(main())
