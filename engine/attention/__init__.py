"""Attention over the paged KV cache: the layer, its per-step metadata, the
backends (chosen once per model) and the eviction scoring they add."""
