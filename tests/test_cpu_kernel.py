"""The C++ paged-decode kernel (engine/kernels/csrc/) against plain torch: the same
attention output and logits for random caches, block tables with padding,
ragged lengths, and every GQA grouping and head size it specializes."""

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu as cpu_kernels
from kv_manager.scoring import gumbel_exp_table, gumbel_noise, gumbel_table, step_scores

kernel = cpu_kernels.paged_decode_attention()
pytestmark = pytest.mark.skipif(
    kernel is None, reason="no C++ compiler here: the engine runs its torch decode path"
)


def _reference(q, k_cache, v_cache, tables, num_keys, scale):
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    keys = k_cache[tables].flatten(1, 2)  # [B, L, Hkv, D]
    values = v_cache[tables].flatten(1, 2)
    L = keys.shape[1]
    valid = torch.arange(L).view(1, 1, 1, L) < num_keys.view(B, 1, 1, 1)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=valid,
        scale=scale,
        enable_gqa=True,
    ).squeeze(2)
    qs = q.view(B, Hkv, Hq // Hkv, D)
    logits = torch.einsum("bhgd,blhd->bhgl", qs, keys).reshape(B, Hq, L) * scale
    return out, logits, valid.view(B, 1, L)


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, block_size",
    # Vector code (head size 64 or 128, groups up to 8) and scalar code (other
    # head sizes, or a group of 16 query heads per KV head).
    [(9, 3, 64, 16), (4, 4, 32, 4), (8, 2, 128, 8), (6, 1, 48, 16), (16, 1, 64, 16)],
)
def test_kernel_equals_torch(num_heads, num_kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(num_heads * 100 + head_dim)
    num_blocks, max_blocks = 40, 6
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    num_keys = torch.tensor([1, block_size, max_blocks * block_size, 2 * block_size + 3])
    B = num_keys.shape[0]
    # Each sequence gets its own blocks in shuffled order, padded with block 0.
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(B, max_blocks, dtype=torch.long)
    for b, n in enumerate(num_keys.tolist()):
        used = -(-n // block_size)
        tables[b, :used] = torch.tensor([order.pop() for _ in range(used)])
    q = torch.randn(B, num_heads, head_dim, generator=g)
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    sentinel = 1234.5
    logits = torch.full((B, num_heads, max_blocks * block_size), sentinel)
    kernel(out, q, k_cache, v_cache, tables, num_keys, scale, logits)
    ref_out, ref_logits, valid = _reference(q, k_cache, v_cache, tables, num_keys, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    valid = valid.expand_as(logits)
    torch.testing.assert_close(logits[valid], ref_logits[valid], rtol=1e-5, atol=1e-5)
    assert (logits[~valid] == sentinel).all()  # padding slots untouched
    # Without a logits buffer: the same output.
    again = torch.empty_like(q)
    kernel(again, q, k_cache, v_cache, tables, num_keys, scale, torch.empty(0))
    assert torch.equal(again, out)
    # One sequence: too few to give every thread one, so work splits by KV head.
    for b in range(B):
        one = torch.empty_like(q[b : b + 1])
        kernel(one, q[b : b + 1], k_cache, v_cache, tables[b : b + 1], num_keys[b : b + 1], scale,
               torch.empty(0))  # fmt: skip
        torch.testing.assert_close(one, ref_out[b : b + 1], rtol=1e-5, atol=1e-5)


def test_query_rows_sliced_from_a_fused_projection():
    """q as the model hands it over: a [B, Hq, D] view of the fused QKV
    projection's rows (each token's heads together, tokens further apart).
    The kernel reads it in place and answers as for a contiguous copy; a
    layout it cannot read is refused, not misread."""
    Hq, Hkv, D, bs = 9, 3, 64, 16
    g = torch.Generator().manual_seed(11)
    k_cache = torch.randn(12, bs, Hkv, D, generator=g)
    v_cache = torch.randn(12, bs, Hkv, D, generator=g)
    tables = torch.tensor([[3, 7, 0], [5, 1, 9]])
    num_keys = torch.tensor([40, 19])
    fused = torch.randn(2, (Hq + 2 * Hkv) * D, generator=g)
    q = fused[:, : Hq * D].view(2, Hq, D)
    assert not q.is_contiguous()
    out, copied = torch.empty(2, Hq, D), torch.empty(2, Hq, D)
    kernel(out, q, k_cache, v_cache, tables, num_keys, D**-0.5, torch.empty(0))
    kernel(copied, q.contiguous(), k_cache, v_cache, tables, num_keys, D**-0.5, torch.empty(0))
    assert torch.equal(out, copied)
    ref_out, _, _ = _reference(q.contiguous(), k_cache, v_cache, tables, num_keys, D**-0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    heads_apart = torch.randn(2, D, Hq, generator=g).transpose(1, 2)  # stride(1) != D
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(out, heads_apart, k_cache, v_cache, tables, num_keys, D**-0.5, torch.empty(0))


def test_logit_gaps_beyond_float32_exp_range():
    """A key whose logit is 100-300 above the others (exp of the gap is below
    float32's range): the decode kernel's running softmax, which meets the big
    key in a later block, and the score kernel both give torch's answer."""
    H, D, block_size = 2, 64, 16
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(4, block_size, H, D, generator=g) * 0.1
    v_cache = torch.randn(4, block_size, H, D, generator=g)
    q = torch.randn(1, H, D, generator=g)
    # Key 40 (third block) points along q, so its logit is far above the rest.
    for h, gap in enumerate([100.0, 300.0]):
        k_cache[2, 8, h] = q[0, h] * gap / (q[0, h] @ q[0, h]) * D**0.5
    tables = torch.tensor([[0, 1, 2, 3]])
    num_keys = torch.tensor([4 * block_size])
    out = torch.empty_like(q)
    logits = torch.empty(1, H, 4 * block_size)
    kernel(out, q, k_cache, v_cache, tables, num_keys, D**-0.5, logits)
    ref_out, ref_logits, _ = _reference(q, k_cache, v_cache, tables, num_keys, D**-0.5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, v_cache[2, 8].unsqueeze(0))  # all weight on key 40

    scores = torch.zeros(1, H, 1, 4 * block_size)
    cpu_kernels.accumulate_scores()(
        scores, ref_logits.view(1, H, 1, 1, -1).contiguous(), num_keys.view(1, 1),
        torch.tensor([[64]]), torch.zeros(1, 4 * block_size, H, dtype=torch.long),
        torch.ones(1, 1), torch.tensor([0]), torch.tensor([False]), 0, gumbel_table(),
        torch.empty(0), False,
    )  # fmt: skip
    expected = torch.softmax(ref_logits, dim=-1).view_as(scores)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    assert (scores >= 0).all()


def test_kernel_rejects_what_it_cannot_do():
    q = torch.randn(1, 2, 8, dtype=torch.float64)
    cache = torch.randn(4, 2, 2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(
            q.clone(),
            q,
            cache,
            cache,
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, dtype=torch.long),
            1.0,
            torch.empty(0),
        )


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    cpu_kernels.clear_cache()
    try:
        assert cpu_kernels.paged_decode_attention() is None
        assert cpu_kernels.accumulate_scores() is None
    finally:
        monkeypatch.delenv(cpu_kernels.DISABLE_ENV)
        cpu_kernels.clear_cache()
    assert cpu_kernels.paged_decode_attention() is not None


def test_a_failed_build_falls_back(monkeypatch, tmp_path, caplog):
    """No compiler: a warning that says why, and None (the torch path)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV, str(tmp_path / "cache"))
    cpu_kernels.clear_cache()
    try:
        assert cpu_kernels.paged_decode_attention() is None
    finally:
        cpu_kernels.clear_cache()
    assert "using the torch path" in caplog.text


def test_score_accumulation_equals_torch():
    """Keyformer's noisy tempered softmax, summed over queries, against
    kv_manager.scoring on the same logits: ragged visibility, several
    sequences, noise on and off, an output wider than the logits."""
    accumulate = cpu_kernels.accumulate_scores()
    g = torch.Generator().manual_seed(5)
    B, H, G, Q, S, S_out, layer = 3, 2, 3, 4, 11, 13, 7
    logits = torch.randn(B, H, G, Q, S, generator=g) * 3
    num_visible = torch.tensor([[1, 5, 11, 11], [3, 4, 5, 6], [11, 11, 2, 9]])
    query_pos = torch.randint(0, 1000, (B, Q), generator=g)
    key_pos = torch.randint(0, 1000, (B, S, H), generator=g)
    tau = torch.rand(B, Q, generator=g) + 1.0
    seed = torch.tensor([11, -3, 2**40])
    use_noise = torch.tensor([True, False, True])
    out = torch.full((B, H, G, S_out), 0.25)
    accumulate(
        out, logits, num_visible, query_pos, key_pos, tau, seed, use_noise, layer,
        gumbel_table(), torch.empty(0), False,
    )  # fmt: skip
    expected = torch.full((B, H, G, S_out), 0.25)
    head = torch.arange(H * G).view(H, G, 1, 1)
    for b in range(B):
        x = logits[b].clone()  # [H, G, Q, S]
        x[~(torch.arange(S).view(1, S) < num_visible[b].view(Q, 1)).expand(H, G, Q, S)] = float(
            "-inf"
        )
        noise = None
        if use_noise[b]:
            kp = key_pos[b].transpose(0, 1).view(H, 1, 1, S)
            noise = gumbel_noise(seed[b], layer, head, query_pos[b].view(1, 1, Q, 1), kp)
        scores = step_scores(x, tau[b].view(1, 1, Q, 1), noise)
        expected[b, :, :, :S] += scores.sum(2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("seed", torch.tensor([1]), "seed: contiguous int64"),
        ("num_visible", torch.tensor([[1, 2, 3]]).expand(2, 3), "num_visible: contiguous int64"),
        ("query_pos", torch.zeros(2, 4, dtype=torch.int32), "query_pos: contiguous int64"),
        ("tau", torch.ones(2), "tau: contiguous float32"),
        ("use_noise", torch.tensor([True]), "use_noise: contiguous bool"),
        ("exp_table", torch.ones(8), "exp_table: empty, or contiguous float32"),
    ],
)
def test_score_accumulation_refuses_inputs_of_another_shape(name, bad, message):
    """Each index input must match the logits' B and Q (a short one would be
    read past its end), and the exp table the noise table's size."""
    B, H, G, Q, S = 2, 1, 2, 4, 6
    inputs = {
        "num_visible": torch.full((B, Q), S),
        "query_pos": torch.zeros(B, Q, dtype=torch.long),
        "key_pos": torch.zeros(B, S, H, dtype=torch.long),
        "tau": torch.ones(B, Q),
        "seed": torch.zeros(B, dtype=torch.long),
        "use_noise": torch.ones(B, dtype=torch.bool),
        "exp_table": torch.empty(0),
    }

    def call():
        cpu_kernels.accumulate_scores()(
            torch.zeros(B, H, G, S), torch.randn(B, H, G, Q, S), inputs["num_visible"],
            inputs["query_pos"], inputs["key_pos"], inputs["tau"], inputs["seed"],
            inputs["use_noise"], 0, gumbel_table(), inputs["exp_table"], False,
        )  # fmt: skip

    call()  # every input right: it goes through
    inputs[name] = bad
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("with_exp_table", [True, False])
def test_scores_with_probabilities_written_in_place(with_exp_table):
    """A prompt chunk's mode: the logits become softmax(logits) over each
    query's visible keys (0 beyond) and the scores equal torch's. tau = 1 rows
    take the e^g shortcut when the exp table is given; the tau != 1 row and
    the run without the table take the general path."""
    accumulate = cpu_kernels.accumulate_scores()
    g = torch.Generator().manual_seed(9)
    B, H, G, Q, S, layer = 2, 2, 2, 4, 9, 3
    logits = torch.randn(B, H, G, Q, S, generator=g) * 3
    num_visible = torch.tensor([[1, 4, 9, 9], [6, 7, 8, 9]])
    query_pos = torch.randint(0, 500, (B, Q), generator=g)
    key_pos = torch.randint(0, 500, (B, S, H), generator=g)
    tau = torch.tensor([[1.0, 1.0, 1.0, 1.5], [1.0, 1.0, 1.0, 1.0]])
    seed = torch.tensor([4, 8])
    use_noise = torch.tensor([True, False])
    exp_table = gumbel_exp_table() if with_exp_table else torch.empty(0)
    out = torch.zeros(B, H, G, S)
    probs = logits.clone()
    accumulate(
        out, probs, num_visible, query_pos, key_pos, tau, seed, use_noise, layer,
        gumbel_table(), exp_table, True,
    )  # fmt: skip
    visible = torch.arange(S).view(1, 1, S) < num_visible.view(B, Q, 1)  # [B, Q, S]
    visible = visible.view(B, 1, 1, Q, S).expand_as(logits)
    masked = logits.masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(probs, torch.softmax(masked, dim=-1), rtol=1e-5, atol=1e-7)
    head = torch.arange(H * G).view(H, G, 1, 1)
    for b in range(B):
        noise = None
        if use_noise[b]:
            kp = key_pos[b].transpose(0, 1).view(H, 1, 1, S)
            noise = gumbel_noise(seed[b], layer, head, query_pos[b].view(1, 1, Q, 1), kp)
        expected = step_scores(masked[b], tau[b].view(1, 1, Q, 1), noise).sum(2)
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("H", [2, 3, 5])  # head counts built in, and one at run time
def test_lowest_priority_slot_selection_equals_torch(H):
    """The C++ victim choice against the rule in torch: lowest score outside
    the recent window, the oldest position among equal scores (many ties:
    scores are small integers, -0 among the zeros), a sequence entirely
    inside its window (then the oldest slot), ragged counts and shuffled
    physical slots."""
    select = cpu_kernels.lowest_priority_slots()
    g = torch.Generator().manual_seed(21 + H)
    L, N, B, S = 3, 200, 4, 40
    scores = torch.randint(0, 4, (L, N, H), generator=g).float()
    scores[(scores == 0) & (torch.rand(L, N, H, generator=g) < 0.5)] = -0.0
    positions = torch.randint(0, 1000, (L, N, H), generator=g, dtype=torch.int32)
    order = torch.randperm(N, generator=g)
    slots = order[: B * S].view(B, S).contiguous()
    counts = torch.tensor([40, 17, 1, 33])
    starts = torch.tensor([700, 300, 500, 0])  # the last: every slot is recent
    got = select(scores, positions, slots, counts, starts)
    sc = scores[:, slots].permute(1, 0, 3, 2)  # [B, L, H, S]
    pos = positions[:, slots].permute(1, 0, 3, 2)
    valid = (torch.arange(S) < counts.view(B, 1)).view(B, 1, 1, S)
    priority = sc.masked_fill((pos >= starts.view(B, 1, 1, 1)) | ~valid, float("inf"))
    lowest = (priority == priority.amin(-1, keepdim=True)) & valid
    expected = pos.masked_fill(~lowest, torch.iinfo(torch.int32).max).argmin(-1)
    assert torch.equal(got, expected)
    assert (got[2] == 0).all()
    with pytest.raises(RuntimeError, match="outside the cache"):
        select(scores, positions, slots + N, counts, starts)


def _causal_reference(q, k, v, scale):
    """Query i sees keys [0, S - n + i]: a chunk after S - n cached keys."""
    n, S = q.shape[0], k.shape[0]
    visible = torch.arange(S).view(1, S) <= (torch.arange(n) + S - n).view(n, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=visible, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(0, 1)


@pytest.mark.parametrize(
    "n, S, num_heads, num_kv_heads, head_dim",
    # One token; a whole prompt; later chunks (S > n) of ragged sizes; a
    # group of 16 query heads per KV head; head size 128.
    [(1, 1, 9, 3, 64), (100, 100, 9, 3, 64), (37, 300, 4, 2, 128), (129, 515, 9, 3, 64),
     (70, 70, 16, 1, 64)],
)  # fmt: skip
def test_prompt_attention_equals_torch(n, S, num_heads, num_kv_heads, head_dim):
    g = torch.Generator().manual_seed(n + S)
    # q as a view of a merged projection's output: rows with a stride.
    width = (num_heads + 2 * num_kv_heads) * head_dim
    q = torch.randn(n, width, generator=g)[:, : num_heads * head_dim]
    q = q.view(n, num_heads, head_dim)
    k = torch.randn(S, num_kv_heads, head_dim, generator=g)
    v = torch.randn(S, num_kv_heads, head_dim, generator=g)
    out = torch.empty(n, num_heads, head_dim)
    cpu_kernels.prefill_attention()(out, q, k, v, head_dim**-0.5)
    want = _causal_reference(q, k, v, head_dim**-0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_prompt_attention_rejects_what_it_cannot_do():
    op = cpu_kernels.prefill_attention()
    q, k = torch.randn(4, 2, 32), torch.randn(4, 1, 32)
    with pytest.raises(RuntimeError, match="head size 64 or 128"):
        op(torch.empty_like(q), q, k, k, 1.0)
    q, k = torch.randn(5, 2, 64), torch.randn(4, 1, 64)
    with pytest.raises(RuntimeError, match="fewer keys than queries"):
        op(torch.empty_like(q), q, k, k, 1.0)


def _prompt_scores_reference(q, k, key_pos, query_pos, tau, seed, layer, use_noise, scale):
    """[Hkv, S]: each key's score summed over the chunk's queries and the
    query heads of its KV head, by kv_manager.scoring on explicit logits."""
    n, Hq, _ = q.shape
    S, Hkv, _ = k.shape
    G = Hq // Hkv
    logits = torch.einsum("nhd,shd->hns", q, k.repeat_interleave(G, dim=1)) * scale
    visible = torch.arange(S).view(1, S) <= (torch.arange(n) + S - n).view(n, 1)
    logits = logits.masked_fill(~visible, float("-inf"))  # [Hq, n, S]
    noise = None
    if use_noise:
        kp = key_pos.transpose(0, 1).repeat_interleave(G, dim=0).view(Hq, 1, S)
        head = torch.arange(Hq).view(Hq, 1, 1)
        noise = gumbel_noise(torch.tensor(seed), layer, head, query_pos.view(1, n, 1), kp)
    scores = step_scores(logits, tau.view(1, n, 1), noise)  # [Hq, n, S]
    return scores.sum(1).view(Hkv, G, S).sum(1)


@pytest.mark.parametrize(
    "n, S, num_heads, num_kv_heads, head_dim, policy",
    # Keyformer at tau = 1 (the e^g shortcut), at tau > 1 and without the
    # exp table (the tempered softmax); H2O. Fresh prompts and later chunks,
    # GQA groups of 3 and 16, head size 128, one token, and a chunk long
    # enough that its query tiles share score rows.
    [(100, 100, 9, 3, 64, "keyformer"), (37, 300, 4, 2, 128, "keyformer_tau"),
     (129, 515, 9, 3, 64, "h2o"), (70, 70, 16, 1, 64, "keyformer_no_table"),
     (1, 1, 9, 3, 64, "keyformer"), (1100, 1200, 2, 1, 64, "keyformer")],
)  # fmt: skip
def test_scored_prompt_attention_equals_torch(n, S, num_heads, num_kv_heads, head_dim, policy):
    g = torch.Generator().manual_seed(n + S + head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    q = torch.randn(n, width, generator=g)[:, : num_heads * head_dim]
    q = q.view(n, num_heads, head_dim)
    k = torch.randn(S, num_kv_heads, head_dim, generator=g)
    v = torch.randn(S, num_kv_heads, head_dim, generator=g)
    # Earlier evictions (per KV head) left cached positions apart from the
    # slot numbers; the chunk's own keys are at its query positions.
    base = torch.randperm(2 * S, generator=g)[: S - n].sort().values
    cached = [base + h for h in range(num_kv_heads)]
    query_pos = torch.arange(n) + 2 * S + num_kv_heads
    own = query_pos.view(n, 1).expand(n, num_kv_heads)
    key_pos = torch.cat([torch.stack(cached, dim=1), own]).contiguous()
    tau = torch.ones(n)
    if policy == "keyformer_tau":
        tau = 1 + torch.rand(n, generator=g)
    use_noise = policy != "h2o"
    exp_table = torch.empty(0) if policy == "keyformer_no_table" else gumbel_exp_table()
    seed, layer, scale = 2**40 + 7, 5, head_dim**-0.5
    out = torch.empty(n, num_heads, head_dim)
    scores = torch.full((num_kv_heads, S), 0.5)
    cpu_kernels.prefill_attention_scored()(
        out, scores, q, k, v, scale, query_pos, key_pos, tau, seed, use_noise, layer,
        gumbel_table(), exp_table,
    )  # fmt: skip
    torch.testing.assert_close(out, _causal_reference(q, k, v, scale), rtol=1e-5, atol=1e-5)
    want = _prompt_scores_reference(q, k, key_pos, query_pos, tau, seed, layer, use_noise, scale)
    torch.testing.assert_close(scores, want + 0.5, rtol=1e-5, atol=1e-5)


def test_scored_prompt_attention_rejects_what_it_cannot_do():
    op = cpu_kernels.prefill_attention_scored()
    q, k = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
    pos, tau = torch.arange(4), torch.ones(4)
    args = (1.0, pos, pos.view(4, 1), tau, 0, True, 0, gumbel_table(), gumbel_exp_table())
    with pytest.raises(RuntimeError, match=r"scores: contiguous float32 \[Hkv, S\]"):
        op(torch.empty_like(q), torch.zeros(2, 4), q, k, k, *args)
    with pytest.raises(RuntimeError, match="key_pos"):
        op(torch.empty_like(q), torch.zeros(1, 4), q, k, k, 1.0, pos, pos, *args[3:])
    with pytest.raises(RuntimeError, match="power-of-two"):
        op(torch.empty_like(q), torch.zeros(1, 4), q, k, k, *args[:7], torch.ones(3), args[8])
    q, k = torch.randn(4, 2, 32), torch.randn(4, 1, 32)
    with pytest.raises(RuntimeError, match="head size 64 or 128"):
        op(torch.empty_like(q), torch.zeros(1, 4), q, k, k, *args)


def test_decode_scores_added_in_place_equal_torch():
    """A decode step's scores straight into the score cache: positions read
    through each row's slots, noise on and off, ragged key counts, tau > 1,
    and slots scattered over the cache (untouched slots keep their score)."""
    g = torch.Generator().manual_seed(17)
    N, H, G, b, L, layer = 300, 3, 3, 4, 40, 6
    score_cache = torch.rand(N, H, generator=g)
    pos_cache = torch.randint(0, 5000, (N, H), generator=g, dtype=torch.int32)
    logits = torch.randn(b, H * G, L, generator=g) * 3
    key_slots = torch.randperm(N, generator=g)[: b * L].view(b, L).contiguous()
    num_keys = torch.tensor([40, 1, 23, 37])
    query_pos = torch.tensor([5000, 5001, 6000, 7000])
    tau = torch.tensor([1.0, 1.5, 1.0, 2.0])
    seed = torch.tensor([3, 2**40, -5, 9])
    use_noise = torch.tensor([True, True, False, True])
    expected = score_cache.clone()
    cpu_kernels.add_decode_scores()(
        score_cache, logits, key_slots, pos_cache, num_keys, query_pos, tau, seed, use_noise,
        layer, gumbel_table(),
    )  # fmt: skip
    head = torch.arange(H * G).view(H, G, 1)
    for r in range(b):
        n = int(num_keys[r])
        slots = key_slots[r, :n]
        x = logits[r, :, :n].reshape(H, G, n)
        noise = None
        if use_noise[r]:
            kp = pos_cache[slots].long().transpose(0, 1).view(H, 1, n)
            noise = gumbel_noise(seed[r], layer, head, query_pos[r], kp)
        contrib = step_scores(x, tau[r], noise).sum(1)  # [H, n]
        expected[slots] += contrib.transpose(0, 1)
    torch.testing.assert_close(score_cache, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.add_decode_scores()(
            score_cache, logits, key_slots + N, pos_cache, num_keys, query_pos, tau, seed,
            use_noise, layer, gumbel_table(),
        )  # fmt: skip
