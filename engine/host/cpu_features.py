"""What this CPU offers bfloat16 work, read from the kernel's CPU flags.

`dtype="auto"` picks bfloat16 on a CPU with AVX-512-BF16 (`avx512_bf16`) or
AMX (`amx_bf16`): there oneDNN runs bfloat16 matmuls on bfloat16 dot-product
or tile instructions at several times float32's rate, and the KV cache
halves. Without them bfloat16 is converted in software, slower than float32.
torch 2.13 has no public query for either flag (torch.backends.cpu names
only the vector width), so the flags come from /proc/cpuinfo, read once.
"""

from functools import cache
from pathlib import Path

BF16_MATMUL_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags in /proc/cpuinfo; empty where there is none
    (not Linux, or not x86: an Arm CPU lists `features`, not `flags`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def has_bf16_matmul() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX-512-BF16 or AMX)."""
    return bool(cpu_flags() & BF16_MATMUL_FLAGS)


def has_amx() -> bool:
    """Whether the CPU has AMX's bfloat16 tiles (oneDNN's fastest matmuls there)."""
    return "amx_bf16" in cpu_flags()
