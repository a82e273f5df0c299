"""Paged KV memory: the block pool and per-sequence block tables.

This package deals in block ids and counts only; it imports nothing else from
the project and owns no tensors.
"""

from kv_manager.manager import KVCacheManager
from kv_manager.pool import BlockPool

__all__ = ["BlockPool", "KVCacheManager"]
