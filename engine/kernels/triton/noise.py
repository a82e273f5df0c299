"""Keyformer's Gumbel noise inside a Triton kernel.

`gumbel_noise` equals kv_manager.scoring.gumbel_noise bit for bit (as do the
C++ kernels, csrc/eviction_scores.h): a splitmix64 hash of (seed, layer,
query head, query position, key position) in wrapping 64-bit arithmetic,
whose top bits index a table of Gumbel(0, 1) levels. The arguments are
scalars or blocks that broadcast together; the hash is computed in uint64,
where a product wraps mod 2**64 and a right shift is logical, as in the
torch definition (which masks its arithmetic shifts) and the C++ one.
"""

import triton
import triton.language as tl

# The constants of kv_manager/scoring.py (odd, from splitmix64 and the golden ratio).
K_SEED = tl.constexpr(0x9E3779B97F4A7C15)
K_LAYER = tl.constexpr(0xBF58476D1CE4E5B9)
K_HEAD = tl.constexpr(0x94D049BB133111EB)
K_QPOS = tl.constexpr(0xD6E8FEB86659FD93)
K_KPOS = tl.constexpr(0xA0761D6478BD642F)
MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
MIX2 = tl.constexpr(0x94D049BB133111EB)


@triton.jit
def as_u64(x):
    """An integer (a scalar, a block or a constexpr) as uint64, two's
    complement: sign-extended to int64, then reinterpreted."""
    return tl.cast(tl.cast(x, tl.int64), tl.uint64, bitcast=True)


@triton.jit
def gumbel_hash(seed, layer, head, query_pos, key_pos):
    """The 64-bit splitmix64 hash of kv_manager.scoring.gumbel_noise (uint64)."""
    x = as_u64(seed) * K_SEED + as_u64(layer) * K_LAYER
    x = x + as_u64(head) * K_HEAD
    x = x + as_u64(query_pos) * K_QPOS
    x = x + as_u64(key_pos) * K_KPOS
    # splitmix64 finalizer: every input bit reaches every output bit.
    x = (x ^ (x >> 30)) * MIX1
    x = (x ^ (x >> 27)) * MIX2
    return x ^ (x >> 31)


@triton.jit
def gumbel_noise(seed, layer, head, query_pos, key_pos, noise_table, TABLE_BITS: tl.constexpr = 16):
    """Gumbel(0, 1) noise, float32, broadcast over the integer arguments.

    seed (int64), layer, head (the query head in [0, Hq)), query_pos and
    key_pos (the key's original position) are scalars or blocks; noise_table
    points to kv_manager.scoring.gumbel_table (2**TABLE_BITS float32 levels).
    Given gumbel_exp_table instead, it returns e^g of the same draw.
    """
    x = gumbel_hash(seed, layer, head, query_pos, key_pos)
    index = tl.cast(x >> (64 - TABLE_BITS), tl.int32)
    return tl.load(noise_table + index)
