"""The error bound the bf16 attention kernels are held to, shared by the
prompt and decode kernel tests."""

import torch


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor) -> None:
    """Every element of `out` (bf16) within its bound of `ref` (the float32
    attention P V): the output's rounding (bf16 keeps 8 significant bits:
    2^-8 of it) plus the probabilities' (2^-8 of `mag` = P |V|) plus float32
    slack; and the error's RMS at most 1.6x that of rounding the exact
    output once (it is 1.0x on the widening path, ~1.25x with P in bf16): a
    wrong key or weight anywhere shows."""
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs()
    bound = 2**-8 * ref.abs() + (2**-8 * 1.01 + 1e-5) * mag + 1e-6
    worst = (err - bound).max()
    assert worst <= 0, f"{int((err > bound).sum())} elements over the bound, by up to {worst}"
    rounding = (ref.bfloat16().float() - ref).pow(2).mean().sqrt()
    assert err.pow(2).mean().sqrt() <= 1.6 * rounding + 1e-7
