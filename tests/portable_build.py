"""Some of the C++ kernels built with extra compiler flags (e.g. as for an x86
CPU without AVX-512), and checks run against that build in a process of its
own: torch loads one `keyserve` library per process. Building only the
sources under test takes seconds, not the whole library's minutes."""

import os
import subprocess
import sys
from pathlib import Path

from engine.kernels import cpu as cpu_kernels

# No AVX-512 at all, so none of its BF16 instructions either.
PORTABLE_FLAGS = "-mno-avx512f"

_PREAMBLE = """
import sys, torch
sys.path.insert(0, {tests!r})
from engine.kernels import cpu
sources = [s for s in cpu.SOURCES if s.name in {sources!r}]
torch.ops.load_library(str(cpu._build(sources)))
"""

TESTS = Path(__file__).parent


def compiler_defines(flags: list[str]) -> set[str]:
    """The macros the compiler defines for -march=native plus `flags`."""
    cxx = os.environ.get("CXX", "c++")
    out = subprocess.run([cxx, "-march=native", *flags, "-dM", "-E", "-x", "c++", os.devnull],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define")}


def run_with_flags(
    sources: tuple[str, ...], check: str, flags: str = PORTABLE_FLAGS, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Build `sources` (file names under engine/kernels/csrc) with `flags`,
    load them, then run the Python `check` (torch.ops.keyserve is the build)."""
    env = {**os.environ, cpu_kernels.FLAGS_ENV: flags}
    code = _PREAMBLE.format(tests=str(TESTS), sources=sources) + check
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=TESTS.parent)  # fmt: skip
