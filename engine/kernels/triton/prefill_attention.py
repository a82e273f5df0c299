"""The attention pass of the paged prefill (the design is in prefill.py's
docstring): `attention_kernel`, one program per (query tile, query head,
chunk), flash-attention style over the chunk's key tiles, read in place
through the block table, with an online softmax in float32. Scored, it also
keeps each row's running max and sum of its tempered, noisy exponentials and
writes them for the scores pass (prefill_scores.py)."""

import triton
import triton.language as tl

from engine.kernels.triton.noise import gumbel_noise
from engine.kernels.triton.prefill_tiles import LOG2E, dot, key_tile


@triton.jit
def _visible(slots, ok, q_slot):
    """Which keys of a tile each query row sees: causal by slot, in range."""
    return (slots[None, :] <= q_slot[:, None]) & ok[None, :]


@triton.jit
def _tempered_stats(m_z, l_z, qk, scale, q_slot, slots, ok, block, offset, pos_base,
                    stride_pb, stride_ps, use_noise, seed, layer, head, qpos, tau_log2,
                    NoiseTable, MASKED: tl.constexpr):  # fmt: skip
    """One key tile's step of the online softmax (m_z, l_z, base 2) of the
    tempered noisy logits (scale * q.k + g) / tau, g the Gumbel noise when
    use_noise (else 0); tau_log2 is log2(e) / tau of each row."""
    z = qk * scale
    if use_noise:
        kpos = tl.load(pos_base + block * stride_pb + offset * stride_ps, mask=ok, other=0)
        z = z + gumbel_noise(seed, layer, head, qpos[:, None], kpos[None, :], NoiseTable)
    z = z * tau_log2[:, None]
    if MASKED:
        z = tl.where(_visible(slots, ok, q_slot), z, float("-inf"))
    mz_new = tl.maximum(m_z, tl.max(z, 1))
    l_z = l_z * tl.exp2(m_z - mz_new) + tl.sum(tl.exp2(z - mz_new[:, None]), 1)
    return mz_new, l_z


@triton.jit
def _attend_tile(acc, m_i, l_i, m_z, l_z, q, q_slot, start, kv_len, table, k_base, v_base,
                 pos_base, stride_kb, stride_ks, stride_vb, stride_vs, stride_pb, stride_ps,
                 scale, score_on, use_noise, seed, layer, head, qpos, tau_log2, NoiseTable,
                 PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, SCORED: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):  # fmt: skip
    """One key tile of a query tile: the online softmax of the attention
    (acc, m_i, l_i: base-2 logits) and, scoring, of the tempered noisy
    logits (m_z, l_z). MASKED: the tile crosses the causal diagonal or the
    end of the keys."""
    slots, ok, block, offset = key_tile(table, start, kv_len, PAGE, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    kt = tl.load(
        k_base + block[None, :] * stride_kb + offset[None, :] * stride_ks + d[:, None],
        mask=ok[None, :],
        other=0.0,
    )  # [D, BLOCK_N]
    qk = dot(q, kt, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N] float32
    s = qk * (scale * LOG2E)
    if MASKED:
        s = tl.where(_visible(slots, ok, q_slot), s, float("-inf"))
    # Every row sees key 0 in the first tile, so the max is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_base + block[:, None] * stride_vb + offset[:, None] * stride_vs + d[None, :],
        mask=ok[:, None],
        other=0.0,
    )  # [BLOCK_N, D]
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
    # A constexpr `if` (compiled out unless SCORED) around a runtime one.
    if SCORED:  # noqa: SIM102
        if score_on:
            m_z, l_z = _tempered_stats(m_z, l_z, qk, scale, q_slot, slots, ok, block, offset,
                                       pos_base, stride_pb, stride_ps, use_noise, seed, layer,
                                       head, qpos, tau_log2, NoiseTable, MASKED)  # fmt: skip
    return acc, m_new, l_i, m_z, l_z


@triton.jit
def _attend_keys(q, q_slot, first_slot, kv_len, table, k_base, v_base, pos_base,
                 stride_kb, stride_ks, stride_vb, stride_vs, stride_pb, stride_ps,
                 scale, score_on, use_noise, seed, layer, head, qpos, tau_log2, NoiseTable,
                 PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SCORED: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):  # fmt: skip
    """A query tile (its first row is slot first_slot) over the keys its rows
    see: (acc, m_i, l_i, m_z, l_z), the online softmaxes of _attend_tile."""
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_z = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys below full_end are seen by every row of the tile; the tiles after
    # it, up to the last row's slot, are masked.
    full_end = first_slot // BLOCK_N * BLOCK_N
    end = tl.minimum(kv_len, first_slot + BLOCK_M)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i, m_z, l_z = _attend_tile(
            acc, m_i, l_i, m_z, l_z, q, q_slot, start, kv_len, table, k_base, v_base,
            pos_base, stride_kb, stride_ks, stride_vb, stride_vs, stride_pb, stride_ps,
            scale, score_on, use_noise, seed, layer, head, qpos, tau_log2, NoiseTable,
            PAGE, HEAD_DIM, BLOCK_N, False, SCORED, PRECISION, UPCAST,
        )  # fmt: skip
    for start in range(full_end, end, BLOCK_N):
        acc, m_i, l_i, m_z, l_z = _attend_tile(
            acc, m_i, l_i, m_z, l_z, q, q_slot, start, kv_len, table, k_base, v_base,
            pos_base, stride_kb, stride_ks, stride_vb, stride_vs, stride_pb, stride_ps,
            scale, score_on, use_noise, seed, layer, head, qpos, tau_log2, NoiseTable,
            PAGE, HEAD_DIM, BLOCK_N, True, SCORED, PRECISION, UPCAST,
        )  # fmt: skip
    return acc, m_i, l_i, m_z, l_z


@triton.jit
def _row_scoring(Active, UseNoise, Seed, QueryPos, Tau, seq, tok, row_ok,
                 BLOCK_M: tl.constexpr, SCORED: tl.constexpr):  # fmt: skip
    """A query tile's scoring inputs: (score_on, use_noise, seed, its rows'
    positions, log2(e) / tau of each row); placeholders unless SCORED."""
    score_on = False
    use_noise = False
    seed = tl.zeros([], dtype=tl.int64)
    qpos = tl.zeros([BLOCK_M], dtype=tl.int64)
    tau_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SCORED:
        score_on = tl.load(Active + seq) != 0
        use_noise = tl.load(UseNoise + seq) != 0
        seed = tl.load(Seed + seq)
        qpos = tl.load(QueryPos + tok, mask=row_ok, other=0)
        tau_log2 = LOG2E / tl.load(Tau + tok, mask=row_ok, other=1.0)
    return score_on, use_noise, seed, qpos, tau_log2


@triton.jit(do_not_specialize=["layer"])
def attention_kernel(
    Out, Q, K, V, CuSeqlensQ, SlotStart, BlockTables,
    RowMax,  # [T, Hq] float32 (scored): max of the tempered logits, base 2
    RowSum,  # [T, Hq] float32 (scored): sum of their exponentials
    Active, Seed, UseNoise, Tau, QueryPos, PosCache, NoiseTable,
    scale, layer, num_heads,
    stride_ot, stride_oh, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_bt, stride_pb, stride_ps, stride_ph,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SCORED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One (query tile, query head, chunk): the tile's attention output and,
    scored, its rows' max and sum of the tempered noisy exponentials."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    row0 = tl.load(CuSeqlensQ + seq)
    n = tl.load(CuSeqlensQ + seq + 1) - row0
    m0 = tile * BLOCK_M
    if m0 >= n:  # the grid covers the longest chunk
        return
    slot0 = tl.load(SlotStart + seq)
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    tok = (row0 + rows).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + tok[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    score_on, use_noise, seed, qpos, tau_log2 = _row_scoring(
        Active, UseNoise, Seed, QueryPos, Tau, seq, tok, row_ok, BLOCK_M, SCORED
    )
    # Query row r is slot slot0 + r; the chunk's keys are slots 0 .. slot0 + n - 1.
    acc, _, l_i, m_z, l_z = _attend_keys(
        q, slot0 + rows, slot0 + m0, slot0 + n, BlockTables + seq.to(tl.int64) * stride_bt,
        K + kv_head * stride_kh, V + kv_head * stride_vh, PosCache + kv_head * stride_ph,
        stride_kb, stride_ks, stride_vb, stride_vs, stride_pb, stride_ps,
        scale, score_on, use_noise, seed, layer, head, qpos, tau_log2, NoiseTable,
        PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, SCORED, PRECISION, UPCAST,
    )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(
        Out + tok[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    if SCORED:  # noqa: SIM102 (constexpr, then runtime)
        if score_on:
            stat = tok * num_heads + head
            tl.store(RowMax + stat, m_z, mask=row_ok)
            tl.store(RowSum + stat, l_z, mask=row_ok)
