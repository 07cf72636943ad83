"""Choose an editor's settings on train records: a grid of hparam values, each run on the
same batch, with each metric's mean and 95% interval and the paired difference from MEMIT.

Settings are chosen on train records (KnowEdit's ZsRE test records are for reporting).
Every grid point is a unit of the ``editors`` experiment's store under
``<cache root>/tuning/<model>/<dataset>-<facts>-<hash of the defaults>``, so a killed run resumes
and a grown grid reuses what is done. The table is printed and written to
``figures/tuning/<method>-<model>.csv``; its ``baseline`` column names the MEMIT defaults
that the ``MEMIT`` row and every paired difference were measured against, so rows measured
before a change of defaults are kept beside the new ones rather than replaced.

    python scripts/tune_editor.py pmet --grid clamp_norm_factor=1,2,4 --grid v_weight_decay=0.5,0.001
    python scripts/tune_editor.py rome --grid layers=2,3,5 --facts 20
    python scripts/tune_editor.py memit --model gemma-3-270m --set mom2_n_tokens=20000 --grid v_steps=40
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import pandas as pd
import torch

import intattn_analysis as ia
from intattn_analysis.experiments import editors
from intattn_analysis.experiments.common import dataset_batches, dataset_label
from intattn_analysis.experiments.store import ResultStore, unit_id
from intattn_analysis.loading import cache_root
from intattn_analysis.plots import figures_dir


def parse_grid(items: list[str], option: str = "--grid") -> dict[str, list]:
    """``["name=v1,v2", ...]`` as ``{name: [v1, v2]}``; values are read as JSON where they
    parse (numbers, booleans) and as strings otherwise; ``layers=3`` means ``(3,)`` and
    ``layers=3-5`` means ``(3, 4, 5)``."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"{option} {item!r}: write NAME=VALUE[,VALUE...]")
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


def grown(previous: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The written table after a new grid: earlier grids' rows (on any model, dataset or
    number of facts) are kept, and a row measured again on as many facts replaces its old
    value."""
    key = ["model", "dataset", "setting", "metric"]
    for column in ("n_edits", "baseline"):
        if column in previous and column in table:
            key.append(column)
    return pd.concat([previous, table]).drop_duplicates(key, keep="last").reset_index(drop=True)


def describe(hp) -> str:
    """The settings of ``hp`` that differ from its class's own defaults, in the grid's
    ``name=value`` form (the layers always): ``"layers=3-4-5 lambda_mlp=250.0 ..."``."""
    plain = type(hp)(layers=hp.layers).effective_dict()
    parts = [f"layers={'-'.join(map(str, hp.layers))}"]
    for name, value in hp.effective_dict().items():
        if name != "layers" and value != plain.get(name):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def store_folder(model: str, dataset: str, facts: int, defaults: tuple = ()):
    """Where a grid's units live: one store per (model, dataset, number of facts, defaults).
    A batch of 50 facts and one of 100 are different configurations of the same labels
    (``MEMIT`` on batch 0), and so are the same labels before and after a change of the
    defaults the grid is built on; one store may hold only one of them. ``defaults`` are
    the hparams the labels are relative to (MEMIT's and the method's)."""
    name = f"{dataset_label(dataset)}-{facts}"
    if defaults:  # the store's own key hash: readable label, then 16 hex digits
        name = unit_id({"defaults": [hp.effective_dict() for hp in defaults]}, name)
    return cache_root() / "tuning" / model / name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="an editor name: rome, pmet, alphaedit, ft-l, ...")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="zsre-train")
    parser.add_argument("--facts", type=int, default=50, help="train records in the batch")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="an hparam and the values to try (repeatable: the grid is the product)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="an hparam changed for every setting, MEMIT's included (a field "
                             "both have, e.g. mom2_n_tokens=20000 for a cheaper corpus sample)")
    parser.add_argument("--each-alone", action="store_true",
                        help="edit each fact alone on the unedited model (the 'ROME, each alone' protocol)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ia.load_model(args.model)
    base = ia.hparams_for(model, args.method)
    memit = ia.hparams_for(model, "memit")
    fixed = parse_grid(args.set, "--set")
    several = [name for name, values in fixed.items() if len(values) != 1]
    if several:
        raise SystemExit(f"--set takes one value per field ({several}); use --grid to try several")
    fixed = {name: values[0] for name, values in fixed.items()}
    unknown = [name for name in fixed if not (hasattr(base, name) and hasattr(memit, name))]
    if unknown:
        raise SystemExit(f"--set: {type(base).__name__} and MEMIT's hparams do not both have field(s) {unknown}")
    base, memit = base.replace(**fixed), memit.replace(**fixed)
    grid = parse_grid(args.grid)
    unknown = [name for name in grid if not hasattr(base, name)]
    if unknown:
        raise SystemExit(f"{type(base).__name__} has no field(s) {unknown}")
    settings = {"MEMIT": ("memit", memit)}
    for values in itertools.product(*grid.values()):
        changes = dict(zip(grid, values))
        label = args.method + (" alone" if args.each_alone else "") + "".join(
            f" {k}={'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in changes.items())
        settings[label] = (args.method, base.replace(**changes))
    batches = dataset_batches(args.dataset, args.facts, 1)
    dataset = dataset_label(args.dataset)  # a file's stem, as the editors experiment stores it
    folder = store_folder(args.model, args.dataset, args.facts, (memit, base))
    store = ResultStore(folder, editors.NAME)
    alone = [name for name in settings if name != "MEMIT"] if args.each_alone else []
    editors.run_methods(model, batches, settings, store, dataset=dataset, alone=alone, progress=True)
    summary = editors.summarise(store)
    names = list(settings)
    intervals = summary["intervals"]
    intervals = intervals[intervals["setting"].isin(names) & (intervals["dataset"] == dataset)]
    paired = summary["paired"]
    paired = paired[paired["setting"].isin(names) & (paired["dataset"] == dataset)]
    table = intervals.merge(paired[["setting", "metric", "diff", "ci_low", "ci_high"]],
                            on=["setting", "metric"], how="left", suffixes=("", "_vs_memit"))
    table = table[table["metric"].isin(["Edit Succ.", "Rephrase", "Portability", "Locality", "Fluency"])]
    table = table.assign(baseline="memit " + describe(memit))
    pd.set_option("display.width", 250)
    wide = table.pivot_table(index="setting", columns="metric", values="mean", sort=False).round(1)
    print(wide.to_string())
    out = figures_dir() / "tuning"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.method}-{args.model}.csv"
    if path.exists():
        table = grown(pd.read_csv(path), table)
    table.to_csv(path, index=False, float_format="%.6g")
    print("written", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
