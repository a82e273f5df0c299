"""Keep freed host memory in the process, so that the large CPU tensors of a
step reuse pages that are already mapped instead of faulting in fresh ones.

glibc's malloc gives each thread that allocates an arena of its own. The
server steps the engine on a thread of its own, so its tensors come from
secondary arenas, built of 64 MB heaps that glibc unmaps or shrinks whenever
their top is free. A prompt step allocates and frees megabytes per layer, so
every step asked the kernel for fresh zeroed pages. Measured in the served
benchmark (512-token prompts, 16 at a time, SmolLM2 on 2 cores): 38-39k page
faults per 2,048-token step, against 4k with the settings below; the
server's system time over a run went from 3.5-7.0 s to 2.8-3.1 s. On 2 cores
that is 1-2% of a step, under the machine's noise; page faults scale worse
than the math with more cores, where this should matter more.

Fixing three of malloc's thresholds keeps the memory: blocks under 32 MB come
from the arena, not from mmap; a free top is trimmed only past 256 MB; and a
heap is deleted only if 128 MB of padding would still be left, which a 64 MB
heap never has. Setting them also ends glibc's sliding mmap threshold, which is
what kept the main thread's arena warm. The cost is that the process keeps
its peak of freed memory for reuse, as a caching allocator does.
"""

import ctypes
import logging
import platform
import sys
from functools import cache

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h) and the values set for them.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's largest allowed on 64-bit
    (_M_TRIM_THRESHOLD, 256 << 20),
    (_M_TOP_PAD, 128 << 20),
)


@cache
def keep_freed_host_memory() -> bool:
    """Set malloc to keep freed memory for reuse; False where the C library
    is not glibc (then nothing changes). Safe to call more than once."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    if not done:
        logger.warning("mallopt refused a setting: freed host memory may go back to the OS")
    return done
