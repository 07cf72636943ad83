"""One float path on every x86-64 machine: the kernels pinned to AVX2.

PyTorch picks its CPU kernels by the instructions the processor has: AVX2 or AVX-512 for
its own vectorised operations (sums, softmax, norms), and MKL does the same for matrix
products. The two paths add in different orders, so a float32 result moves in its last
bits from one machine to another. Most numbers absorb that (the notebooks' floats are
compared at 1e-3 relative), but an argmax near a tie does not: a probe's prediction flips,
and a metric over a few facts moves by a whole probe. Measured on notebook 05's CI-scale
sequential table (SmolLM2, 6 edits in 3 rounds, 21 rephrase probes): MEMIT's Rephrase is
42.1 on an AVX2 path and 44.5 on an AVX-512 one, AlphaEdit's Locality 68.1 and 67.1; with
the variables below set, the AVX-512 machine gives 42.1 and 68.1.

:func:`pin_cpu_numerics` sets them, each only where the environment does not already:

* ``ATEN_CPU_CAPABILITY=avx2``: PyTorch's own kernels (read when the first operation is
  dispatched, so setting it after ``import torch`` works if nothing has run yet);
* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility for matrix products (read
  when MKL starts).

oneDNN, which runs the bfloat16 matrix products, is left to choose: pinning it as well
changes no float32 result (the table above, with and without), but takes the AVX512-BF16
kernels away. Measured with ``benchmarks/bench_precision.py`` (SmolLM2, 8×32 tokens, 2
threads, an AVX512-BF16 processor): a bfloat16 forward and backward take 0.65× float32's
time with oneDNN free, 33× with it pinned to AVX2.

It runs when ``intattn_analysis`` is imported, and first thing in the ``intattn`` command
and in the test session (whose notebook kernels inherit the variables). A process that has
already run torch operations before importing the package keeps the kernels it chose.
``INTATTN_NATIVE_NUMERICS=1`` opts out: the processor's fastest kernels, and results that
may differ in their last bits from another machine's. GPUs and other processors are not
affected.
"""

from __future__ import annotations

import os
import platform
from typing import MutableMapping

__all__ = ["NATIVE", "PINNED", "pin_cpu_numerics"]

#: The variables that pin the kernels, and their values.
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
#: Set to 1 to keep the processor's own kernels.
NATIVE = "INTATTN_NATIVE_NUMERICS"


def pin_cpu_numerics(environ: MutableMapping[str, str] | None = None, machine: str | None = None
                     ) -> dict[str, str]:
    """Set each variable of :data:`PINNED` that ``environ`` (default ``os.environ``) does
    not set, on an x86-64 ``machine`` (default this one's), unless :data:`NATIVE` is 1.
    Returns what it set."""
    environ = os.environ if environ is None else environ
    machine = (machine or platform.machine()).lower()
    if environ.get(NATIVE, "").strip() in ("1", "true", "yes") or machine not in ("x86_64", "amd64"):
        return {}
    added = {name: value for name, value in PINNED.items() if name not in environ}
    environ.update(added)
    return added
