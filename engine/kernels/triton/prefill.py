"""Causal prompt attention over the paged KV cache on CUDA, in Triton: every
prompt chunk of a step in one launch, optionally adding the chunks' H2O /
Keyformer eviction scores.

A step's prompt rows sit back to back in q [T, Hq, D]: chunk i is rows
cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1, after slot_start[i] slots that
its sequence has cached already. Its K/V (the cached keys, then its own,
written before the kernel runs) are slots 0 .. slot_start[i] + n_i - 1 of
the sequence, found through its block table: slot s is at block
block_tables[i, s // block_size], offset s % block_size. Query row r of the
chunk is slot slot_start[i] + r and sees the keys at slots up to its own
(causal by slot: eviction leaves slots dense, so a slot is not a position).

Attention (prefill_attention.py): one program per (query tile, query head,
chunk), flash-attention style. It walks the chunk's key tiles through the
block table, reading K/V in place, with an online softmax in float32; the
key tiles every row of the query tile sees in full run without the causal
mask, the rest with it. The G = Hq / Hkv query heads of a KV head read the
same K/V tiles (through L2).

Scores: each key's score grows by its probability under every query that
sees it, summed over the chunk's queries and the G query heads of its KV
head, of

    f = softmax((x + g) / tau),   x = scale * q.k  (float32)

with tau the query token's temperature and g Keyformer's Gumbel noise
(0 for H2O), a hash of (seed, layer, query head, query position, the key's
original position from pos_cache), exactly kv_manager.scoring.gumbel_noise
(noise.gumbel_noise, shared with the decode kernel).
A score needs each row's normalizer, which an online softmax only knows
when the row is done, and no [heads, queries, keys] logits ever reach
memory. So the scored attention pass also keeps the running max and sum of
each row's tempered, noisy exponentials, and writes them (a [T, Hq] float32
pair, log2 domain). A second kernel (prefill_scores.py), one program per
(key tile, KV head, chunk), recomputes the logits of the query tiles that
see its keys, divides by the row sums and adds the column sums into
score_cache: every key slot's score is written by one program, in a fixed
order (deterministic, no atomics; blocks are never shared between sequences,
kv_manager/pool.py). The cost: q.k once more (half again attention's matmul
work), and the hash and the tempered exponentials once in each kernel.

This module holds the launch (checks, launch settings, grids); the kernels
are in prefill_attention.py and prefill_scores.py, the device helpers they
share in prefill_tiles.py.
"""

from dataclasses import dataclass

import torch
import triton

# The kernels, under the names tests and _interpreted use; _gumbel_noise is
# the shared hash, re-exported for the test that checks it bit for bit.
from engine.kernels.triton.noise import gumbel_noise as _gumbel_noise  # noqa: F401
from engine.kernels.triton.prefill_attention import attention_kernel as _attention_kernel
from engine.kernels.triton.prefill_scores import scores_kernel as _scores_kernel

# Launch meta-parameters: a reasonable start for an H200 (sm_90), NOT tuned
# yet (see _launch_config). From compiling for sm_90 here (no GPU): bfloat16
# at head size 128 uses wgmma and 211 registers without spills at 64 x 64
# tiles and 4 warps; the scored variant, which also hashes 64 x 64 uint64 per
# tile, needs 8 warps to stay (nearly) spill-free.
BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # keys per tile
NUM_WARPS = 4
NUM_WARPS_SCORED = 8
NUM_STAGES = 2
# float32 caches: exact float32 dot products (FMA, not tensor cores), in
# smaller tiles: a reference setting on a GPU rather than a fast one.
BLOCK_FLOAT32 = 32
NUM_WARPS_FLOAT32 = 8

NOISE_TABLE_SIZE = 1 << 16  # kv_manager.scoring.GUMBEL_TABLE_BITS = 16


@dataclass
class PrefillScoreArgs:
    """What the scored variant reads and adds to (all on the kernel's device)."""

    score_cache: torch.Tensor  # [num_blocks, block_size, Hkv] float32, added into
    pos_cache: torch.Tensor  # [num_blocks, block_size, Hkv] int32 original positions
    active: torch.Tensor  # [N] bool: chunks that add scores
    seed: torch.Tensor  # [N] int64
    use_noise: torch.Tensor  # [N] bool (Keyformer; False: H2O)
    tau: torch.Tensor  # [T] float32: each query token's temperature
    query_pos: torch.Tensor  # [T] int64: each query token's position
    layer: int
    noise_table: torch.Tensor  # [2**16] float32 (kv_manager.scoring.gumbel_table)
    # [N] int64: per chunk, the first query position that adds to the scores
    # (an observation window; its rows' positions must be consecutive, as a
    # prompt chunk's are). None: every row scores.
    score_from: torch.Tensor | None = None


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_attention_kernel, triton.runtime.JITFunction)


def _launch_config(dtype: torch.dtype, scored: bool) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages); not tuned yet."""
    if dtype == torch.float32:
        return BLOCK_FLOAT32, BLOCK_FLOAT32, NUM_WARPS_FLOAT32, NUM_STAGES
    return BLOCK_M, BLOCK_N, NUM_WARPS_SCORED if scored else NUM_WARPS, NUM_STAGES


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"paged_prefill_attention: {what}")


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def paged_prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    slot_start: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    scores: PrefillScoreArgs | None = None,
    *,
    max_seqlen_q: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """Causal attention of a step's prompt chunks over the paged cache, into out.

    q, out: [T, Hq, D] (the step's prompt rows, chunks back to back; each
    row's heads may be strided, each head's D values contiguous);
    cu_seqlens_q [N + 1] int32 row offsets of the N chunks; slot_start [N]
    int32: slots cached before each chunk (its queries are slots
    slot_start .. slot_start + n - 1, its keys slots 0 .. slot_start + n - 1,
    already written); block_tables [N, max_blocks] int32 (padding entries are
    never read). k_cache, v_cache: [num_blocks, block_size, Hkv, D] of q's
    dtype (float32, bfloat16 or float16; the softmax runs in float32). Hq a
    multiple of Hkv; D a power of two >= 16.

    scores: also add each active chunk's H2O / Keyformer scores into
    scores.score_cache (see PrefillScoreArgs and the module docstring).
    tau must be > 0 (not checked: that would read the device).

    max_seqlen_q: the longest chunk, if the caller knows it (sizes the grid;
    default: a bound from T and the block tables, no device sync).
    block_m, block_n: query and key tile sizes (powers of two >= 16) in place
    of _launch_config's (tests use small tiles to cross several).
    """
    _check_inputs(out, q, k_cache, v_cache, cu_seqlens_q, slot_start, block_tables)
    meta = _launch_meta(q, k_cache, scores is not None, block_m, block_n)
    T, N = q.shape[0], slot_start.shape[0]
    if N == 0 or T == 0:
        return
    if max_seqlen_q is None:
        max_seqlen_q = min(T, block_tables.shape[1] * k_cache.shape[1])
    _launch(
        out, q, k_cache, v_cache, cu_seqlens_q, slot_start, block_tables, scale, scores,
        max_seqlen_q, meta,
    )  # fmt: skip


def _check_inputs(out, q, k_cache, v_cache, cu_seqlens_q, slot_start, block_tables) -> None:
    """paged_prefill_attention's checks of shapes, dtypes and layouts (none
    reads the device)."""
    _check(q.dim() == 3 and out.shape == q.shape and out.dtype == q.dtype, "q, out: [T, Hq, D]")
    _, Hq, D = q.shape
    _check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape, "k/v_cache: [nb, bs, Hkv, D]")
    Hkv = k_cache.shape[2]
    _check(k_cache.shape[3] == D and _is_pow2(D) and D >= 16, "head size: a power of two >= 16")
    _check(Hkv > 0 and Hq % Hkv == 0, "Hq must be a multiple of Hkv")
    _check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "k/v_cache: q's dtype")
    _check(q.dtype in (torch.float32, torch.bfloat16, torch.float16), "float32, bfloat16, float16")
    _check(
        all(t.stride(-1) == 1 for t in (q, out, k_cache, v_cache)), "last dim must be contiguous"
    )
    N = slot_start.shape[0]
    _check(
        cu_seqlens_q.dtype == torch.int32 and tuple(cu_seqlens_q.shape) == (N + 1,),
        "cu_seqlens_q: int32 [N + 1]",
    )
    _check(slot_start.dtype == torch.int32 and slot_start.dim() == 1, "slot_start: int32 [N]")
    _check(
        block_tables.dtype == torch.int32
        and block_tables.dim() == 2
        and block_tables.shape[0] == N
        and block_tables.stride(1) == 1,
        "block_tables: int32 [N, max_blocks], rows contiguous",
    )


def _launch_meta(q, k_cache, scored: bool, block_m: int | None, block_n: int | None) -> dict:
    """Both kernels' constexprs and launch options: the tiles asked for (checked)
    or _launch_config's, its warps and stages."""
    config_m, config_n, num_warps, num_stages = _launch_config(q.dtype, scored)
    block_m = block_m or config_m
    block_n = block_n or config_n
    _check(_is_pow2(block_m) and _is_pow2(block_n) and min(block_m, block_n) >= 16, "tiles")
    # float32 caches: exact float32 products (a reference setting on a GPU;
    # TF32 would be faster). The precision is moot for 16-bit inputs.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = q.dtype == torch.bfloat16 and _interpreted()
    _, page, Hkv, D = k_cache.shape
    return dict(
        GROUP=q.shape[1] // Hkv, PAGE=page, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=precision, UPCAST=upcast, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def _score_operands(scores: PrefillScoreArgs | None, q, k_cache, cu_seqlens_q, N: int):
    """The scored variant's operands of both kernels, checked: (the [T, Hq]
    row max and sum to fill, the score args Active .. NoiseTable, pos_cache's
    strides, the layer), or stand-ins the kernels never read when unscored."""
    if scores is None:
        stats = (q, q)  # unused pointers unless scored
        sargs = (cu_seqlens_q,) * 6 + (q,)  # active .. noise_table, unused unless scored
        return stats, sargs, (0, 0, 0), 0
    s = scores
    T, Hq, _ = q.shape
    for t, dtype, name in (
        (s.score_cache, torch.float32, "score_cache"),
        (s.pos_cache, torch.int32, "pos_cache"),
    ):
        _check(t.dtype == dtype and tuple(t.shape) == tuple(k_cache.shape[:3]), name)
    for t, dtype, size, name in (
        (s.active, torch.bool, N, "active"),
        (s.seed, torch.int64, N, "seed"),
        (s.use_noise, torch.bool, N, "use_noise"),
        (s.tau, torch.float32, T, "tau"),
        (s.query_pos, torch.int64, T, "query_pos"),
        (s.noise_table, torch.float32, NOISE_TABLE_SIZE, "noise_table"),
    ):
        _check(t.dtype == dtype and tuple(t.shape) == (size,) and t.is_contiguous(), name)
    stats = tuple(torch.empty(T, Hq, dtype=torch.float32, device=q.device) for _ in "ml")
    sargs = (s.active, s.seed, s.use_noise, s.tau, s.query_pos, s.pos_cache, s.noise_table)
    return stats, sargs, s.pos_cache.stride(), int(s.layer)


def _launch(out, q, k_cache, v_cache, cu_seqlens_q, slot_start, block_tables, scale, scores,
            max_seqlen_q: int, meta: dict) -> None:  # fmt: skip
    """The attention kernel's launch and, scored, the scores kernel's after it."""
    Hq, N = q.shape[1], slot_start.shape[0]
    stats, sargs, pos_strides, layer = _score_operands(scores, q, k_cache, cu_seqlens_q, N)
    shared = (cu_seqlens_q, slot_start, block_tables, *stats, *sargs, float(scale), layer, Hq)
    grid = (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), Hq, N)
    _attention_kernel[grid](
        out, q, k_cache, v_cache, *shared,
        out.stride(0), out.stride(1), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), *pos_strides,
        SCORED=scores is not None, **meta,
    )  # fmt: skip
    if scores is None:
        return
    max_keys = block_tables.shape[1] * k_cache.shape[1]
    grid = (triton.cdiv(max_keys, meta["BLOCK_N"]), k_cache.shape[2], N)
    score_from = scores.score_from
    if score_from is None:
        score_from = torch.zeros(N, dtype=torch.int64, device=q.device)
    _check(
        score_from.dtype == torch.int64 and tuple(score_from.shape) == (N,), "score_from: int64 [N]"
    )
    _scores_kernel[grid](
        scores.score_cache, q, k_cache, *shared, score_from,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), *pos_strides, *scores.score_cache.stride(), **meta,
    )  # fmt: skip
