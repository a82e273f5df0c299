"""Paged KV memory: the block pool and per-sequence block tables.

This package deals in block ids and slot counts; the cache tensors those ids
index belong to the engine. It imports nothing else from the project. Its
eviction policies (policies/) rank slots from scores and positions given as
tensors, and `scoring` defines what H2O and Keyformer add to a key's score.
"""

from kv_manager.manager import KVCacheManager
from kv_manager.pool import BlockPool

__all__ = ["BlockPool", "KVCacheManager"]
