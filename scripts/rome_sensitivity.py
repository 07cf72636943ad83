"""How sensitive is ROME's fact-after-fact batch to rounding? One batch written three times.

ROME writes a batch one fact after another, each rank-one update computed on the model as
the earlier ones left it. The script writes the first ``--facts`` editable ZsRE test
records that way three times on the same loaded model, restoring the weights in between:

* ``again``: exactly as the first time (the same code, inputs and machine: the rows must
  be identical);
* ``perturbed``: with every weight of the edited matrix multiplied by ``1 + 2⁻²¹`` before
  the batch is written (put back after): a relative change of 5e-7, about four units in
  the last place of float32, the size of a difference in the last digits of a forward.

It writes one row per comparison with the facts whose Edit Succ. differs and the two
means, so that ``docs/results/editors.md`` says how far apart two computations of the
same ROME unit can be. Batch editors (MEMIT, AlphaEdit, IntAttn-Edit) solve once for the
whole batch and are not chaotic in this way; the script measures ROME alone.

    python scripts/rome_sensitivity.py --facts 30 --csv figures/paper/rome_sensitivity.csv
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch

import intattn_analysis as ia
from intattn_analysis.editors.moments import moments_for
from intattn_analysis.experiments.common import dataset_batches

PERTURBATION = 2.0 ** -21


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--facts", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        facts = dataset_batches(args.dataset, args.facts, 1)[0]
    model = ia.load_model(args.model)
    hp = ia.hparams_for(model, "rome")
    moments = moments_for(model, [("mlp", hp.layers[0])], hp, progress=False)
    pre = ia.evaluate(model, facts, metrics=("knowedit",), progress=False)
    weight = model.weight("mlp", hp.layers[0])
    original = weight.detach().clone()
    scores = {}
    for name, factor in (("first", 1.0), ("again", 1.0), ("perturbed", 1.0 + PERTURBATION)):
        with torch.no_grad():
            weight.mul_(factor)
        try:
            with ia.edit(model, facts, method="rome", hparams=hp, moments=moments, progress=False):
                scores[name] = ia.evaluate(model, facts, pre=pre, metrics=("knowedit",), progress=False).per_fact
        finally:
            with torch.no_grad():
                weight.copy_(original)
    rows = []
    for other, change in (("again", "none"), ("perturbed", "edited matrix x (1 + 2^-21)")):
        first, second = scores["first"]["Edit Succ."], scores[other]["Edit Succ."]
        rows.append({"model": args.model, "dataset": args.dataset, "method": "rome", "n_facts": len(facts),
                     "comparison": f"first vs {other}", "change": change,
                     "facts_differing": int((first != second).sum()),
                     "edit_succ_first": 100 * float(first.mean()), "edit_succ_other": 100 * float(second.mean())})
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.float_format", "{:.1f}".format):
        print(table.to_string(index=False))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.round(4).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
