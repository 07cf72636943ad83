"""The ``intattn`` command.

``intattn reproduce``  executes the notebooks in order (figures land in ``figures/``).
``intattn known``      recomputes which built-in facts each embedded model knows.
``intattn models``     lists the embedded models and the supported architectures.
``intattn evaluate``   edits batches of benchmark facts with several methods and prints
                       (and saves) the main-table metrics, e.g.
                       ``intattn evaluate --data knowedit/ZsRE-test-all.json --batch-size 100``.
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


def _evaluate(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from . import reporting
    from .covariance import second_moments
    from .datasets import benchmark_path, load_facts
    from .editing import METHODS
    from .hparams import hparams_for
    from .loading import load_model
    from .runs import edit_batches, editable_batches

    if args.threads:
        torch.set_num_threads(args.threads)
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
    batches, unchanged = editable_batches(facts, args.batch_size, args.batches, offset=args.offset)
    if unchanged:
        print(f"note: {len(unchanged)} record(s) left out: target_new equals target_true",
              file=sys.stderr)
    model = load_model(args.model)
    hp = hparams_for(model)
    changes = {}
    if args.layers:
        changes["layers"] = tuple(args.layers)
    if args.alpha is not None:
        changes["alpha"] = args.alpha
    elif args.layers and isinstance(hp.alpha, dict):
        missing = [l for l in args.layers if l not in hp.alpha]
        reads_alpha = [m for m in args.methods if m in METHODS and METHODS[m].attn_share == "alpha"]
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
    hp = hp.replace(**changes)
    print(f"{model.name}: {len(batches)} batch(es) of {args.batch_size} from {path.name}; "
          f"layers {list(hp.layers)}, lambda {hp.lambda_mlp:g}, {hp.mom2_n_tokens} corpus tokens",
          flush=True)
    moments = second_moments(model, hp.layers, n_tokens=hp.mom2_n_tokens, max_len=hp.mom2_max_len,
                             dtype=hp.torch_mom2_dtype, progress=True)
    run = edit_batches(model, batches, args.methods, hp, moments=moments, dataset=path.stem,
                       metrics=args.metrics, fluency_tokens=args.fluency_tokens)
    table = reporting.formatted(run.table([m for m in reporting.MAIN_METRICS
                                           if m in run.records.columns]))
    print(table.to_string())
    timing = run.timings.groupby("method")[["targets_s", "solve", "total"]].mean()
    print(timing.round(1).to_string())
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        names = [out.name + ".csv", out.name + "_per_fact.csv", out.name + ".md"]
        run.records.to_csv(out.with_name(names[0]), index=False)
        run.per_fact.to_csv(out.with_name(names[1]), index=False)
        out.with_name(names[2]).write_text(reporting.markdown_table(table))
        print(f"wrote {', '.join(names)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .loading import EMBEDDED_MODELS

    parser = argparse.ArgumentParser(prog="intattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    reproduce = sub.add_parser("reproduce", help="execute the notebooks in order")
    reproduce.add_argument("--notebooks-dir", default=str(_repo_root() / "notebooks"))
    reproduce.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 01")
    reproduce.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    reproduce.set_defaults(run=_reproduce)

    known = sub.add_parser("known", help="recompute the built-in facts' known flags")
    known.add_argument("--models", nargs="+", default=list(EMBEDDED_MODELS))
    known.add_argument("--write", action="store_true", help="store the flags in the package")
    known.set_defaults(run=_known)

    models = sub.add_parser("models", help="list embedded models and architectures")
    models.set_defaults(run=_models)

    evaluate = sub.add_parser(
        "evaluate", help="edit batches of benchmark facts and print the main-table metrics"
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
    evaluate.add_argument("--v-steps", type=int, help="steps of the target optimisation")
    evaluate.add_argument("--fluency-tokens", type=int, default=50)
    evaluate.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    evaluate.add_argument("--lenient", action="store_true",
                          help="skip (and list) malformed records instead of stopping")
    evaluate.add_argument("--out", help="write OUT.csv, OUT_per_fact.csv and OUT.md (OUT without a suffix)")
    evaluate.set_defaults(run=_evaluate)

    args = parser.parse_args(argv)
    if args.command == "evaluate" and args.batches == 0:
        args.batches = None
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
