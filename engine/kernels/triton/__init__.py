"""Triton kernels for CUDA: paged decode attention and prompt attention, each
with an optional scored variant that adds H2O / Keyformer eviction scores
into the paged score cache. They take plain tensors and numbers."""
