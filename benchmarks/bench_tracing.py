"""How fast is causal tracing? The batched engine against three yardsticks, in one run.

On the same facts and settings the script times

1. ``ia.trace``, the batched engine (many sites per forward, each forward resumed at the
   lowest restored layer and the first restored token);
2. the one-site-per-forward reference (:mod:`intattn_analysis.tracing_reference`, ROME's
   loop: every site is one full forward batched over the noise draws), and checks
   that both give the same probabilities;
3. TransformerLens' own ``patching.generic_activation_patch`` for the kind it fits, the
   residual stream (one forward per (layer, position), the corrupted batch being the noise
   draws); windowed attention/MLP restores patch several activations per forward and do
   not fit its one-activation-per-index interface;
4. a plain batched forward of the model over as many rows (prompt copies) as the trace
   restores: the practical limit for any method that runs the whole prompt per row.

A second table compares, per fact and at the same noise draws, exact tracing with
attribution patching (``method="attribution"``, AtP, and ``"attribution*"``, AtP with
GradDrop; :mod:`intattn_analysis.attribution`): seconds per fact, the ratio of exact
tracing's time to each, and each method's time over that of one plain forward and backward
of the prompt batched over the draws (the least any gradient method can cost).

It prints, per method: forward passes, restored rows, wall time, rows per second and the
ratio to the engine. Run it alone on the machine: other processes competing for the cores
distort every number (the ratios less than the times).

    python benchmarks/bench_tracing.py                   # full trace of 1 fact, SmolLM2
    python benchmarks/bench_tracing.py --facts 2 --threads 2 --samples 10
    python benchmarks/bench_tracing.py --facts 4 --skip-reference --skip-transformerlens --skip-plain \
        --csv figures/benchmarks/tracing.csv   # the table docs/results/attribution.md shows
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import pandas as pd
import torch

import intattn_analysis as ia
from intattn_analysis.architectures import hook
from intattn_analysis.predictions import first_answer_token
from intattn_analysis.tracing import Noise, noise_draws, subject_span, token_classes
from intattn_analysis.tracing_reference import reference_trace


@contextmanager
def counted_forwards(bridge):
    """Count forward passes while the block runs: calls of the final norm, which every
    path (``bridge(...)``, ``run_with_hooks``, ``run_with_cache``) goes through once."""
    calls = [0]

    def count(module, args):
        calls[0] += 1

    handle = bridge.ln_final.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_engine(model, facts, args):
    with counted_forwards(model.bridge) as calls:
        result, wall = timed(
            lambda: ia.trace(
                model, facts, window=args.window, samples=args.samples, seed=args.seed,
                layers=args.layer_list, progress=False,
            )
        )
    return result, wall, calls[0]


def run_reference(model, facts, args):
    with counted_forwards(model.bridge) as calls:
        (rows, skipped), wall = timed(
            lambda: reference_trace(
                model, facts, window=args.window, samples=args.samples, seed=args.seed,
                layers=args.layer_list,
            )
        )
    return pd.DataFrame(rows), wall, calls[0]


def run_transformerlens(model, facts, args):
    """Residual-stream restores with ``patching.generic_activation_patch``."""
    from transformer_lens import patching

    std = Noise.of(3.0).std(model)
    total_rows, wall, forwards, probs = 0, 0.0, 0, []
    for fact in facts:
        ids = torch.tensor(model.tokenize(fact.text), device=model.device)
        start, end = subject_span(model, fact)
        answer = first_answer_token(model, fact.target_true)
        classes = token_classes(ids.shape[1], start, end)
        positions = [t for t, c in enumerate(classes) if c is not None]
        noise = noise_draws(fact, args.samples, end - start, model.d_model, args.seed, std)

        def add_noise(x, hook=None):
            x = x.clone()
            x[:, start:end] = x[:, start:end] + noise
            return x

        index = pd.DataFrame(
            [(layer, t) for layer in args.layer_list or range(model.n_layers) for t in positions],
            columns=["layer", "pos"],
        )

        def p_answer(logits):
            return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer].mean()

        def go():
            _, clean = model.bridge.run_with_cache(ids)
            with model.bridge.hooks(fwd_hooks=[(hook("embed"), add_noise)]):
                return patching.generic_activation_patch(
                    model.bridge, ids.expand(args.samples, -1), clean, p_answer,
                    _resid_setter, "resid_pre", index_df=index,
                )

        with counted_forwards(model.bridge) as calls:
            out, seconds = timed(go)
        wall += seconds
        forwards += calls[0]
        total_rows += len(index) * args.samples
        probs.append(pd.DataFrame({"fact": fact.key, "layer": index["layer"], "token": index["pos"],
                                   "p_restored": out.double().cpu().numpy()}))
    return pd.concat(probs), wall, forwards, total_rows


def _resid_setter(corrupted, index, clean):
    """Put the clean residual stream (``clean``: this layer's clean activation) back at
    one position; ``index`` is ``(layer, pos)``."""
    corrupted[:, index[1]] = clean[:, index[1]]
    return corrupted


def run_plain(model, facts, n_rows_per_fact, batch_rows):
    """Full forwards of the prompt, ``n_rows`` copies per fact, in batches."""
    forwards, wall = 0, 0.0
    for fact, n_rows in zip(facts, n_rows_per_fact):
        ids = torch.tensor(model.tokenize(fact.text), device=model.device)
        batch = batch_rows or max(1, ia.tracing.DEFAULT_TOKENS_PER_BATCH // ids.shape[1])
        start = time.perf_counter()
        with torch.no_grad():
            for first in range(0, n_rows, batch):
                model.bridge(ids.expand(min(batch, n_rows - first), -1))
                forwards += 1
        wall += time.perf_counter() - start
    return wall, forwards


def run_method(model, facts, args, method):
    """Seconds for tracing ``facts`` with ``method`` (every kind, token and layer)."""
    result, wall = timed(lambda: ia.trace(model, facts, window=args.window, samples=args.samples, seed=args.seed,
                                          layers=args.layer_list, method=method, progress=False))
    return result, wall


def run_forward_backward(model, facts, samples):
    """Seconds for one forward and backward of each prompt over ``samples`` rows, the
    gradient taken with respect to the embeddings (no weight gradients) and the
    unembedding cut to the last position, as in AtP."""
    from intattn_analysis.model_access import FINAL_NORM_HOOK, keep_last_position

    wall = 0.0
    for fact in facts:
        ids = torch.tensor(model.tokenize(fact.text), device=model.device).expand(samples, -1)
        answer = first_answer_token(model, fact.target_true)
        start = time.perf_counter()
        leaf = {}

        def keep(x, hook=None):
            leaf["x"] = x.detach().requires_grad_(True)
            return leaf["x"]

        hooks = [(hook("embed"), keep)]
        if FINAL_NORM_HOOK in model.bridge.hook_dict:
            hooks.append((FINAL_NORM_HOOK, keep_last_position))
        with torch.enable_grad(), model.bridge.hooks(fwd_hooks=hooks):
            logits = model.bridge(ids)
            torch.softmax(logits[:, -1].float(), -1)[:, answer].sum().backward()
        wall += time.perf_counter() - start
    return wall


def attribution_table(model, facts, args, exact_result, exact_wall) -> pd.DataFrame:
    """Per-fact seconds of exact tracing, AtP and AtP* at equal draws, with their ratios."""
    from intattn_analysis.attribution import attribution_agreement

    forward_backward = run_forward_backward(model, facts, args.samples)
    lines = [("exact (ia.trace)", exact_wall, float("nan"))]
    for method in ("attribution", "attribution*"):
        result, wall = run_method(model, facts, args, method)
        _, summary = attribution_agreement(exact_result, result)
        rho = summary[(summary["kind"] == "all") & (summary["measure"] == "spearman")]["mean"].item()
        lines.append((f"{method} (ia.trace, method={method!r})", wall, rho))
    out = pd.DataFrame(lines, columns=["method", "wall_s", "spearman_vs_exact"])
    out["s_per_fact"] = out["wall_s"] / len(facts)
    out["exact_over_method"] = exact_wall / out["wall_s"]
    out["over_forward_backward"] = out["wall_s"] / forward_backward
    return out[["method", "s_per_fact", "exact_over_method", "over_forward_backward", "spearman_vs_exact"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=1, help="known built-in facts to trace")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-transformerlens", action="store_true")
    parser.add_argument("--skip-attribution", action="store_true")
    parser.add_argument("--skip-plain", action="store_true", help="leave out the plain batched forward")
    parser.add_argument("--csv", help="also write the attribution table here, with the settings that made it "
                        "(a file of other models keeps their rows)")
    args = parser.parse_args(argv)
    args.layer_list = [int(l) for l in args.layers.split(",")] if args.layers else None

    torch.set_num_threads(args.threads)
    model = ia.load_model(args.model)
    facts = ia.sample_by_relation(ia.known_facts(ia.load_facts("builtin"), model.name), args.facts)
    print(f"{model.name}: {len(facts)} fact(s), all tokens x {len(args.layer_list or range(model.n_layers))} layers x 3 kinds, "
          f"samples={args.samples}, window={args.window}, threads={args.threads}")
    for fact in facts:
        print(f"  {fact.text!r} -> {fact.target_true!r} ({len(model.tokenize(fact.text)[0])} tokens)")

    ia.trace(model, facts[:1], layers=[0], kinds=("resid",), samples=1, progress=False)  # warm-up
    engine, engine_wall, engine_forwards = run_engine(model, facts, args)
    table = engine.to_dataframe()
    rows_per_fact = [int((table["fact"] == f.key).sum()) * args.samples for f in facts]
    n_rows = sum(rows_per_fact)
    lines = [("batched engine (ia.trace)", engine_forwards, n_rows, engine_wall)]

    notes = []
    if not args.skip_reference:
        reference, ref_wall, ref_forwards = run_reference(model, facts, args)
        lines.append(("one-site reference (ROME loop)", ref_forwards, n_rows, ref_wall))
        merged = table.merge(reference, on=["fact", "kind", "token", "layer"], suffixes=("", "_ref"))
        diff = float((merged["p_restored"] - merged["p_restored_ref"]).abs().max())
        notes.append(f"engine vs reference: {len(merged)} of {len(table)} sites compared, "
                     f"max |p difference| {diff:.2e}")
    if not args.skip_transformerlens:
        tl, tl_wall, tl_forwards, tl_rows = run_transformerlens(model, facts, args)
        share = tl_rows / n_rows
        lines.append(("TransformerLens generic_activation_patch (resid only)", tl_forwards, tl_rows, tl_wall))
        resid = table[table["kind"] == "resid"].merge(tl, on=["fact", "layer", "token"], suffixes=("", "_tl"))
        diff = float((resid["p_restored"] - resid["p_restored_tl"]).abs().max())
        notes.append(f"engine vs TransformerLens on resid sites: max |p difference| {diff:.2e}; "
                     f"its rows are {share:.0%} of the full trace's")
    if not args.skip_plain:
        plain_wall, plain_forwards = run_plain(model, facts, rows_per_fact, None)
        lines.append(("plain batched forward, same rows", plain_forwards, n_rows, plain_wall))

    out = pd.DataFrame(lines, columns=["method", "forwards", "rows", "wall_s"])
    out["rows_per_s"] = out["rows"] / out["wall_s"]
    engine_rate = out.loc[0, "rows_per_s"]
    out["engine_speedup"] = engine_rate / out["rows_per_s"]
    pd.set_option("display.width", 200)
    print(out.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for note in notes:
        print(note)
    if not args.skip_plain:
        print(f"engine wall / plain-forward wall for the same rows: {engine_wall / plain_wall:.2f}")
    if not args.skip_attribution:
        print(f"\nattribution patching, {len(facts)} fact(s), samples={args.samples} for every method:")
        table = attribution_table(model, facts, args, engine, engine_wall)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        if args.csv:
            from pathlib import Path

            settings = {"model": model.name, "facts": len(facts), "samples": args.samples, "window": args.window,
                        "threads": args.threads}
            out = table.assign(**settings)[[*settings, *table.columns]]
            if Path(args.csv).exists():  # one file for every model: this model's rows replaced
                before = pd.read_csv(args.csv)
                out = pd.concat([before[before["model"] != model.name], out], ignore_index=True)
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            out.to_csv(args.csv, index=False, float_format="%.4g")
            print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
