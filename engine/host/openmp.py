"""Give back the OpenMP worker threads that a thread other than the engine's owns.

An OpenMP runtime keeps one pool of worker threads per thread that has run a
parallel region. The server loads the model on its main thread (the event
loop's) and then steps the engine on a thread of its own, so the main
thread's workers live on, asleep, beside the engine's. GNU OpenMP (torch's
on Linux) then counts more threads than cores and cuts the engine's workers'
spin-wait short: between two parallel regions they sleep on a futex and must
be woken, hundreds of times a step. On 2 cores that made every decode step
10-35% slower than the same step run from the main thread.

`release_thread_pool()` ends the calling thread's pool (OpenMP 5.0's
omp_pause_resource_all); the next parallel region on that thread would start
a new one.
"""

import ctypes
import logging
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

_RUNTIMES = ("libgomp", "libiomp", "libomp")
_PAUSE_SOFT = 1  # omp_pause_soft: end the threads, keep what can be kept


@cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()  # the sixth, when there is one, is the mapped file
        path = fields[5] if len(fields) > 5 else ""
        if any(Path(path).name.startswith(name) for name in _RUNTIMES):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def release_thread_pool() -> bool:
    """End the calling thread's OpenMP workers; False where the runtime has no
    omp_pause_resource_all (then nothing changes)."""
    runtime = _runtime()
    pause = getattr(runtime, "omp_pause_resource_all", None) if runtime else None
    if pause is None:
        logger.debug("no OpenMP runtime with omp_pause_resource_all in this process")
        return False
    pause.argtypes = [ctypes.c_int]
    return pause(_PAUSE_SOFT) == 0
