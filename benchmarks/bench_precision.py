"""What does a half-precision model cost on this machine? Each dtype against float32, in one run.

The model is loaded once per dtype and timed on the same random token batch:

1. a forward pass of the batch (what tracing, second moments and evaluation run);
2. a forward and a backward pass, the gradient taken with respect to the input embeddings
   with every weight frozen (what the target optimisation and attribution patching run).

Each time is the median of ``--repeats`` runs after one warm-up; the table gives seconds
and each dtype's time over float32's. On hardware with bfloat16 matrix units (recent GPUs,
CPUs with AMX or AVX512-BF16) the ratio is below 1; elsewhere PyTorch emulates the matrix
products and it is far above. Run it alone on the machine: other processes competing for
the cores distort every number.

    python benchmarks/bench_precision.py                       # SmolLM2, float32 and bfloat16
    python benchmarks/bench_precision.py --dtypes float32 bfloat16 float16 --rows 4 --tokens 32
    python benchmarks/bench_precision.py --csv figures/benchmarks/precision.csv   # the table docs/results/precision.md shows
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import intattn_analysis as ia


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and kernel choices
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_dtype(model, ids: torch.Tensor, repeats: int) -> dict:
    """Seconds of a forward and of a forward with backward of ``ids`` through ``model``."""
    hf = model.hf_model
    for parameter in hf.parameters():
        parameter.requires_grad_(False)

    @torch.no_grad()
    def forward():
        hf(input_ids=ids)

    def forward_backward():
        embeddings = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=embeddings).logits
        torch.log_softmax(logits[:, -1].float(), dim=-1)[:, 0].sum().backward()

    return {"dtype": str(model.dtype).replace("torch.", ""), "forward_s": _median_seconds(forward, repeats),
            "forward_backward_s": _median_seconds(forward_backward, repeats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=8, help="sequences in the batch")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.dtypes[0] != "float32":
        parser.error("--dtypes must start with float32, the dtype the ratios are taken against")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, ids = [], None
    for dtype in args.dtypes:
        model = ia.load_model(args.model, dtype=dtype, device="cpu")
        if ids is None:  # the same token batch for every dtype
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.tokenizer.vocab_size, (args.rows, args.tokens), generator=generator)
        rows.append(time_dtype(model, ids, args.repeats))
        del model
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    table["forward_ratio"] = table["forward_s"] / base["forward_s"]
    table["forward_backward_ratio"] = table["forward_backward_s"] / base["forward_backward_s"]
    table.insert(0, "model", args.model)
    table.insert(2, "rows", args.rows)
    table.insert(3, "tokens", args.tokens)
    table.insert(4, "threads", torch.get_num_threads())
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.round(4).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
