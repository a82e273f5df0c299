"""The greedy-token kernel (engine/kernels/csrc/sampling_cpu.cpp) answers as
torch.argmax on every row: ties, NaN, -inf, rows shorter than its vectors,
rows a stride apart. The sampler takes it for float32 CPU logits."""

import pytest
import torch

from engine.kernels import cpu as cpu_kernels
from engine.runtime import sampler

kernel = cpu_kernels.greedy_tokens()
pytestmark = pytest.mark.skipif(
    kernel is None, reason="no C++ compiler here: the sampler runs torch.argmax"
)


@pytest.mark.parametrize("vocab", [1, 7, 16, 63, 64, 65, 1000, 49152])
def test_random_rows_equal_torch_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(37, vocab, generator=g)
    assert torch.equal(kernel(logits), logits.argmax(dim=-1))


def test_ties_nan_and_infinities_as_torch():
    vocab = 200
    rows = torch.randn(8, vocab, generator=torch.Generator().manual_seed(1))
    rows[0, [5, 77, 150]] = 9.0  # a tie across vectors and sets of lanes: the first wins
    rows[1, [130, 3]] = 9.0  # the tie's first index sits in a later lane of an earlier chunk
    rows[2, 190:] = 50.0  # the maximum only in the scalar tail, tied there
    rows[3] = float("-inf")  # all -inf: index 0
    rows[4, [12, 100]] = float("nan")  # a NaN wins, the first one
    rows[5, 199] = float("nan")  # a NaN in the tail
    rows[6, 66] = float("inf")
    rows[7, [64, 0]] = rows[7].max() + 1  # the first lane of two chunks
    assert torch.equal(kernel(rows), rows.argmax(dim=-1))


def test_rows_a_stride_apart():
    wide = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    rows = wide[:, :250]
    assert torch.equal(kernel(rows), rows.argmax(dim=-1))


def test_refuses_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="float32"):
        kernel(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.randn(8, 2).t())


def test_the_sampler_takes_it(monkeypatch):
    calls = []
    monkeypatch.setattr(sampler, "greedy_tokens", lambda: lambda x: calls.append(x) or kernel(x))
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3))
    assert sampler._argmax_rows(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert len(calls) == 1
    sampler._argmax_rows(logits.double())  # not float32: torch's argmax
    assert len(calls) == 1
