"""Keyformer's counter-based Gumbel noise and the step score."""

import math

import torch

from kv_manager.scoring import GUMBEL_TABLE_BITS, gumbel_noise, gumbel_table, step_scores


def test_noise_is_finite_at_the_top_of_the_range():
    # This input hashes to the largest top bits, where a float32 uniform once
    # rounded to exactly 1 and the noise was +inf.
    g = gumbel_noise(torch.tensor(7), 0, torch.tensor(1), torch.tensor(0), torch.tensor(80))
    assert torch.isfinite(g)
    assert float(g) == float(gumbel_table()[-1])
    top = -math.log(-math.log(1 - 2.0 ** -(GUMBEL_TABLE_BITS + 1)))  # about 11.78
    assert abs(float(g) - top) < 1e-5


def test_table_is_gumbel_quantiles():
    table = gumbel_table().double()
    size = 1 << GUMBEL_TABLE_BITS
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    assert torch.allclose(table, -torch.log(-torch.log(u)), atol=1e-6)
    assert torch.isfinite(table).all() and (table.diff() > 0).all()


def test_noise_is_finite_and_gumbel_distributed():
    g = gumbel_noise(
        torch.tensor(3),
        5,
        torch.arange(8).view(8, 1, 1),
        torch.arange(256).view(1, 256, 1),
        torch.arange(512).view(1, 1, 512),
    )
    assert torch.isfinite(g).all()
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, std = pi / sqrt(6).
    assert abs(float(g.mean()) - 0.5772) < 0.01
    assert abs(float(g.std()) - 1.2825) < 0.01


def test_noise_depends_on_every_key_component():
    base = dict(
        seed=torch.tensor(1),
        layer=2,
        head=torch.tensor(3),
        query_pos=torch.tensor(40),
        key_pos=torch.tensor(7),
    )
    ref = gumbel_noise(**base)
    for name, other in [
        ("seed", torch.tensor(2)),
        ("layer", 3),
        ("head", torch.tensor(4)),
        ("query_pos", torch.tensor(41)),
        ("key_pos", torch.tensor(8)),
    ]:
        assert gumbel_noise(**{**base, name: other}) != ref, name


def test_masked_keys_score_zero_even_with_noise():
    logits = torch.tensor([[1.0, float("-inf"), 0.5]])
    noise = gumbel_noise(torch.tensor(9), 0, torch.tensor(0), torch.tensor(2), torch.arange(3))
    f = step_scores(logits, torch.tensor(1.5), noise.view(1, 3))
    assert torch.isfinite(f).all() and f[0, 1] == 0.0
    assert abs(float(f.sum()) - 1.0) < 1e-6
