"""What does editing cost? Covariance passes and IntAttn-Edit vs MEMIT, in one run.

The script prints

1. the second moments of every edited layer's two keys (``down_proj`` and ``o_proj``
   inputs) collected in one streaming pass vs one pass per (module, layer), on the same
   tokens (time of the collection passes, the corpus being read once before), with the
   largest difference between the two results;
2. IntAttn-Edit vs MEMIT wall time for the same batch of edits (KnowEdit ZsRE test
   records), targets included, as a ratio (the extra attention solve should cost little),
   and each method's Edit Succ. on the batch;
3. the peak resident memory of each phase (sampled every 20 ms).

Run it alone on the machine; other processes on the same cores distort the timings.

    python benchmarks/bench_editing.py                        # SmolLM2, 100 edits
    python benchmarks/bench_editing.py --edits 20 --mom2-tokens 5000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import pandas as pd
import psutil
import torch

import intattn_analysis as ia


@contextmanager
def peak_rss(out: dict, key: str, period: float = 0.02):
    """Record the peak resident set size (MiB) of this process while the block runs."""
    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(period)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out[key] = max(peak[0], process.memory_info().rss) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=100, help="0: second moments only")
    parser.add_argument("--dataset", default="knowedit/ZsRE-test-all.json")
    parser.add_argument("--mom2-tokens", type=int, default=20_000)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="IntAttn-Edit's attention share for the timing (0 would skip its extra solve)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-per-layer", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ia.load_model(args.model)
    hp = ia.hparams_for(model).replace(mom2_n_tokens=args.mom2_tokens, alpha=args.alpha)
    memory: dict[str, float] = {}
    lines = []
    print(f"{model.name}: layers {list(hp.layers)}, alpha {hp.alpha}, {args.edits} edits, "
          f"second moments from {args.mom2_tokens} tokens, threads={args.threads}")

    # the corpus is sampled (and cached) first, so both collections read the same tokens
    ia.second_moments(model, hp.layers[:1], modules=("mlp",), n_tokens=hp.mom2_n_tokens,
                      max_len=hp.mom2_max_len, cache_dir=False, progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        with peak_rss(memory, "moments, one pass"):
            start = time.perf_counter()
            one = ia.second_moments(model, hp.layers, n_tokens=hp.mom2_n_tokens,
                                    max_len=hp.mom2_max_len, cache_dir=scratch, progress=False)
            one_s = one.seconds or time.perf_counter() - start  # collection passes only
    lines.append(("second moments, one pass", len(one), one_s))
    if not args.skip_per_layer:
        from intattn_analysis.covariance import second_moments_per_layer

        with peak_rss(memory, "moments, per layer"):
            start = time.perf_counter()
            per = second_moments_per_layer(model, hp.layers, n_tokens=hp.mom2_n_tokens,
                                           max_len=hp.mom2_max_len, progress=False)
            per_s = per.seconds or time.perf_counter() - start
        lines.append(("second moments, one pass per (module, layer)", len(per), per_s))
        diff = max(float((one[k] - per[k]).abs().max()) for k in one)
        print(f"one pass vs per-layer passes: max |difference| {diff:.2e}")

    if args.edits == 0:  # second moments only
        out = pd.DataFrame(lines, columns=["phase", "items", "wall_s"])
        print(out.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
        if not args.skip_per_layer:
            print(f"per-layer passes / one pass: {per_s / one_s:.2f}x")
        return 0
    # records whose target_new equals target_true ask for no change and cannot be edited
    facts = [f for f in ia.load_facts(ia.benchmark_path(args.dataset)) if f.changes_answer]
    facts = facts[: args.edits]
    pre = ia.evaluate(model, facts, metrics=("knowedit",), progress=False)
    scores = {}
    for method in ("memit", "intattn"):
        with peak_rss(memory, f"edit, {method}"):
            start = time.perf_counter()
            with ia.edit(model, facts, method=method, hparams=hp, moments=one, progress=False) as result:
                seconds = time.perf_counter() - start
                post = ia.evaluate(model, facts, pre=pre, metrics=("knowedit",), progress=False)
        scores[method] = post.summary
        lines.append((f"edit, {method} (targets {result.timings['targets']:.0f} s, "
                      f"solve {result.timings['solve']:.1f} s)", len(facts), seconds))

    out = pd.DataFrame(lines, columns=["phase", "items", "wall_s"])
    out["peak_rss_mib"] = [memory.get(k) for k in
                           ["moments, one pass", *([] if args.skip_per_layer else ["moments, per layer"]),
                            "edit, memit", "edit, intattn"]]
    pd.set_option("display.width", 200)
    print(out.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    if not args.skip_per_layer:
        print(f"per-layer passes / one pass: {per_s / one_s:.2f}x")
    memit_s, intattn_s = out["wall_s"].iloc[-2], out["wall_s"].iloc[-1]
    print(f"IntAttn-Edit / MEMIT wall time: {intattn_s / memit_s:.2f}")
    table = pd.DataFrame(scores).T[["Edit Succ.", "Rephrase", "Portability", "Locality"]]
    print((table * 100).round(1).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
