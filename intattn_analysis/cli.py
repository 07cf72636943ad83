"""The ``intattn`` command.

``intattn reproduce``  executes the notebooks in order (figures land in ``figures/``).
``intattn known``      recomputes which built-in facts each embedded model knows.
``intattn models``     lists the embedded models and the supported architectures.
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

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
