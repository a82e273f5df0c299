"""The scores pass of the scored paged prefill (the design is in prefill.py's
docstring): `scores_kernel`, one program per (key tile, KV head, chunk),
recomputes the logits of the query tiles that see its keys, divides by the
row sums the attention pass wrote and adds the column sums into
score_cache: every key slot's score is written by one program, in a fixed
order (deterministic, no atomics). Only the rows at or after a chunk's
ScoreFrom position add (an observation window); the query tiles wholly
before it are skipped."""

import triton
import triton.language as tl

from engine.kernels.triton.noise import gumbel_noise
from engine.kernels.triton.prefill_tiles import LOG2E, dot, key_tile


@triton.jit
def _add_query_tile(total, Q, RowMax, RowSum, Tau, QueryPos, NoiseTable, kt, kpos, slots, ok,
                    m0, n, row0, slot0, kv_head, use_noise, seed, layer, scale, num_heads,
                    score_from, stride_qt, stride_qh, GROUP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):  # fmt: skip
    """total (a key tile's column sums, [BLOCK_N] float32) plus the tempered
    noisy probabilities of the tile's keys (kt: [D, BLOCK_N], kpos: their
    original positions) under the rows of the query tile from row m0 that see
    them and are at positions >= score_from, over the GROUP query heads of
    kv_head, one head after the other."""
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    tok = (row0 + rows).to(tl.int64)
    tau_log2 = LOG2E / tl.load(Tau + tok, mask=row_ok, other=1.0)
    qpos = tl.load(QueryPos + tok, mask=row_ok, other=0)
    row_ok = row_ok & (qpos >= score_from)
    visible = row_ok[:, None] & ok[None, :] & (slots[None, :] <= slot0 + rows[:, None])
    d = tl.arange(0, HEAD_DIM)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q = tl.load(
            Q + tok[:, None] * stride_qt + head * stride_qh + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        z = dot(q, kt, PRECISION, UPCAST) * scale
        if use_noise:
            z = z + gumbel_noise(seed, layer, head, qpos[:, None], kpos[None, :], NoiseTable)
        z = z * tau_log2[:, None]
        stat = tok * num_heads + head
        row_max = tl.load(RowMax + stat, mask=row_ok, other=0.0)
        inv_sum = 1.0 / tl.load(RowSum + stat, mask=row_ok, other=1.0)
        p = tl.exp2(tl.where(visible, z - row_max[:, None], float("-inf")))
        total += tl.sum(p * inv_sum[:, None], 0)
    return total


@triton.jit(do_not_specialize=["layer"])
def scores_kernel(
    ScoreCache, Q, K, CuSeqlensQ, SlotStart, BlockTables, RowMax, RowSum,
    Active, Seed, UseNoise, Tau, QueryPos, PosCache, NoiseTable,
    scale, layer, num_heads, ScoreFrom,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    stride_pb, stride_ps, stride_ph, stride_sb, stride_ss, stride_sh,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (key tile, KV head, chunk): adds the tile's column sums of the
    tempered noisy probabilities over the chunk's query tiles that see it and
    the GROUP query heads, from the row max and sum of the attention pass."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    if tl.load(Active + seq) == 0:
        return
    row0 = tl.load(CuSeqlensQ + seq)
    n = tl.load(CuSeqlensQ + seq + 1) - row0
    slot0 = tl.load(SlotStart + seq)
    kv_len = slot0 + n
    start = tile * BLOCK_N
    if start >= kv_len:  # the grid covers the longest block table
        return
    table = BlockTables + seq.to(tl.int64) * stride_bt
    slots, ok, block, offset = key_tile(table, start, kv_len, PAGE, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k_base = K + kv_head * stride_kh
    kt = tl.load(
        k_base + block[None, :] * stride_kb + offset[None, :] * stride_ks + d[:, None],
        mask=ok[None, :],
        other=0.0,
    )  # [D, BLOCK_N]
    pos_base = PosCache + kv_head * stride_ph
    kpos = tl.load(pos_base + block * stride_pb + offset * stride_ps, mask=ok, other=0)
    use_noise = tl.load(UseNoise + seq) != 0
    seed = tl.load(Seed + seq)

    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Query row r sees slot `start` from r = start - slot0 on.
    # Row r is at position QueryPos[row0] + r: the window's first row is
    # score_from - QueryPos[row0], and the tiles before it add nothing.
    score_from = tl.load(ScoreFrom + seq)
    window = tl.maximum(score_from - tl.load(QueryPos + row0.to(tl.int64)), 0)
    first = tl.maximum(tl.maximum(start - slot0, 0), window.to(tl.int32)) // BLOCK_M * BLOCK_M
    for m0 in range(first, n, BLOCK_M):
        total = _add_query_tile(
            total, Q, RowMax, RowSum, Tau, QueryPos, NoiseTable, kt, kpos, slots, ok,
            m0, n, row0, slot0, kv_head, use_noise, seed, layer, scale, num_heads,
            score_from, stride_qt, stride_qh, GROUP, HEAD_DIM, BLOCK_M, PRECISION, UPCAST,
        )  # fmt: skip
    dst = ScoreCache + kv_head * stride_sh + block * stride_sb + offset * stride_ss
    tl.store(dst, tl.load(dst, mask=ok, other=0.0) + total, mask=ok)
