"""The Triton paged prefill kernels (engine/kernels/triton/prefill.py), run on
the CPU through Triton's interpreter, against plain torch: the attention
output, the H2O / Keyformer scores as engine.attention.scoring defines them,
and the Gumbel hash bit for bit. A last test compiles the kernels for sm_90
(no GPU needed) to catch what the interpreter lets through. With
TRITON_INTERPRET=0 on a CUDA machine the kernels run compiled on the GPU
(inputs and results cross over; the references stay on the CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import dataclasses  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")

from engine.attention.context import PrefillSpan  # noqa: E402
from engine.attention.geometry import LayerCache, LayerGeometry  # noqa: E402
from engine.attention.scoring import ScoreSpec, add_prompt_scores  # noqa: E402
from engine.kernels.triton import prefill  # noqa: E402
from engine.kernels.triton.prefill import PrefillScoreArgs, paged_prefill_attention  # noqa: E402
from kv_manager.scoring import gumbel_noise, gumbel_table  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

# (slot_start, tokens): a fresh prompt over several query and key tiles, a
# later chunk over cached keys (slot_start not a multiple of any block size),
# and a chunk of one token. With 16-row tiles, slot_start 17 puts a key tile's
# first key (slot 32) on a query tile's last row: the edges of both kernels'
# tile ranges.
CHUNKS = [(0, 37), (17, 23), (13, 1)]


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D], a strided view
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    pos_cache: torch.Tensor
    score_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    slot_start: torch.Tensor
    block_tables: torch.Tensor
    query_pos: torch.Tensor  # [T] int64
    chunks: list
    scale: float

    @property
    def geometry(self) -> LayerGeometry:
        _, Hq, D = self.q.shape
        return LayerGeometry(Hq, self.k_cache.shape[2], D, self.scale, None, None)

    def key_slots(self, i: int) -> torch.Tensor:
        """Physical slots of chunk i's keys."""
        page = self.k_cache.shape[1]
        s = torch.arange(sum(self.chunks[i]))
        return self.block_tables[i].long()[s // page] * page + s % page


def make_batch(chunks, page, Hq=4, Hkv=2, D=16, dtype=torch.float32, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    N = len(chunks)
    blocks = [math.ceil((s + n) / page) for s, n in chunks]
    num_blocks = sum(blocks) + 3
    # Block ids shuffled: each table is non-contiguous. The first id is a
    # poison block of NaN that pads every table (one spare column at least).
    ids = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.full((N, max(blocks) + 1), int(ids[0]), dtype=torch.int32)
    used = 1
    for i, b in enumerate(blocks):
        tables[i, :b] = ids[used : used + b]
        used += b
    shape = (num_blocks, page, Hkv, D)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    # Original positions: anything but the slot, different per head, up to 2**31 - 1.
    pos_cache = torch.randint(0, 2**31 - 1, shape[:3], generator=g, dtype=torch.int32)
    score_cache = torch.rand(shape[:3], generator=g) * 3.0
    # Slots after each sequence's last key hold NaN, as the poison block: never read.
    for i, (s, n) in enumerate(chunks):
        for slot in range(s + n, blocks[i] * page):
            b = tables[i, slot // page]
            k_cache[b, slot % page] = float("nan")
            v_cache[b, slot % page] = float("nan")
    k_cache[ids[0]] = float("nan")
    v_cache[ids[0]] = float("nan")
    T = sum(n for _, n in chunks)
    # q is a view of a merged projection: its rows are strided.
    qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=g).to(dtype)
    cu = torch.tensor([0] + [n for _, n in chunks], dtype=torch.int32).cumsum(0)
    # Query positions beyond 2**32 for the second chunk: 64-bit hashing.
    bases = [5, 3_000_000_000, 77]
    query_pos = torch.cat(
        [torch.arange(n, dtype=torch.int64) + bases[i % 3] + s for i, (s, n) in enumerate(chunks)]
    )
    return Batch(
        q=qkv[:, :Hq],
        k_cache=k_cache,
        v_cache=v_cache,
        pos_cache=pos_cache,
        score_cache=score_cache,
        cu_seqlens_q=cu.to(torch.int32),
        slot_start=torch.tensor([s for s, _ in chunks], dtype=torch.int32),
        block_tables=tables,
        query_pos=query_pos,
        chunks=list(chunks),
        scale=1.3 / math.sqrt(D),  # a little sharper than usual: peakier softmax
    )


def reference_attention(b: Batch) -> torch.Tensor:
    """Float32 causal attention by slot of each chunk over its gathered keys."""
    T, Hq, D = b.q.shape
    Hkv = b.k_cache.shape[2]
    out = torch.empty(T, Hq, D)
    for i, (s0, n) in enumerate(b.chunks):
        slots = b.key_slots(i)
        k = b.k_cache.view(-1, Hkv, D)[slots].float().repeat_interleave(Hq // Hkv, dim=1)
        v = b.v_cache.view(-1, Hkv, D)[slots].float().repeat_interleave(Hq // Hkv, dim=1)
        r0 = int(b.cu_seqlens_q[i])
        logits = torch.einsum("nhd,shd->hns", b.q[r0 : r0 + n].float(), k) * b.scale
        visible = torch.arange(s0 + n).view(1, -1) <= (s0 + torch.arange(n)).view(-1, 1)
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out[r0 : r0 + n] = torch.einsum("hns,shd->nhd", p, v)
    return out


def _to_device(scores: PrefillScoreArgs | None) -> PrefillScoreArgs | None:
    if scores is None:
        return None
    moved = {
        f.name: getattr(scores, f.name).to(DEVICE)
        for f in dataclasses.fields(scores)
        if isinstance(getattr(scores, f.name), torch.Tensor)
    }
    return dataclasses.replace(scores, **moved)


def run_kernel(b: Batch, scores: PrefillScoreArgs | None = None, **tiles) -> torch.Tensor:
    """The kernel's output (on the CPU); `scores.score_cache` gets its additions."""
    out = torch.full(b.q.shape, float("nan"), dtype=b.q.dtype, device=DEVICE)
    on_device = _to_device(scores)
    paged_prefill_attention(
        out, b.q.to(DEVICE), b.k_cache.to(DEVICE), b.v_cache.to(DEVICE),
        b.cu_seqlens_q.to(DEVICE), b.slot_start.to(DEVICE), b.block_tables.to(DEVICE), b.scale,
        on_device, **tiles,
    )  # fmt: skip
    if scores is not None and on_device is not scores:
        scores.score_cache.copy_(on_device.score_cache.cpu())
    return out.cpu()


# -- attention --------------------------------------------------------------------


@pytest.mark.parametrize(
    "page, D, tiles",
    [
        (4, 16, {"block_m": 16, "block_n": 16}),  # many query and key tiles
        (16, 64, {"block_m": 16, "block_n": 32}),
        (128, 16, {}),  # the default 64 x 64 tiles; one block per sequence
    ],
)
def test_attention_float32(page, D, tiles):
    b = make_batch(CHUNKS, page, D=D)
    out = run_kernel(b, **tiles)
    torch.testing.assert_close(out, reference_attention(b), rtol=1e-5, atol=1e-5)


def test_attention_bfloat16():
    b = make_batch(CHUNKS, 16, dtype=torch.bfloat16, seed=1)
    out = run_kernel(b)  # the default tiles
    assert out.dtype == torch.bfloat16
    # P goes through bfloat16 for P @ V, as on the GPU: bfloat16 tolerance.
    torch.testing.assert_close(out.float(), reference_attention(b), rtol=2e-2, atol=2e-2)


def test_attention_float16_and_max_seqlen():
    b = make_batch([(6, 17), (0, 3)], 4, dtype=torch.float16, seed=2)
    out = run_kernel(b, block_m=16, block_n=16, max_seqlen_q=17)
    torch.testing.assert_close(out.float(), reference_attention(b), rtol=2e-3, atol=2e-3)


# -- scores -------------------------------------------------------------------------

# Per chunk: (policy, seed), None for a chunk that adds no scores.
SCORED = {
    "h2o": [("h2o", 3), None, ("h2o", 4)],
    "keyformer": [("keyformer", 2**62 + 12345), ("keyformer", 7), None],
    "mixed": [None, ("keyformer", 2**62 - 1), ("h2o", 11)],
}


def score_specs(b: Batch, case: str) -> list[ScoreSpec | None]:
    specs = []
    for i, item in enumerate(SCORED[case]):
        if item is None:
            specs.append(None)
            continue
        policy, seed = item
        r0, n = int(b.cu_seqlens_q[i]), b.chunks[i][1]
        if policy == "h2o":
            specs.append(ScoreSpec(seed, False, 0, 1.0, 0.0))
        else:  # tau rises inside the chunk: each row has its own
            prompt_len = int(b.query_pos[r0]) + n // 2
            specs.append(ScoreSpec(seed, True, prompt_len, 0.6, 0.15))
    return specs


def score_args(b: Batch, specs: list[ScoreSpec | None], layer: int) -> PrefillScoreArgs:
    tau = torch.ones(b.q.shape[0])
    for i, spec in enumerate(specs):
        r0, n = int(b.cu_seqlens_q[i]), b.chunks[i][1]
        if spec is not None:
            tau[r0 : r0 + n] = spec.tau_at(b.query_pos[r0 : r0 + n]).float()
    return PrefillScoreArgs(
        score_cache=b.score_cache.clone(),
        pos_cache=b.pos_cache,
        active=torch.tensor([s is not None for s in specs]),
        seed=torch.tensor([s.seed if s else 99 for s in specs], dtype=torch.int64),
        use_noise=torch.tensor([bool(s and s.gumbel) for s in specs]),
        tau=tau,
        query_pos=b.query_pos,
        layer=layer,
        noise_table=gumbel_table(),
    )


def reference_scores(b: Batch, specs: list[ScoreSpec | None], layer: int) -> torch.Tensor:
    """The score cache after engine.attention.scoring.add_prompt_scores of each scored chunk."""
    cache = LayerCache(layer, b.k_cache, b.v_cache, b.score_cache.clone(), b.pos_cache)
    T, Hq, D = b.q.shape
    Hkv = b.k_cache.shape[2]
    for i, spec in enumerate(specs):
        if spec is None:
            continue
        (s0, n), r0 = b.chunks[i], int(b.cu_seqlens_q[i])
        slots = b.key_slots(i)
        span = PrefillSpan(
            token_start=r0, num_tokens=n, slot_start=s0, block_table=b.block_tables[i].long(),
            query_positions=b.query_pos[r0 : r0 + n], key_slots=slots, score=spec,
        )  # fmt: skip
        k = b.k_cache.view(-1, Hkv, D)[slots]
        k_pos = b.pos_cache.view(-1, Hkv)[slots].long().unsqueeze(0)
        add_prompt_scores(b.geometry, cache, b.q[r0 : r0 + n], k, k_pos, span)
    return cache.scores


@pytest.mark.parametrize("case", ["h2o", "keyformer", "mixed"])
def test_scores(case):
    b = make_batch(CHUNKS, 4, seed=3)
    specs = score_specs(b, case)
    layer = 5
    args = score_args(b, specs, layer)
    out = run_kernel(b, args, block_m=16, block_n=16)
    expected = reference_scores(b, specs, layer)
    # Only the active chunks' key slots changed, by what add_prompt_scores adds.
    torch.testing.assert_close(args.score_cache, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(args.score_cache, b.score_cache)
    # The scored variant's output is the plain attention.
    torch.testing.assert_close(out, reference_attention(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, D, page, tiles", [
    (torch.float32, 16, 4, {"block_m": 16, "block_n": 16}),
    (torch.bfloat16, 64, 16, {}),
])  # fmt: skip
def test_scores_of_an_observation_window(dtype, D, page, tiles):
    """Only the rows at positions >= a chunk's score_from add (query tiles
    wholly before it are skipped): the last 20 rows of the first chunk (its
    first 16-row tile skipped), the last 3 of the second, none of the third."""
    b = make_batch(CHUNKS, page, D=D, dtype=dtype, seed=6)
    layer, windows = 2, [20, 3, 0]
    specs = []
    for i, spec in enumerate(score_specs(b, "mixed")):
        r0, n = int(b.cu_seqlens_q[i]), b.chunks[i][1]
        spec = spec or ScoreSpec(21, False, 0, 1.0, 0.0)
        specs.append(dataclasses.replace(spec, score_from=int(b.query_pos[r0]) + n - windows[i]))
    args = score_args(b, specs, layer)
    args.score_from = torch.tensor([s.score_from for s in specs], dtype=torch.int64)
    run_kernel(b, args, **tiles)
    expected = reference_scores(b, specs, layer)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(args.score_cache, expected, rtol=tol, atol=tol)
    added = (args.score_cache - b.score_cache).sum()
    # Each scoring row adds one per query head; the third chunk adds nothing.
    Hq = b.q.shape[1]
    assert float(added) == pytest.approx(Hq * (20 + 3), rel=1e-4)


def test_scores_d64_bfloat16():
    b = make_batch(CHUNKS, 16, D=64, dtype=torch.bfloat16, seed=4)
    specs = score_specs(b, "mixed")
    args = score_args(b, specs, layer=0)
    run_kernel(b, args)  # the default tiles
    expected = reference_scores(b, specs, layer=0)
    # Logits from bfloat16 q, k with float32 sums: only the sum order differs.
    torch.testing.assert_close(args.score_cache, expected, rtol=1e-4, atol=1e-4)


def test_keyformer_noise_matters():
    """Keyformer's scores differ from H2O's: the noise and tau are in use."""
    b = make_batch(CHUNKS, 4, seed=5)
    keyformer = score_args(b, score_specs(b, "keyformer"), layer=1)
    run_kernel(b, keyformer, block_m=16, block_n=16)
    h2o = score_args(b, score_specs(b, "keyformer"), layer=1)
    h2o.use_noise.zero_()
    run_kernel(b, h2o, block_m=16, block_n=16)
    assert (keyformer.score_cache - h2o.score_cache).abs().max() > 0.1


# -- the Gumbel hash ------------------------------------------------------------------


@triton.jit
def _noise_kernel(Out, Seed, Head, QueryPos, KeyPos, NoiseTable, layer, M: tl.constexpr):
    rows = tl.arange(0, M)
    noise = prefill._gumbel_noise(
        tl.load(Seed + rows)[:, None],
        layer,
        tl.load(Head + rows)[:, None],
        tl.load(QueryPos + rows)[:, None],
        tl.load(KeyPos + rows)[None, :],
        NoiseTable,
    )
    tl.store(Out + rows[:, None] * M + rows[None, :], noise)


@pytest.mark.parametrize("layer", [0, 1, 47])
def test_gumbel_noise_bit_exact(layer):
    seeds = [0, 1, 7, 2**31, 2**62, 2**62 + 12345, 2**63 - 1, -1, 123456789012, 42, 5, 6,
             2**40 + 3, 999, 2**62 - 1, 31337]  # fmt: skip
    M = len(seeds)
    seed = torch.tensor(seeds, dtype=torch.int64)
    head = torch.arange(M, dtype=torch.int32) * 5  # query heads up to 75
    query_pos = torch.tensor([0, 1, 2**31, 2**33 + 5] * 4, dtype=torch.int64) + torch.arange(M)
    key_pos = torch.tensor([0, 2**31 - 1, 1, 65536] * 4, dtype=torch.int32) + torch.arange(
        M, dtype=torch.int32
    )
    key_pos[1] = 2**31 - 1
    out = torch.empty(M, M, device=DEVICE)
    args = [t.to(DEVICE) for t in (seed, head, query_pos, key_pos)]
    _noise_kernel[(1,)](out, *args, gumbel_table(DEVICE), layer, M=M)
    out = out.cpu()
    expected = gumbel_noise(
        seed.view(M, 1), layer, head.view(M, 1), query_pos.view(M, 1), key_pos.view(1, M)
    )
    assert torch.equal(out, expected)


# -- compiled for the GPU -----------------------------------------------------------

_COMPILE = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.triton import prefill

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    INTS = {"CuSeqlensQ": "*i32", "SlotStart": "*i32", "BlockTables": "*i32", "RowMax": "*fp32",
            "RowSum": "*fp32", "Active": "*i1", "Seed": "*i64", "UseNoise": "*i1", "Tau": "*fp32",
            "QueryPos": "*i64", "PosCache": "*i32", "NoiseTable": "*fp32", "ScoreCache": "*fp32",
            "ScoreFrom": "*i64"}
    # Strides and pointers a launch on real shapes finds divisible by 16.
    ALIGNED = {"stride_ot", "stride_oh", "stride_qt", "stride_qh", "stride_kb", "stride_ks",
               "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_pb", "stride_sb"}

    CASES = (("bfloat16", 128, True), ("float32", 64, True), ("float16", 64, False))
    for dtype, D, scored in CASES:
        block_m, block_n, warps, stages = prefill._launch_config(DTYPES[dtype], scored)
        data = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}[dtype]
        consts = dict(GROUP=4, PAGE=16, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
                      PRECISION="ieee" if dtype == "float32" else "tf32", UPCAST=False)
        kernels = [(prefill._attention_kernel, dict(consts, SCORED=scored))]
        if scored:
            kernels.append((prefill._scores_kernel, consts))
        for kernel, constexprs in kernels:
            sig, attrs = {}, {}
            for i, name in enumerate(kernel.arg_names):
                if name in constexprs:
                    sig[name] = "constexpr"
                elif name in ("Q", "K", "V", "Out"):
                    sig[name] = data
                else:
                    sig[name] = INTS.get(name, "fp32" if name == "scale" else "i32")
                if sig[name].startswith("*") or name in ALIGNED:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            options = dict(num_warps=warps, num_stages=stages)
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            assert c.metadata.shared <= 227 * 1024, c.metadata.shared
            if dtype != "float32":  # Hopper's tensor cores, not FMA
                assert "warp_group_dot" in c.asm["ttgir"], kernel.__name__
    """
)


def test_kernels_compile_for_sm90():
    """The kernels lower to sm_90 machine code (Triton's nvidia backend and
    ptxas; no GPU): the interpreter does not type-check as the compiler does."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE], cwd=root, env=env, capture_output=True, text=True
    )
    if "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("no ptxas")
    assert result.returncode == 0, result.stderr[-4000:]
