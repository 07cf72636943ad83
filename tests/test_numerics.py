"""One float path on every x86-64 machine (intattn_analysis/numerics.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from intattn_analysis.numerics import NATIVE, PINNED, pin_cpu_numerics


def test_pinning_fills_what_the_environment_leaves_unset():
    environ = {"MKL_CBWR": "COMPATIBLE"}
    added = pin_cpu_numerics(environ, machine="x86_64")
    assert environ["MKL_CBWR"] == "COMPATIBLE", "a user's own setting is kept"
    assert added == {k: v for k, v in PINNED.items() if k != "MKL_CBWR"}
    assert environ["ATEN_CPU_CAPABILITY"] == "avx2"


def test_pinning_can_be_declined_and_leaves_other_processors_alone():
    assert pin_cpu_numerics({NATIVE: "1"}, machine="x86_64") == {}
    assert pin_cpu_numerics({}, machine="aarch64") == {}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 kernels only")
def test_importing_the_package_pins_torchs_kernels_before_they_are_chosen():
    environ = {k: v for k, v in os.environ.items() if k not in PINNED and k != NATIVE}
    code = ("import torch, intattn_analysis\n"
            "import os; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])")
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    capability, cbwr = out.stdout.split()
    # a processor without AVX2 runs its own lower path; every other one runs AVX2, not AVX-512
    assert capability in ("AVX2", "DEFAULT") and cbwr == "AVX2", out.stdout
    native = subprocess.run([sys.executable, "-c", code.replace(", os.environ['MKL_CBWR']", "")],
                            env={**environ, NATIVE: "1"}, capture_output=True, text=True, check=True)
    assert native.stdout.strip() in ("AVX2", "AVX512", "DEFAULT", "ZVECTOR", "SVE256"), native.stdout
