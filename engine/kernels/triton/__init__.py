"""Triton kernels for CUDA: attention that reads the paged KV cache in place and
adds the H2O / Keyformer eviction scores. They take plain tensors and numbers
and import nothing else of the project."""
