"""What does editing cost? Every phase against its limit, and against older code, in one run.

On one batch of edits (KnowEdit ZsRE test records by default) the script times

1. **second moments**: every edited layer's two keys (``down_proj`` and ``o_proj``
   inputs) collected in one streaming pass vs one pass per (module, layer), on the same
   tokens, with the largest difference between the two results (``--skip-moments`` to
   leave this out);
2. **targets** (``compute_z``): the suffix path (each step runs only the positions from
   the subject's last token on) against the code of ``--baseline`` (a git commit, default
   ``421f15e``, loaded from the repository as it was) and, with ``--whole-rows``, against
   this code running whole rows (the path before the suffix engine, same stop rule). The
   *limit* is a dense forward+backward from block ``L + 1`` over exactly the suffix
   positions the optimisation had to run (no padding, no prefix, no Python per row),
   timed on a ``[64, 8]`` block and scaled to those positions;
3. **solve**: MEMIT's update given the targets; its limit is what the update cannot skip:
   one forward of the key rows to each edited layer plus the dense solves of its size;
4. **evaluation** (KnowEdit metrics and Fluency, 50 greedy tokens): this code against
   the baseline commit's ``evaluate`` on the unedited model, with the metrics compared;
   the limit is a plain forward over the same rows (every scored sequence once, and every
   prompt with its generated tokens once); then the **generation protocol** (KnowEdit
   metrics from greedy answers to a natural stop, ``ia.evaluate(protocol="generation")``),
   whose limit is a plain forward per generated token: every probe's prompt with the
   tokens it generated, run once, so that each generated token costs one position of
   one forward and nothing else (no sequential steps, no cache, no stop checks);
5. **IntAttn-Edit vs MEMIT** solve time on the same batch and targets (``--alpha``),
   and both edits' KnowEdit metrics.

Each line gives wall time, seconds per edit, the ratio to the limit and the ratio to the
new code. Run it alone on the machine: other processes on the same cores distort timings.

    python benchmarks/bench_editing.py                          # SmolLM2, 100 edits
    python benchmarks/bench_editing.py --edits 16 --whole-rows --skip-moments
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

import intattn_analysis as ia
from intattn_analysis import metrics as metrics_now
from intattn_analysis import targets as targets_now

REPO = Path(__file__).resolve().parent.parent
STATM = Path("/proc/self/statm")
SAMPLES_RSS = STATM.exists()


def resident_bytes() -> int:
    """The resident set size of this process now, in bytes: the second field of
    ``/proc/self/statm`` (resident pages) times the page size."""
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_peak_bytes() -> int:
    """The largest resident set size this process has had since it started, in bytes
    (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def peak_rss(out: dict, key: str, period: float = 0.02):
    """Record the peak resident set size (MiB) of this process while the block runs.

    A background thread reads the resident set size from ``/proc/self/statm`` every
    ``period`` seconds and once more when the block ends, so a peak shorter than
    ``period`` can be missed. Where there is no ``/proc/self/statm`` (macOS) the value is
    the process's peak since it started (``getrusage``), an upper bound for the block's,
    and :func:`_report` says so.
    """
    if not SAMPLES_RSS:
        try:
            yield
        finally:
            out[key] = process_peak_bytes() / 2**20
        return
    peak = [resident_bytes()]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(period)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out[key] = max(peak[0], resident_bytes()) / 2**20


def module_at(commit: str, name: str) -> types.ModuleType:
    """``intattn_analysis/<name>.py`` as it was at ``commit``, imported beside today's
    package (its relative imports resolve to today's modules)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:intattn_analysis/{name}.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    module = types.ModuleType(f"intattn_analysis._{name}_at_{commit}")
    module.__package__ = "intattn_analysis"
    module.__file__ = f"{commit}:intattn_analysis/{name}.py"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- limits
def dense_step_seconds_per_position(model, layer: int, rows: int = 64, width: int = 8,
                                    scored: int = 3, repeats: int = 3) -> float:
    """Seconds per position of a forward+backward from block ``layer + 1`` on a dense
    ``[rows, width]`` residual block, unembedding ``scored`` positions per row."""
    from intattn_analysis.model_access import FINAL_NORM_HOOK, resume

    scale = float(model.hf_model.get_input_embeddings().weight.std()) * 10
    x = (torch.randn(rows, width, model.d_model) * scale).requires_grad_(True)
    hooks = [(FINAL_NORM_HOOK, lambda y, hook=None: y[:, -scored:].contiguous())]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        logits = resume(model, x, layer + 1, hooks)
        torch.log_softmax(logits.float(), dim=-1)[..., 0].sum().backward()
        best = min(best, time.perf_counter() - start)
        x.grad = None
    return best / (rows * width)


@torch.no_grad()
def solve_limit_seconds(model, facts, hp, templates, n_modules: int) -> float:
    """One forward of every key row to each edited layer, plus the dense solves."""
    from intattn_analysis.model_access import hook, read_hooks
    from intattn_analysis.targets import pad_rows, prompt_rows

    def resid_after(model, ids, layer):
        name = hook("resid_post", layer)
        return read_hooks(model, ids, [name])[name]

    ids = pad_rows(model, prompt_rows(model, facts, templates))
    seconds = 0.0
    for layer in hp.layers:
        seconds += timed(resid_after, model, ids, layer)[1]
    for dim in (model.hf_model.config.intermediate_size, model.d_model)[:n_modules]:
        a = torch.randn(dim, dim)
        a = a @ a.T + dim * torch.eye(dim)
        b = torch.randn(dim, len(facts))
        seconds += timed(torch.linalg.solve, a, b)[1] * len(hp.layers)
    return seconds


@torch.no_grad()
def evaluation_limit_seconds(model, facts, generations, batch_size: int = 64) -> float:
    """A plain bridge forward over every scored sequence once and every prompt with its
    generated tokens once, right-padded in batches of ``batch_size``."""
    from intattn_analysis.metrics import answer_token_ids

    pairs = []
    for f in facts:
        pairs += [(f.text, f.target_new)] + [(t, f.target_new) for t in f.paraphrase_texts]
        pairs += [(p.prompt, p.answer) for p in (*f.portability, *f.locality)]
    pairs = list(dict.fromkeys(pairs))
    sequences = [model.tokenize(c)[0] + answer_token_ids(model, c, a) for c, a in pairs]
    sequences += [model.tokenize(f.text + g)[0] for f, g in zip(facts, generations)]
    return padded_forward_seconds(model, sequences, batch_size)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--dataset", default="knowedit/ZsRE-test-all.json")
    parser.add_argument("--baseline", default="421f15e",
                        help="git commit whose targets and evaluation code are timed beside "
                             "today's ('' for none)")
    parser.add_argument("--whole-rows", action="store_true",
                        help="also time today's targets running whole rows (suffix=False)")
    parser.add_argument("--mom2-tokens", type=int, default=20_000)
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="IntAttn-Edit's attention share for its timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-moments", action="store_true",
                        help="no second-moment timing (moments come from the disk cache)")
    parser.add_argument("--only", choices=("targets", "evaluation"),
                        help="time only this phase (targets: no solve or evaluation)")
    args = parser.parse_args(argv)
    if args.only:
        args.skip_moments = True
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 200)

    model = ia.load_model(args.model)
    hp = ia.hparams_for(model).replace(mom2_n_tokens=args.mom2_tokens, alpha=args.alpha)
    layer = max(hp.layers)
    print(f"{model.name}: layers {list(hp.layers)}, last layer {layer}, {args.edits} edits, "
          f"threads={args.threads}, baseline {args.baseline or 'none'}")
    memory: dict[str, float] = {}
    lines: list[dict] = []

    def line(phase, seconds, limit=None, per_edit=True, **extra):
        lines.append({"phase": phase, "wall_s": seconds,
                      "s_per_edit": seconds / args.edits if per_edit else None,
                      "limit_s": limit, "x_limit": seconds / limit if limit else None, **extra})

    # 1. second moments ------------------------------------------------------------
    if not args.skip_moments:
        from intattn_analysis.covariance import second_moments_per_layer

        ia.second_moments(model, hp.layers[:1], modules=("mlp",), n_tokens=hp.mom2_n_tokens,
                          max_len=hp.mom2_max_len, cache_dir=False, progress=False)
        with tempfile.TemporaryDirectory() as scratch, peak_rss(memory, "moments"):
            start = time.perf_counter()
            one = ia.second_moments(model, hp.layers, n_tokens=hp.mom2_n_tokens,
                                    max_len=hp.mom2_max_len, cache_dir=scratch, progress=False)
            one_s = one.seconds or time.perf_counter() - start
        per, per_s = timed(second_moments_per_layer, model, hp.layers,
                           n_tokens=hp.mom2_n_tokens, max_len=hp.mom2_max_len, progress=False)
        per_s = per.seconds or per_s
        line("second moments, one pass", one_s, per_edit=False)
        line("second moments, one pass per (module, layer)", per_s, per_edit=False,
             vs_new=per_s / one_s)
        diff = max(float((one[k] - per[k]).abs().max()) for k in one)
        print(f"second moments: one pass vs per-layer passes, max |difference| {diff:.2e}")
    moments = ia.second_moments(model, hp.layers, n_tokens=hp.mom2_n_tokens,
                                max_len=hp.mom2_max_len, progress=False)

    facts = [f for f in ia.load_facts(ia.benchmark_path(args.dataset)) if f.changes_answer]
    facts = facts[: args.edits]
    templates = targets_now.context_templates(model, hp.n_context_templates,
                                              hp.context_template_length)

    if args.only == "evaluation":
        return _evaluation(args, model, facts, lines, line, memory)

    # 2. targets -------------------------------------------------------------------
    with peak_rss(memory, "targets"):
        new, new_s = timed(targets_now.compute_z, model, facts, hp, templates=templates,
                           progress=True)
    per_position = dense_step_seconds_per_position(model, layer)
    limit = new.work["needed_positions"] * per_position
    steps = [d["steps"] for d in new.diagnostics]
    line("targets, suffix path (new)", new_s, limit, vs_new=1.0,
         steps_per_fact=sum(steps) / len(steps))
    print(f"targets: {new.work['forwards']} forwards, {new.work['positions']} row-positions run "
          f"for {new.work['needed_positions']} needed ({new.work['positions'] / new.work['needed_positions']:.2f}x); "
          f"dense forward+backward {per_position * 1e3:.2f} ms per position")
    unconverged = sum(s >= hp.v_steps - 1 for s in steps)
    print(f"targets: {unconverged} of {len(steps)} facts did not meet the stop rule "
          f"({hp.stop_on} < {hp.stop_loss}) within {hp.v_steps} evaluations")
    if args.whole_rows:
        whole, whole_s = timed(targets_now.compute_z, model, facts, hp, templates=templates,
                               suffix=False, progress=True)
        cosine = torch.nn.functional.cosine_similarity(new.z, whole.z)
        steps_w = [d["steps"] for d in whole.diagnostics]
        line("targets, whole rows (today's path before the suffix engine)", whole_s, limit,
             vs_new=whole_s / new_s, steps_per_fact=sum(steps_w) / len(steps_w))
        print(f"targets: suffix vs whole rows, z* cosine min {float(cosine.min()):.7f}, "
              f"steps equal for {sum(a == b for a, b in zip(steps, steps_w))} of {len(steps)}")
    if args.baseline:
        old_targets = module_at(args.baseline, "targets")
        old, old_s = timed(old_targets.compute_z, model, facts, hp, templates=templates,
                           progress=True)
        steps_o = [d["steps"] for d in old.diagnostics]
        line(f"targets, {args.baseline}", old_s, limit, vs_new=old_s / new_s,
             steps_per_fact=sum(steps_o) / len(steps_o))

    if args.only == "targets":
        return _report(lines, memory)
    # 3. solve ---------------------------------------------------------------------
    pre_knowedit = ia.evaluate(model, facts, metrics=("knowedit",), progress=False)
    scores = {}
    for method in ("memit", "intattn"):
        with peak_rss(memory, f"edit, {method}"):
            start = time.perf_counter()
            with ia.edit(model, facts, method=method, hparams=hp, moments=moments,
                         targets=new, progress=False) as result:
                seconds = time.perf_counter() - start
                post = ia.evaluate(model, facts, pre=pre_knowedit, metrics=("knowedit",),
                                   progress=False)
        scores[method] = post.summary
        solve_limit = solve_limit_seconds(model, facts, hp, templates,
                                          n_modules=1 if method == "memit" else 2)
        line(f"solve, {method}", result.timings["solve"], solve_limit)
    intattn_vs_memit = lines[-1]["wall_s"] / lines[-2]["wall_s"]

    _evaluation(args, model, facts, lines, line, memory, report=False)
    _report(lines, memory)
    print(f"IntAttn-Edit / MEMIT solve time (same targets): {intattn_vs_memit:.2f}")
    table = pd.DataFrame(scores).T[["Edit Succ.", "Rephrase", "Portability", "Locality"]]
    print(f"\nmetrics after the edit ({len(facts)} edits, targets of the suffix path):")
    print((table * 100).round(1).to_string())
    return 0


def _evaluation(args, model, facts, lines, line, memory, report=True) -> int:
    """4. Time today's evaluation against the baseline's on the unedited model."""
    wanted = ("knowedit", "fluency")
    with peak_rss(memory, "evaluation"):
        now, now_s = timed(metrics_now.evaluate, model, facts, metrics=wanted, progress=False)
    eval_limit = evaluation_limit_seconds(model, facts, list(now.per_fact["generation"]))
    line("evaluation, padded scoring + cached generation (new)", now_s, eval_limit, vs_new=1.0)
    if args.baseline:
        old_metrics = module_at(args.baseline, "metrics")
        then, then_s = timed(old_metrics.evaluate, model, facts, metrics=wanted, progress=False)
        line(f"evaluation, {args.baseline}", then_s, eval_limit, vs_new=then_s / now_s)
        exact = ["Edit Succ.", "Rephrase", "Portability", "Fluency"]
        same = now.per_fact[exact].equals(then.per_fact[exact])
        gens = sum(a == b for a, b in zip(now.per_fact["generation"], then.per_fact["generation"]))
        print(f"evaluation vs {args.baseline}: per-fact {', '.join(exact)} identical: {same}; "
              f"generations identical: {gens} of {len(facts)}")

    with peak_rss(memory, "evaluation, generation"):
        generated, generated_s = timed(metrics_now.evaluate, model, facts, metrics=("knowedit",),
                                       protocol="generation", progress=False)
    limit = generation_limit_seconds(model, generated.answers)
    line("evaluation, generation protocol (greedy answers to a natural stop)", generated_s, limit,
         vs_new=generated_s / now_s)
    tokens = generation_tokens(model, generated.answers)
    print(f"generation protocol: {tokens['prompts']} distinct prompts, {tokens['generated']} generated tokens "
          f"({tokens['generated'] / tokens['prompts']:.1f} per prompt, cap "
          f"{ia.GenerationSettings().max_new_tokens})")

    if report:
        _report(lines, memory)
    return 0


def _generated_rows(model, answers: pd.DataFrame) -> list[list[int]]:
    """Each distinct prompt's tokens followed by the tokens it generated."""
    unique = answers.drop_duplicates("prompt")
    return [model.tokenize(prompt)[0] + model.tokenize(generated)[0][len(model.tokenize("")[0]):]
            for prompt, generated in zip(unique["prompt"], unique["generated"])]


def generation_tokens(model, answers: pd.DataFrame) -> dict:
    """How many distinct prompts the generation protocol asked, and how many tokens it
    generated (re-tokenized from the decoded text: the count a forward would see)."""
    unique = answers.drop_duplicates("prompt")
    empty = len(model.tokenize("")[0])
    return {"prompts": len(unique),
            "generated": sum(len(model.tokenize(g)[0]) - empty for g in unique["generated"])}


@torch.no_grad()
def generation_limit_seconds(model, answers: pd.DataFrame, batch_size: int = 64) -> float:
    """A plain bridge forward over every distinct prompt followed by its generated tokens,
    each sequence once, right-padded in batches of ``batch_size``: one forward position
    per generated token, the floor of any decoding loop."""
    return padded_forward_seconds(model, _generated_rows(model, answers), batch_size)


@torch.no_grad()
def padded_forward_seconds(model, sequences: list[list[int]], batch_size: int) -> float:
    """Seconds of one plain bridge forward over every token sequence, sorted by length
    and right-padded in batches of ``batch_size`` (the limits of the evaluation phases)."""
    sequences = sorted(sequences, key=len)
    pad = model.tokenizer.pad_token_id or 0
    start = time.perf_counter()
    for k in range(0, len(sequences), batch_size):
        chunk = sequences[k : k + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s)
        model.bridge(ids)
    return time.perf_counter() - start


def _report(lines, memory) -> int:
    print(pd.DataFrame(lines).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    label = ("peak RSS (MiB)" if SAMPLES_RSS
             else "peak RSS of the process up to the end of each phase (MiB)")
    print(f"{label}: " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
