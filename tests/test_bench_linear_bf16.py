"""bench.linear_bf16: both sides run the same shapes and the report says so."""

import json

import pytest
import torch

from engine.kernels.linear import own_bf16_kernel


@pytest.mark.skipif(
    not own_bf16_kernel() or not torch.backends.mkldnn.is_available(),
    reason="needs the AVX-512-BF16 kernel and oneDNN",
)
def test_one_small_pass_is_measured_and_written(tmp_path):
    from bench.linear_bf16 import main

    out = tmp_path / "linear.md"
    (row,) = main(["--rows", "3", "--layers", "1", "--repeat", "1", "--out", str(out)])
    assert row["rows"] == 3 and row["onednn_ms"] > 0 and row["keyserve_ms"] > 0
    assert row["speedup"] == pytest.approx(row["onednn_ms"] / row["keyserve_ms"])
    assert "| 3 |" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["results"][0]["rows"] == 3
