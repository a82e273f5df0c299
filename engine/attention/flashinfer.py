"""Paged attention on CUDA through FlashInfer, when it is installed.

FlashInfer reads K and V in place through page tables, and its "NHD" page
layout, [pages, page_size, Hkv, D], is exactly our cache's, so decode and the
later chunks of a chunked prefill never gather a sequence's context. The page
table is planned once per step (FlashInfer splits the work from it on the
host) and every layer runs with that plan.

Where FlashInfer is missing or does not apply (CPU, float32, head sizes it
does not build, ALiBi and sliding windows) the attention layer keeps its own
path; `available` says which. Set KEYSERVE_DISABLE_FLASHINFER=1 to force that.
"""

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "KEYSERVE_DISABLE_FLASHINFER"
# One workspace per planned wrapper: FlashInfer keeps a plan's split-KV
# partial results there. Its documentation sizes it at 128 MiB.
WORKSPACE_BYTES = 128 * 1024 * 1024
# What FlashInfer's prebuilt kernels cover. Tests widen these to run a
# stand-in module on CPU; nothing else should change them.
DEVICE_TYPES = ("cuda",)
DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128, 256)

_wrappers: dict[tuple, object] = {}
# Set when a plan failed (e.g. a kernel FlashInfer would have to JIT-compile,
# in an image without nvcc): the engine then stays on its own path.
_failed: list[str] = []


@functools.cache
def _flashinfer() -> ModuleType | None:
    """The module, looked up once: every layer of every step asks."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    try:
        return importlib.import_module("flashinfer")
    except ImportError:
        return None


def available(q: torch.Tensor, head_dim: int) -> bool:
    """True when FlashInfer is installed and covers this device, dtype and head size."""
    return (
        not _failed
        and q.device.type in DEVICE_TYPES
        and q.dtype in DTYPES
        and head_dim in HEAD_DIMS
        and _flashinfer() is not None
    )


def page_table(
    block_tables: torch.Tensor, num_keys: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded block tables [B, W] and key counts [B] -> FlashInfer's CSR page
    table: indptr [B + 1], indices [sum of pages], last_page_len [B] (int32).

    A sequence's keys are its first num_keys slots (eviction compacts them),
    so it uses the first ceil(num_keys / block_size) blocks of its row."""
    pages = (num_keys + block_size - 1) // block_size  # [B]
    used = torch.arange(block_tables.shape[1], device=block_tables.device) < pages.unsqueeze(1)
    indices = block_tables[used].to(torch.int32)  # row-major: each row's pages in order
    indptr = torch.zeros(pages.shape[0] + 1, dtype=torch.int32, device=block_tables.device)
    indptr[1:] = torch.cumsum(pages, 0)
    last_page_len = (num_keys - (pages - 1) * block_size).to(torch.int32)
    return indptr, indices, last_page_len


def _planned(wrapper, *args, **kwargs):
    """wrapper.plan(...), or None after logging why FlashInfer is off from now on."""
    try:
        wrapper.plan(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure here means "use the fallback"
        _failed.append(repr(e))
        logger.warning("FlashInfer could not plan (%r); using torch attention from now on", e)
        return None
    return wrapper


def _wrapper(kind: str, index: int, device: torch.device):
    """A FlashInfer wrapper with its own workspace, made once and re-planned every step."""
    key = (kind, index, str(device))
    if key not in _wrappers:
        fi = _flashinfer()
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        cls = (
            fi.BatchDecodeWithPagedKVCacheWrapper
            if kind == "decode"
            else fi.BatchPrefillWithPagedKVCacheWrapper
        )
        _wrappers[key] = cls(workspace, "NHD")
    return _wrappers[key]


def plan_decode(
    block_tables: torch.Tensor,
    num_keys: torch.Tensor,
    block_size: int,
    shape: tuple[int, int, int],
    scale: float,
    dtype: torch.dtype,
):
    """Plan one step's decode; shape is (num_heads, num_kv_heads, head_dim).
    Returns the wrapper (call .run(q [B, Hq, D], (k_cache, v_cache))), or None
    when FlashInfer failed to plan."""
    indptr, indices, last_page_len = page_table(block_tables, num_keys, block_size)
    return _planned(
        _wrapper("decode", 0, block_tables.device),
        indptr, indices, last_page_len, *shape, block_size,
        pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype, sm_scale=scale,
    )  # fmt: skip


def plan_prefill(
    index: int,
    block_table: torch.Tensor,
    num_queries: int,
    num_keys: int,
    block_size: int,
    shape: tuple[int, int, int],
    scale: float,
    dtype: torch.dtype,
):
    """Plan prefill chunk `index` of this step: its num_queries new tokens are
    the last of its num_keys cached keys (causal, aligned to the end).
    Returns the wrapper (call .run(q [n, Hq, D], (k_cache, v_cache))), or None
    when FlashInfer failed to plan."""
    dev = block_table.device
    keys = torch.tensor([num_keys], device=dev)
    indptr, indices, last_page_len = page_table(block_table.unsqueeze(0), keys, block_size)
    qo_indptr = torch.tensor([0, num_queries], dtype=torch.int32, device=dev)
    return _planned(
        _wrapper("prefill", index, dev),
        qo_indptr, indptr, indices, last_page_len, *shape, block_size,
        causal=True, q_data_type=dtype, kv_data_type=dtype, sm_scale=scale,
    )  # fmt: skip
