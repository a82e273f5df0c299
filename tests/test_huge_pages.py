"""Huge-page advice for the KV cache: the tensor is an ordinary tensor
whether or not the OS grants 2 MB pages."""

import torch

from engine.host.huge_pages import empty_with_huge_pages


def test_an_advised_tensor_is_an_ordinary_tensor():
    t = empty_with_huge_pages(3, 1 << 20, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    t.zero_()[1, 5] = 2.0
    assert t.sum().item() == 2.0


def test_empty_tensors_and_other_dtypes():
    assert empty_with_huge_pages(0, 4, dtype=torch.int32, device=torch.device("cpu")).numel() == 0
    t = empty_with_huge_pages(7, dtype=torch.bfloat16, device=torch.device("cpu")).fill_(1.5)
    assert t.float().sum().item() == 10.5
