"""Ship a model's sampled corpus with the package, so every machine edits with the same text.

The offline default corpus is text the model samples from itself (``ModelSamples``). A
draw is floating-point arithmetic followed by a random choice, so another CPU, BLAS or
torch version can draw a different token and diverge from there: the second moments,
and every edit solved with them, would then differ between machines. This script writes
the first ``--tokens`` sampled tokens (sampling them first if the cache lacks them) to
``intattn_analysis/data/samples/`` under the name ``ModelSamples.shipped_file`` gives;
``ModelSamples`` reads them before sampling whenever their key (model weights and state,
dtype, seed, batch, ``max_len``) is the one asked for.

    python scripts/ship_samples.py --model smollm2-135m --tokens 100000
    python scripts/ship_samples.py --model gemma-3-270m --tokens 100000
"""

from __future__ import annotations

import argparse
import sys

import torch

import intattn_analysis as ia
from intattn_analysis.corpus import ModelSamples
from intattn_analysis.covariance import corpus_cache_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens to ship (the paper-scale default)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="sequence cap (default: the model's MEMIT mom2_max_len)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ia.load_model(args.model)
    max_len = args.max_len or ia.hparams_for(model, "memit").mom2_max_len
    # second_moments keeps its sampled corpora in corpus_cache_dir(): start from those
    path, count, rows = ModelSamples().ship(model, args.tokens, max_len, cache_dir=corpus_cache_dir())
    print(f"{path.name}: {count} tokens in {rows} rows, {path.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
