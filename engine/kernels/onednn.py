"""Which oneDNN kernel runs a packed linear layer, for the load log.

oneDNN picks its implementation (and instruction set) at run time: e.g.
`brg_matmul:avx512_core_amx` on a CPU with AMX, `brg_matmul:avx512_core_bf16`
with AVX-512-BF16 alone, `brg_matmul:avx512_core` for float32 on AVX-512.
A throughput figure means little without it. oneDNN names it only in its
verbose lines, which it prints to the process's stdout (file descriptor 1,
not Python's sys.stdout): so one small product runs with verbose on while
descriptor 1 points at a temporary file, and the name is read from there.
"""

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

import torch

logger = logging.getLogger(__name__)

# The primitive kinds a linear layer runs as; the implementation follows the kind.
_KINDS = ("inner_product", "matmul")
_VERBOSE_ENV = ("ONEDNN_VERBOSE", "DNNL_VERBOSE")


def implementation(verbose: str) -> str | None:
    """The implementation named by the first linear product's `exec` line of
    oneDNN's verbose output (the v1 format and the older one alike)."""
    for line in verbose.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if not fields or fields[0] not in ("onednn_verbose", "dnnl_verbose"):
            continue
        if "exec" not in fields:
            continue
        for kind in _KINDS:
            if kind in fields and fields.index(kind) + 1 < len(fields):
                return fields[fields.index(kind) + 1]
    return None


@contextlib.contextmanager
def _stdout_to_file() -> Iterator[BinaryIO]:
    """Descriptor 1 into a temporary file for the duration, then back."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield tmp
        finally:
            _flush_c_stdio()
            os.dup2(saved, 1)
            os.close(saved)


def _flush_c_stdio() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def kernel_of(run: Callable[[], object]) -> str | None:
    """The oneDNN implementation that `run` (one linear product) executes;
    None where the verbose lines cannot be had or read, or where the user
    asked for them (ONEDNN_VERBOSE): they go to stdout as asked, and turning
    verbose off after the probe would silence the rest."""
    if any(os.environ.get(name) for name in _VERBOSE_ENV):
        return None
    try:
        with _stdout_to_file() as tmp:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
            _flush_c_stdio()
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        logger.debug("oneDNN verbose output unavailable: %s", e)
        return None
    # Anything else that wrote to stdout meanwhile goes on to it.
    other = "\n".join(line for line in text.splitlines() if "_verbose," not in line)
    if other:
        print(other, flush=True)
    return implementation(text)
