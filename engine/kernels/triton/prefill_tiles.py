"""Device helpers that both prefill kernels use (prefill_attention.py and
prefill_scores.py; the design is in prefill.py's docstring)."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32. UPCAST (Triton's interpreter on bfloat16 only, whose
    tl.dot multiplies bfloat16's raw bits): the same values, multiplied as float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def key_tile(table, start, kv_len, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key slots start .. start + BLOCK_N - 1 of a sequence (table: its
    row of the block table): (slots, in range, physical block (int64), offset)."""
    slots = start + tl.arange(0, BLOCK_N)
    ok = slots < kv_len
    block = tl.load(table + slots // PAGE, mask=ok, other=0).to(tl.int64)
    return slots, ok, block, slots % PAGE
