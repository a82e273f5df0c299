"""A stand-in for FlashInfer's two paged-attention wrappers, in plain torch.

Written from FlashInfer's documented contract, not its code: a CSR page table
(indptr, indices, last_page_len, all int32) over an "NHD" cache of shape
[pages, page_size, Hkv, D]; grouped-query heads; prefill queries causal and
aligned to the end of their request's keys. It checks what the real kernels
would reject (bad page tables, a plan missing before run) and counts runs, so
a CPU test can prove the engine drives FlashInfer correctly; a GPU test in
test_flashinfer_path.py holds the real kernels to the same results.
"""

import torch

runs = {"decode": 0, "prefill": 0}


class _PagedWrapper:
    kind = ""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        assert kv_layout == "NHD", kv_layout
        assert float_workspace_buffer.dtype == torch.uint8
        self._plan: dict | None = None

    def _set_plan(self, qo_indptr, indptr, indices, last_page_len, shape, page_size, **kw):
        for t in (qo_indptr, indptr, indices, last_page_len):
            assert t.dtype == torch.int32, t.dtype
        batch = last_page_len.shape[0]
        assert indptr.shape[0] == batch + 1 and qo_indptr.shape[0] == batch + 1
        assert int(indptr[0]) == 0 and int(indptr[-1]) == indices.shape[0]
        assert bool((last_page_len >= 1).all()) and bool((last_page_len <= page_size).all())
        num_qo_heads, num_kv_heads, head_dim = shape
        assert num_qo_heads % num_kv_heads == 0
        self._plan = dict(
            qo_indptr=qo_indptr, indptr=indptr, indices=indices, last_page_len=last_page_len,
            shape=shape, page_size=page_size, scale=kw.get("sm_scale") or head_dim**-0.5,
            causal=kw.get("causal", False),
        )  # fmt: skip

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor]):
        assert self._plan is not None, "run() before plan()"
        runs[self.kind] += 1
        return _attend(q, paged_kv_cache, **self._plan)


class BatchDecodeWithPagedKVCacheWrapper(_PagedWrapper):
    kind = "decode"

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, **kw) -> None:  # fmt: skip
        qo_indptr = torch.arange(last_page_len.shape[0] + 1, dtype=torch.int32)
        shape = (num_qo_heads, num_kv_heads, head_dim)
        self._set_plan(qo_indptr, indptr, indices, last_page_len, shape, page_size, **kw)


class BatchPrefillWithPagedKVCacheWrapper(_PagedWrapper):
    kind = "prefill"

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, **kw) -> None:  # fmt: skip
        shape = (num_qo_heads, num_kv_heads, head_dim_qk)
        self._set_plan(
            qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
            shape, page_size, **kw,
        )  # fmt: skip


def _attend(q, cache, qo_indptr, indptr, indices, last_page_len, shape, page_size, scale, causal):
    k_cache, v_cache = cache
    num_qo_heads, num_kv_heads, head_dim = shape
    group = num_qo_heads // num_kv_heads
    out = torch.empty_like(q)
    for b in range(last_page_len.shape[0]):
        pages = indices[int(indptr[b]) : int(indptr[b + 1])].long()
        n = (pages.shape[0] - 1) * page_size + int(last_page_len[b])
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n].repeat_interleave(group, 1)
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n].repeat_interleave(group, 1)
        rows = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
        qb = q[rows].float()  # [m, Hq, D]
        logits = torch.einsum("mhd,nhd->hmn", qb, k.float()) * scale
        if causal:
            m = qb.shape[0]
            i = torch.arange(m).view(m, 1)
            j = torch.arange(n).view(1, n)
            logits = logits.masked_fill(j > n - m + i, float("-inf"))
        out[rows] = torch.einsum("hmn,nhd->mhd", logits.softmax(-1), v.float()).to(q.dtype)
    return out
