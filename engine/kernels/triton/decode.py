"""Paged decode attention on CUDA in Triton, optionally adding H2O / Keyformer
eviction scores into the paged score cache in the same launch.

One program per (sequence, KV head) takes the G query heads of that KV head
together (GQA: each K/V tile is loaded once for all of them), walks the
sequence's keys through its block table tile by tile with an online softmax,
and reads K and V in place. A key tile is BLOCK_N consecutive slots of the
sequence; each slot finds its block through the table, so a tile may span
several cache blocks or part of one.

Scored (`scores` given): for an active row, each of its num_keys keys gets,
added to score_cache[slot, kv_head], the sum over the group's query heads of

    f_j = softmax((x + g) / tau)_j,   x_j = scale * q.k_j (float32),

with g Keyformer's Gumbel noise (noise.gumbel_noise, hashed on the key's
original position from pos_cache) or 0 (H2O: tau = 1, the attention
probabilities). The first pass keeps, besides the attention's running max and
sum, those of the tempered logits; a second pass over the keys recomputes
x and adds the normalized f. A (sequence, KV head) owns its slots' scores, so
no atomics are needed, and no logits ever go to global memory. This mirrors
csrc/paged_attention_cpu.cpp with csrc/decode_scores_cpu.cpp.

Exponentials are base 2 with log2(e) folded into the factors.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from engine.kernels.triton.noise import gumbel_noise

LOG2E = tl.constexpr(1.4426950408889634)

# Launch settings for an H200, not tuned yet (nothing measured on a GPU): 4
# warps, and key tiles (`default_block_n`) as large as compile for sm_90
# without register spills (ptxas -v, Triton 3.9): 16-bit K/V tiles of 4,096
# elements (32 slots at D = 128: two 16-slot cache blocks, or a quarter of a
# 128-slot one; 64 at D = 64); float32 tiles of 16 slots.
NUM_WARPS = 4
TILE_ELEMENTS = 4096
# tl.dot needs its inner dimension >= 16 for 16-bit inputs; the query heads
# of a group are padded to 16 rows as well, the tensor-core tile height.
MIN_DOT = 16
MAX_BLOCK_N = 64


def default_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Slots per key tile for head size `head_dim` and K/V `dtype` (untuned)."""
    if dtype == torch.float32:
        return MIN_DOT
    block_d = max(MIN_DOT, triton.next_power_of_2(head_dim))
    return max(MIN_DOT, min(MAX_BLOCK_N, TILE_ELEMENTS // block_d))


@dataclass
class DecodeScoreArgs:
    """What the scored variant reads and adds to; per-row tensors are [B]."""

    score_cache: torch.Tensor  # [num_blocks, block_size, Hkv] float32, added into
    pos_cache: torch.Tensor  # [num_blocks, block_size, Hkv] int32, each slot's original position
    active: torch.Tensor  # [B] bool: rows that add scores (others only attend)
    tau: torch.Tensor  # [B] float32 temperature of this step's query
    seed: torch.Tensor  # [B] int64
    use_noise: torch.Tensor  # [B] bool: Keyformer's Gumbel noise (False: H2O)
    query_pos: torch.Tensor  # [B] int64 position of each row's query
    layer: int
    noise_table: torch.Tensor  # [2**16] float32 (kv_manager.scoring.gumbel_table)


@triton.jit
def _key_tile(table_row, start, n, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The tile of BLOCK_N slots from `start`: each one's (block, offset), and
    whether it is one of the sequence's n keys."""
    slots = start + tl.arange(0, BLOCK_N)
    valid = slots < n
    block = tl.load(table_row + slots // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block, slots % BLOCK_SIZE, valid


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b, accumulated in float32. UPCAST (interpreter only): the product
    of float32 copies, as Triton's interpreter multiplies bfloat16 as raw
    integers; the products of 16-bit floats are exact in float32 anyway."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_logits(qv, cache, block, offset, valid, kv_head, s_b, s_s, s_h, scale, d, d_ok,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """x = scale * q.k in float32 [BLOCK_G, BLOCK_N], -inf past the keys; and
    the tile's row offsets in the cache (V's too: it has K's strides)."""
    rows = block * s_b + offset * s_s + kv_head * s_h
    k = tl.load(cache + rows[:, None] + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
    x = _dot(qv, tl.trans(k), PRECISION, UPCAST) * scale
    return tl.where(valid[None, :], x, float("-inf")), rows


@triton.jit
def _attend_tile(acc, m, l, x, v_cache, rows, valid, d, d_ok,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """One tile's step of the online softmax: the running max m (base 2),
    sum l and output accumulator acc, rescaled and updated from logits x."""
    s = x * LOG2E
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    mask = valid[:, None] & d_ok[None, :]
    v = tl.load(v_cache + rows[:, None] + d[None, :], mask=mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, m_new, l * alpha + tl.sum(p, 1)


@triton.jit
def _tempered(x, block, offset, valid, heads, kv_head, pos_cache, p_b, p_s, p_h,
              inv_tau, noisy, seed, layer, query_pos, noise_table):  # fmt: skip
    """(x + g) * log2(e) / tau: the tempered logits in base 2, g the Gumbel
    noise of each (query head, key) when the row is noisy (else 0)."""
    z = x
    if noisy:
        pos_ptrs = pos_cache + block * p_b + offset * p_s + kv_head * p_h
        key_pos = tl.load(pos_ptrs, mask=valid, other=0)
        g = gumbel_noise(seed, layer, heads[:, None], query_pos, key_pos[None, :], noise_table)
        z = x + g
    return z * (LOG2E * inv_tau)


@triton.jit
def _decode_kernel(
    out, q, k_cache, v_cache, block_tables, num_keys,
    score_cache, pos_cache, active, tau, seed, use_noise, query_pos, noise_table,
    scale, layer,
    s_qb, s_qh, s_ob, s_oh, s_kb, s_ks, s_kh, s_bt, s_pb, s_ps, s_ph,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SCORED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    n = tl.load(num_keys + seq)
    table_row = block_tables + seq * s_bt
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    row_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    qv = tl.load(q + seq * s_qb + heads[:, None] * s_qh + d[None, :], mask=q_mask, other=0.0)
    # The scored row's values (unused when not SCORED).
    scoring = False
    noisy = False
    inv_tau = 1.0
    row_seed = 0
    row_pos = 0
    if SCORED:
        scoring = tl.load(active + seq) != 0
        noisy = tl.load(use_noise + seq) != 0
        inv_tau = 1.0 / tl.load(tau + seq)
        row_seed = tl.load(seed + seq)
        row_pos = tl.load(query_pos + seq)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # The running max and sum of the tempered logits (base 2).
    m2 = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_G], tl.float32)
    for start in range(0, n, BLOCK_N):
        block, offset, valid = _key_tile(table_row, start, n, BLOCK_N, BLOCK_SIZE)
        x, rows = _tile_logits(qv, k_cache, block, offset, valid, kv_head, s_kb, s_ks, s_kh,
                               scale, d, d_ok, PRECISION, UPCAST)  # fmt: skip
        acc, m, l = _attend_tile(acc, m, l, x, v_cache, rows, valid, d, d_ok, PRECISION, UPCAST)
        if SCORED and scoring:
            z = _tempered(x, block, offset, valid, heads, kv_head, pos_cache, s_pb, s_ps, s_ph,
                          inv_tau, noisy, row_seed, layer, row_pos, noise_table)  # fmt: skip
            m2_new = tl.maximum(m2, tl.max(z, 1))
            l2 = l2 * tl.exp2(m2 - m2_new) + tl.sum(tl.exp2(z - m2_new[:, None]), 1)
            m2 = m2_new
    o = acc / l[:, None]
    o_ptrs = out + seq * s_ob + heads[:, None] * s_oh + d[None, :]
    tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=q_mask)
    if SCORED and scoring:
        _add_scores(qv, k_cache, table_row, n, kv_head, heads, row_ok, m2, 1.0 / l2,
                    scale, s_kb, s_ks, s_kh, d, d_ok, score_cache, pos_cache, s_pb, s_ps,
                    s_ph, inv_tau, noisy, row_seed, layer, row_pos, noise_table,
                    BLOCK_SIZE, BLOCK_N, PRECISION, UPCAST)  # fmt: skip


@triton.jit
def _add_scores(qv, k_cache, table_row, n, kv_head, heads, row_ok, m2, inv_l2,
                scale, s_kb, s_ks, s_kh, d, d_ok, score_cache, pos_cache, s_pb, s_ps,
                s_ph, inv_tau, noisy, seed, layer, query_pos, noise_table,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """The second pass of a scored row: each key's f_j, summed over the group's
    query heads, added to its slot's score (score_cache has pos_cache's strides)."""
    for start in range(0, n, BLOCK_N):
        block, offset, valid = _key_tile(table_row, start, n, BLOCK_N, BLOCK_SIZE)
        x, _ = _tile_logits(qv, k_cache, block, offset, valid, kv_head, s_kb, s_ks, s_kh, scale,
                            d, d_ok, PRECISION, UPCAST)  # fmt: skip
        z = _tempered(x, block, offset, valid, heads, kv_head, pos_cache, s_pb, s_ps, s_ph,
                      inv_tau, noisy, seed, layer, query_pos, noise_table)  # fmt: skip
        f = tl.exp2(z - m2[:, None]) * inv_l2[:, None]
        contrib = tl.sum(tl.where(row_ok[:, None], f, 0.0), 0)
        ptrs = score_cache + block * s_pb + offset * s_ps + kv_head * s_ph
        tl.store(ptrs, tl.load(ptrs, mask=valid, other=0.0) + contrib, mask=valid)


def paged_decode_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    num_keys: torch.Tensor,
    scale: float,
    scores: DecodeScoreArgs | None = None,
    *,
    block_n: int | None = None,
) -> None:
    """Decode attention of one query per sequence over its paged K/V, written to `out`.

    out, q: [B, Hq, D] (float32, bfloat16 or float16; out in q's dtype, each
    head's D values contiguous); k_cache, v_cache: [num_blocks, block_size,
    Hkv, D] in q's dtype, one layer's view, laid out alike; block_tables:
    [B, max_blocks] int32 or int64; num_keys: [B] int64 (>= 1, at most
    max_blocks * block_size: not checked, that would wait on the device).
    Sequence b's keys are its first num_keys[b] slots; slot s is at block
    block_tables[b, s // block_size], offset s % block_size. With `scores`,
    its active rows also add their H2O / Keyformer scores (module docstring).
    block_n: slots per key tile, a power of two >= 16 (a launch setting;
    default_block_n when None).
    """
    grid, args, meta = launch_args(
        out, q, k_cache, v_cache, block_tables, num_keys, scale, scores, block_n
    )
    _decode_kernel[grid](*args, **meta)


def launch_args(out, q, k_cache, v_cache, block_tables, num_keys, scale, scores, block_n):
    """The checked launch of paged_decode_attention: (grid, the kernel's
    positional arguments, its constexprs and launch options)."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    _check(out, q, k_cache, v_cache, block_tables, num_keys)
    block_n = block_n or default_block_n(D, q.dtype)
    assert block_n >= MIN_DOT and block_n & (block_n - 1) == 0, "block_n: a power of two >= 16"
    s = scores
    if s is not None:
        _check_scores(s, k_cache, B)
        score_args = (
            s.score_cache, s.pos_cache, s.active.view(torch.uint8), s.tau, s.seed,
            s.use_noise.view(torch.uint8), s.query_pos, s.noise_table,
        )  # fmt: skip
        pos_strides = s.pos_cache.stride()
    else:
        score_args = (q,) * 8  # unused pointers
        pos_strides = (0, 0, 0)
    args = (
        out, q, k_cache, v_cache, block_tables, num_keys, *score_args,
        scale, s.layer if s is not None else 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], block_tables.stride(0), *pos_strides,
    )  # fmt: skip
    interpreted = isinstance(_decode_kernel, InterpretedFunction)
    meta = dict(
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_G=max(MIN_DOT, triton.next_power_of_2(Hq // Hkv)),
        BLOCK_D=max(MIN_DOT, triton.next_power_of_2(D)), BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SCORED=s is not None,
        # float32 products in full precision (the default would round to TF32).
        PRECISION="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return (B, Hkv), args, meta


def _check(out, q, k_cache, v_cache, block_tables, num_keys) -> None:
    B, Hq, D = q.shape
    assert k_cache.dim() == 4 and k_cache.shape[3] == D, "k_cache: [num_blocks, bs, Hkv, D]"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert Hq % k_cache.shape[2] == 0, "query heads: a multiple of the KV heads"
    assert q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert k_cache.dtype == v_cache.dtype == q.dtype == out.dtype, "one dtype for q, K, V, out"
    assert out.shape == q.shape and q.stride(2) == 1 and out.stride(2) == 1
    assert k_cache.stride(3) == 1, "K/V: each head's D values contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == B
    assert block_tables.dtype in (torch.int32, torch.int64) and block_tables.stride(1) == 1
    assert num_keys.shape == (B,) and num_keys.dtype == torch.int64
    devices = {t.device for t in (out, q, k_cache, v_cache, block_tables, num_keys)}
    assert len(devices) == 1, "all tensors on one device"


def _check_scores(s: DecodeScoreArgs, k_cache: torch.Tensor, B: int) -> None:
    cache_shape = k_cache.shape[:3]
    assert s.score_cache.shape == cache_shape and s.score_cache.dtype == torch.float32
    assert s.pos_cache.shape == cache_shape and s.pos_cache.dtype == torch.int32
    assert s.score_cache.stride() == s.pos_cache.stride(), "score and position caches alike"
    for name, dtype in (
        ("active", torch.bool), ("tau", torch.float32), ("seed", torch.int64),
        ("use_noise", torch.bool), ("query_pos", torch.int64),
    ):  # fmt: skip
        t = getattr(s, name)
        assert t.shape == (B,) and t.dtype == dtype and t.is_contiguous(), f"{name}: [B] {dtype}"
    assert s.noise_table.dtype == torch.float32 and s.noise_table.is_contiguous()
    assert s.noise_table.numel() == 1 << 16, "noise_table: the 2**16 levels of gumbel_table"
    devices = {t.device for t in (k_cache, s.score_cache, s.pos_cache, s.tau, s.noise_table)}
    assert len(devices) == 1, "all tensors on one device"
