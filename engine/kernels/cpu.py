"""The engine's C++ CPU kernels (engine/kernels/csrc/), compiled at first use and cached.

They are built with the machine's C++ compiler against the installed torch
(no build step at install time, no extra dependency), once per source, torch
version and CPU model, into ~/.cache/keyserve/kernels/. When there is no
compiler, or the build fails, the engine logs why and runs its plain-torch
path instead: same results, slower.
"""

import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# One library: the first source defines the `keyserve` op namespace, the rest add to it.
SOURCES = [
    Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp",
    Path(__file__).parent / "csrc" / "eviction_scores_cpu.cpp",
    Path(__file__).parent / "csrc" / "eviction_select_cpu.cpp",
    Path(__file__).parent / "csrc" / "layer_ops_cpu.cpp",
    Path(__file__).parent / "csrc" / "kv_write_cpu.cpp",
    Path(__file__).parent / "csrc" / "prefill_attention_cpu.cpp",
    Path(__file__).parent / "csrc" / "prefill_scored_cpu.cpp",
    Path(__file__).parent / "csrc" / "decode_scores_cpu.cpp",
    Path(__file__).parent / "csrc" / "sampling_cpu.cpp",
    Path(__file__).parent / "csrc" / "linear_bf16_cpu.cpp",
]
# Part of the cache key.
HEADERS = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "vector_math.h",
        "bf16.h",
        "prompt_tiles.h",
        "prompt_tiles_bf16.h",
        "prompt_paths.h",
        "decode_tiles_bf16.h",
        "eviction_scores.h",
    )
]
DISABLE_ENV = "KEYSERVE_DISABLE_CPU_KERNELS"  # set to 1: always the torch path
CACHE_ENV = "KEYSERVE_KERNEL_CACHE"
# Extra compiler flags, after -march=native (part of the cache key): e.g.
# "-mno-avx512f" builds the code a CPU without AVX-512 (or without its BF16
# instructions) runs, on this one.
FLAGS_ENV = "KEYSERVE_CPU_KERNEL_FLAGS"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "keyserve" / "kernels"
    return Path(os.environ.get(CACHE_ENV, default))


@cache
def _library() -> bool:
    """Build (once) and load the kernels; False where that is not possible."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    try:
        torch.ops.load_library(str(_build(SOURCES)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels unavailable (%s); using the torch path", e)
        return False
    return True


def loaded() -> bool:
    """Whether the library is built and loaded (built now if it was not)."""
    return _library()


def ops():
    """torch.ops.keyserve, the loaded library's ops (called by name)."""
    if not _library():
        raise RuntimeError("the CPU kernels are not available (see the log for why)")
    return torch.ops.keyserve


def paged_decode_attention() -> Callable[..., None] | None:
    """torch.ops.keyserve.paged_decode_attention, or None where it cannot be built."""
    return torch.ops.keyserve.paged_decode_attention if _library() else None


def accumulate_scores() -> Callable[..., None] | None:
    """torch.ops.keyserve.accumulate_scores, or None where it cannot be built."""
    return torch.ops.keyserve.accumulate_scores if _library() else None


def add_decode_scores() -> Callable[..., None] | None:
    """torch.ops.keyserve.add_decode_scores, or None where it cannot be built."""
    return torch.ops.keyserve.add_decode_scores if _library() else None


def lowest_priority_slots() -> Callable[..., torch.Tensor] | None:
    """torch.ops.keyserve.lowest_priority_slots, or None where it cannot be built."""
    return torch.ops.keyserve.lowest_priority_slots if _library() else None


def prefill_attention() -> Callable[..., None] | None:
    """torch.ops.keyserve.prefill_attention, or None where it cannot be built."""
    return torch.ops.keyserve.prefill_attention if _library() else None


def prefill_attention_scored() -> Callable[..., None] | None:
    """torch.ops.keyserve.prefill_attention_scored, or None where it cannot be built."""
    return torch.ops.keyserve.prefill_attention_scored if _library() else None


def write_kv() -> Callable[..., None] | None:
    """torch.ops.keyserve.write_kv, or None where it cannot be built."""
    return torch.ops.keyserve.write_kv if _library() else None


def greedy_tokens() -> Callable[..., torch.Tensor] | None:
    """torch.ops.keyserve.greedy_tokens, or None where it cannot be built."""
    return torch.ops.keyserve.greedy_tokens if _library() else None


def clear_cache() -> None:
    """Forget whether the kernels loaded (tests switch them off and on)."""
    _library.cache_clear()


def _build(sources: list[Path]) -> Path:
    command = _compile_command()
    key = hashlib.sha256(
        b"".join(s.read_bytes() for s in [*sources, *HEADERS])
        + repr(command).encode()
        + torch.__version__.encode()
        + _cpu_model().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"keyserve_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        logger.info("compiling the CPU kernels (once per torch version and CPU)")
        result = subprocess.run(
            [*command[0], *map(str, sources), "-o", str(partial), *command[1]],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"compiler failed: {result.stderr[-2000:]}")
        partial.replace(target)
    return target


def _compile_command() -> tuple[list[str], list[str]]:
    """(compiler and flags, link flags): libraries go after the source, or a
    linker that drops unneeded libraries (--as-needed) drops them all."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = cpp_extension.library_paths()
    compile_flags = [
        os.environ.get("CXX", "c++"),
        "-O3",
        "-march=native",  # the cache key includes the CPU model and flags
        "-fopenmp",  # ATen's parallel_for is OpenMP, as in torch's own build
        "-fno-math-errno",  # lets `omp simd` loops call glibc's vector exp
        "-shared",
        "-fPIC",
        "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *shlex.split(os.environ.get(FLAGS_ENV, "")),
    ]
    link_flags = [
        *(f"-L{p}" for p in libs),
        *(f"-Wl,-rpath,{p}" for p in libs),
        "-lc10",
        "-ltorch_cpu",
    ]
    return compile_flags, link_flags


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    # The model name and the instruction-set flags: "AMD EPYC" alone names
    # several generations, and -march=native code needs the same flags.
    keep = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or "unknown"
