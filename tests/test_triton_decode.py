"""The Triton paged decode kernel (engine/kernels/triton/decode.py) against
plain torch: attention outputs, the H2O / Keyformer scores it adds into the
paged score cache, and its Gumbel noise bit for bit.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
here unless already set) on tiny shapes. With TRITON_INTERPRET=0 on a
machine with CUDA the same tests run compiled on the GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed")
tl = triton.language

from engine.attention.context import DecodeScoring  # noqa: E402
from engine.attention.geometry import LayerCache, LayerGeometry  # noqa: E402
from engine.attention.scoring import add_decode_scores, decode_logits  # noqa: E402
from engine.kernels.triton.decode import DecodeScoreArgs, paged_decode_attention  # noqa: E402
from engine.kernels.triton.noise import gumbel_noise  # noqa: E402
from kv_manager.scoring import gumbel_noise as torch_gumbel_noise  # noqa: E402
from kv_manager.scoring import gumbel_table  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
HKV = 2
NUM_KEYS = (1, 7, 37)  # ragged: one key, a partial last block, several tiles
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}  # fmt: skip


# -- the noise ---------------------------------------------------------------


@triton.jit
def _noise_kernel(out, seed, head, query_pos, key_pos, table, layer, N: tl.constexpr):
    i = tl.arange(0, N)
    s, h, qp = tl.load(seed + i), tl.load(head + i), tl.load(query_pos + i)
    tl.store(out + i, gumbel_noise(s, layer, h, qp, tl.load(key_pos + i), table))


@triton.jit
def _noise_scalar_kernel(out, seed, head, query_pos, key_pos, table, layer, N: tl.constexpr):
    """A row's scalars against a block of keys, as the decode kernel calls it."""
    i = tl.arange(0, N)
    s, h, qp = tl.load(seed), tl.load(head), tl.load(query_pos)
    tl.store(out + i, gumbel_noise(s, layer, h, qp, tl.load(key_pos + i), table))


def _noise_inputs(n: int, gen: torch.Generator):
    seed = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=gen)
    seed[: n // 4] = torch.randint(0, 2**62, (n // 4,), generator=gen)  # the engine's seeds
    seed[:4] = torch.tensor([0, 1, 2**62, -1])
    head = torch.randint(0, 64, (n,), dtype=torch.int32, generator=gen)
    query_pos = torch.randint(0, 2**31, (n,), dtype=torch.int64, generator=gen)
    key_pos = torch.randint(0, 2**31 - 1, (n,), dtype=torch.int32, generator=gen)
    return [t.to(DEVICE) for t in (seed, head, query_pos, key_pos)]


@pytest.mark.parametrize("layer", [0, 1, 17, 1000])
def test_gumbel_noise_is_bit_equal_to_torch(layer: int) -> None:
    n = 4096
    seed, head, query_pos, key_pos = _noise_inputs(n, torch.Generator().manual_seed(layer))
    table = gumbel_table(DEVICE)
    out = torch.empty(n, device=DEVICE)
    _noise_kernel[(1,)](out, seed, head, query_pos, key_pos, table, layer, N=n)
    expected = torch_gumbel_noise(seed, layer, head, query_pos, key_pos)
    assert torch.equal(out, expected)
    # Scalar row values broadcast against a block of keys.
    for r in (0, 2, 3, n - 1):
        _noise_scalar_kernel[(1,)](
            out, seed[r:], head[r:], query_pos[r:], key_pos, table, layer, N=n
        )
        assert torch.equal(out, torch_gumbel_noise(seed[r], layer, head[r], query_pos[r], key_pos))
    # Not vacuous: the draws differ from key to key.
    assert out.unique().numel() > n // 2


# -- a paged cache -----------------------------------------------------------


def _paged_case(num_keys, block_size, group, head_dim, dtype, seed=0):
    """Random q, K/V in a cache whose sequences hold shuffled, non-contiguous
    blocks; tables padded (past each sequence's blocks) with a spare block of
    huge K/V, which any read past num_keys would show."""
    gen = torch.Generator().manual_seed(seed)
    B, Hq = len(num_keys), HKV * group
    per_seq = [-(-n // block_size) for n in num_keys]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen)
    spare = int(order[-1])
    table = torch.full((B, max(per_seq) + 1), spare, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(per_seq):
        table[b, :nb] = order[used : used + nb]
        used += nb
    shape = (num_blocks, block_size, HKV, head_dim)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    k[spare], v[spare] = 1e4, 1e4
    q = torch.randn(B, Hq, head_dim, generator=gen)
    return dict(
        q=q.to(dtype).to(DEVICE), k_cache=k.to(dtype).to(DEVICE), v_cache=v.to(dtype).to(DEVICE),
        block_tables=table.to(DEVICE), num_keys=torch.tensor(num_keys, device=DEVICE),
        scale=head_dim**-0.5,
    )  # fmt: skip


def _gather(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """A sequence's first n slots of a [num_blocks, bs, ...] cache -> [n, ...]."""
    slots = torch.arange(n, device=cache.device)
    bs = cache.shape[1]
    return cache[table[slots // bs].long(), slots % bs]


def _reference_attention(q, k_cache, v_cache, block_tables, num_keys, scale):
    """Per sequence: softmax(scale * q.k) @ v in float32 over its keys."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k_cache.shape[2]
    for b, n in enumerate(num_keys.tolist()):
        k = _gather(k_cache, block_tables[b], n).float().repeat_interleave(group, dim=1)
        v = _gather(v_cache, block_tables[b], n).float().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


def _run(case, scores=None, **kw) -> torch.Tensor:
    out = torch.empty_like(case["q"])
    paged_decode_attention(out, **case, scores=scores, **kw)
    return out


# -- attention ---------------------------------------------------------------


@pytest.mark.parametrize(
    "block_size, group, head_dim, dtype, block_n",
    [
        (4, 2, 16, torch.float32, 16),  # a tile spans 4 blocks
        (16, 2, 16, torch.float32, 16),  # a tile is a block
        (128, 2, 16, torch.float32, 16),  # a block spans tiles
        (16, 1, 16, torch.float32, 64),
        (16, 4, 16, torch.float32, 32),
        (4, 8, 16, torch.float32, 16),
        (16, 2, 64, torch.float32, 64),
        (16, 2, 16, torch.bfloat16, 16),
        (16, 2, 64, torch.bfloat16, None),  # the default tile: 64 slots
        (4, 2, 16, torch.float16, 16),
    ],
)
def test_attention_matches_torch(block_size, group, head_dim, dtype, block_n) -> None:
    case = _paged_case(NUM_KEYS, block_size, group, head_dim, dtype)
    out = _run(case, block_n=block_n)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference_attention(**case), **TOL[dtype])


def test_the_tolerance_catches_a_wrong_scale() -> None:
    case = _paged_case(NUM_KEYS, 4, 2, 16, torch.float32)
    out = _run(case, block_n=16)
    wrong = _reference_attention(**{**case, "scale": case["scale"] * 1.01})
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out, wrong, **TOL[torch.float32])


# -- scores ------------------------------------------------------------------


# Rows: Keyformer over several tiles and a partial block; H2O over one key;
# a row that only attends; H2O over several tiles.
SCORED_KEYS = (37, 1, 7, 20)
ACTIVE = (True, True, False, True)
NOISY = (True, False, True, False)


def _score_args(case, layer=3, noisy=NOISY, shift_positions=0):
    """The score cache starts non-zero; positions are not slots (as after
    eviction): increasing with gaps, and different per KV head."""
    gen = torch.Generator().manual_seed(7)
    shape = case["k_cache"].shape[:3]
    gaps = torch.randint(1, 5, shape, generator=gen)
    positions = gaps.flatten(0, 1).cumsum(0).view(shape).to(torch.int32)
    score_cache = torch.rand(shape, generator=gen)
    return DecodeScoreArgs(
        score_cache=score_cache.to(DEVICE),
        pos_cache=(positions + shift_positions).to(DEVICE),
        active=torch.tensor(ACTIVE, device=DEVICE),
        tau=torch.tensor([0.7, 1.0, 1.9, 1.0], device=DEVICE),
        seed=torch.tensor([2**62 - 12345, 11, 2**40 + 3, 5], device=DEVICE),
        use_noise=torch.tensor(noisy, device=DEVICE),
        query_pos=positions.max().long().to(DEVICE) + torch.tensor([1, 5, 40, 2], device=DEVICE),
        layer=layer,
        noise_table=gumbel_table(DEVICE),
    )


def _reference_scores(case, s: DecodeScoreArgs) -> torch.Tensor:
    """score_cache after engine.attention.scoring.add_decode_scores (the torch
    backends' definition) adds the active rows' scores."""
    q, k_cache, table, num_keys = case["q"], case["k_cache"], case["block_tables"], case["num_keys"]
    Hq, bs = q.shape[1], k_cache.shape[1]
    geo = LayerGeometry(Hq, HKV, q.shape[2], case["scale"], None, None)
    scores = s.score_cache.clone()
    cache = LayerCache(s.layer, k_cache, case["v_cache"], scores, s.pos_cache)
    rows = s.active.nonzero().flatten()
    tables = table[rows].long()
    L = tables.shape[1] * bs
    keys, _ = cache.read(tables)
    slots = tables.repeat_interleave(bs, dim=1) * bs + torch.arange(bs, device=DEVICE).repeat(
        tables.shape[1]
    )
    key_valid = torch.arange(L, device=DEVICE) < num_keys[rows].view(-1, 1)
    scoring = DecodeScoring(
        rows=rows, all_rows=False, seed=s.seed[rows], gumbel=s.use_noise[rows], tau=s.tau[rows],
        query_positions=s.query_pos[rows], num_keys=num_keys[rows], key_valid=key_valid,
        block_tables=tables, key_slots=slots.flatten(),
    )  # fmt: skip
    logits = decode_logits(geo, q[rows], keys)
    add_decode_scores(geo, cache, logits, cache.read_positions(tables), scoring)
    return scores


@pytest.mark.parametrize(
    "block_size, group, head_dim, dtype, block_n",
    [
        (4, 2, 16, torch.float32, 16),
        (16, 4, 16, torch.float32, 32),
        (128, 2, 16, torch.float32, 16),
        (16, 2, 64, torch.float32, 64),
        (16, 2, 16, torch.bfloat16, 16),
    ],
)
def test_scores_match_torch(block_size, group, head_dim, dtype, block_n) -> None:
    case = _paged_case(SCORED_KEYS, block_size, group, head_dim, dtype)
    s = _score_args(case)
    before = s.score_cache.clone()
    expected = _reference_scores(case, s)
    out = _run(case, s, block_n=block_n)
    torch.testing.assert_close(out.float(), _reference_attention(**case), **TOL[dtype])
    torch.testing.assert_close(s.score_cache, expected, rtol=1e-5, atol=1e-6)
    # Nothing but the active rows' keys changed; each query head adds a mass of 1.
    owned = torch.zeros(s.score_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for b in (0, 1, 3):
        slots = torch.arange(SCORED_KEYS[b], device=DEVICE)
        owned[case["block_tables"][b, slots // block_size].long(), slots % block_size] = True
    assert torch.equal(s.score_cache[~owned], before[~owned])
    added = (s.score_cache - before).sum()
    torch.testing.assert_close(added, torch.tensor(3.0 * group * HKV, device=DEVICE))


def test_score_tolerance_catches_wrong_noise() -> None:
    """The scores' tolerance sees the draws of another layer or of shifted
    key positions, and an H2O row scored with noise."""
    case = _paged_case(SCORED_KEYS, 4, 2, 16, torch.float32)
    s = _score_args(case)
    _run(case, s, block_n=16)
    torch.testing.assert_close(s.score_cache, _reference_scores(case, _score_args(case)))
    for wrong in (
        _score_args(case, layer=4),
        _score_args(case, shift_positions=1),
        _score_args(case, noisy=(True, False, True, True)),
    ):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(
                s.score_cache, _reference_scores(case, wrong), rtol=1e-5, atol=1e-6
            )


def test_scored_and_plain_attention_agree() -> None:
    """Scoring changes nothing of the output."""
    case = _paged_case(SCORED_KEYS, 16, 2, 16, torch.float32)
    plain = _run(case, block_n=16)
    scored = _run(case, _score_args(case), block_n=16)
    assert torch.equal(plain, scored)


# -- the compiled kernel -----------------------------------------------------

# Compiles the kernel for an H100/H200 (sm_90) to a cubin with the arguments
# paged_decode_attention would pass, in a process of its own (this one runs
# the interpreter). No GPU needed: it catches what only the compiler sees
# (types across branches and loops, dot shapes, constexpr handling).
_COMPILE_SCRIPT = """
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels.triton import decode
from kv_manager.scoring import gumbel_table

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}

def compile_for_sm90(dtype, scored, D, group, block_size, table_dtype):
    B, Hkv, nb = 2, 2, 3
    q = torch.zeros(B, Hkv * group, D, dtype=dtype)
    k = torch.zeros(nb * B, block_size, Hkv, D, dtype=dtype)
    table = torch.zeros(B, nb, dtype=table_dtype)
    num_keys = torch.ones(B, dtype=torch.int64)
    s = None
    if scored:
        row = lambda t: torch.zeros(B, dtype=t)
        s = decode.DecodeScoreArgs(
            torch.zeros(k.shape[:3]), torch.zeros(k.shape[:3], dtype=torch.int32),
            row(torch.bool), row(torch.float32), row(torch.int64), row(torch.bool),
            row(torch.int64), 5, gumbel_table())
    _, args, meta = decode.launch_args(q, q, k, k, table, num_keys, 0.1, s, None)
    kernel = decode._decode_kernel
    options = dict(num_warps=meta.pop("num_warps"))
    sig = {}
    for name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TYPES[a.dtype]
        else:
            sig[name] = "fp32" if isinstance(a, float) else "i32"
    sig.update({name: "constexpr" for name in meta})
    src = ASTSource(fn=kernel, signature=sig, constexprs=meta)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], "no cubin"
    print("compiled", dtype, scored, D, group, block_size, table_dtype, flush=True)

compile_for_sm90(torch.bfloat16, True, 128, 8, 16, torch.int32)
compile_for_sm90(torch.float16, False, 64, 1, 128, torch.int64)
compile_for_sm90(torch.float32, True, 80, 3, 4, torch.int32)
"""


def test_the_kernel_compiles_for_sm90(tmp_path) -> None:
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 3
