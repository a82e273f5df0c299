"""Decode-graph bucketing and padding, on the CPU (no capture here: the same
static buffers run eagerly)."""

import pytest
import torch

from engine.attention.context import AttentionContext, DecodeBatch, DecodeScoring
from engine.runtime.decode_graphs import DecodeGraphRunner, bucket_for, decode_buckets


def test_buckets_cover_every_batch_size_with_little_padding():
    buckets = decode_buckets(64)
    assert buckets == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    for rows in range(1, 65):
        b = bucket_for(rows, buckets)
        assert b >= rows and b - rows <= max(7, rows // 2)
    assert decode_buckets(1) == [1]
    assert decode_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(65, buckets)


def _step(rows: int, scored_rows: list[int]) -> tuple[torch.Tensor, AttentionContext]:
    tables = torch.arange(rows * 2).view(rows, 2) + 10
    batch = DecodeBatch(
        block_tables=tables,
        key_valid=torch.ones(rows, 8, dtype=torch.bool),
        num_keys=torch.arange(rows) + 5,
        query_positions=torch.arange(rows) + 100,
    )
    if scored_rows:
        r = torch.tensor(scored_rows)
        batch.scoring = DecodeScoring(
            rows=r, all_rows=False, seed=r * 0 + 7, gumbel=r > 0, tau=r.float() + 1.5,
            query_positions=r + 100, num_keys=r + 5, key_valid=batch.key_valid[r],
            block_tables=tables[r], key_slots=torch.empty(0, dtype=torch.long),
        )  # fmt: skip
    ctx = AttentionContext(torch.arange(rows) + 40, torch.arange(rows) + 100, decode=batch)
    return torch.arange(rows) + 1, ctx


def test_a_step_fills_its_rows_and_pads_the_bucket_to_the_scratch_block():
    runner = DecodeGraphRunner(
        model=None, block_size=4, max_batch=8, max_blocks=3, scratch_block=99,
        device=torch.device("cpu"),
    )  # fmt: skip
    ids, ctx = _step(3, scored_rows=[0, 2])
    runner._fill(4, ids, ctx)
    s = runner.inputs
    assert s.input_ids[:4].tolist() == [1, 2, 3, 0]
    assert s.slot_mapping[:4].tolist() == [40, 41, 42, 99 * 4]
    assert s.block_tables[:4].tolist() == [[10, 11, 99], [12, 13, 99], [14, 15, 99], [99] * 3]
    assert s.num_keys[:4].tolist() == [5, 6, 7, 1]
    assert s.active[:4].tolist() == [True, False, True, False]
    assert s.tau[:4].tolist() == [1.5, 1.0, 3.5, 1.0]
    assert s.use_noise[:4].tolist() == [False, False, True, False]
    # A smaller step after it leaves nothing of the larger one behind.
    ids, ctx = _step(1, scored_rows=[])
    runner._fill(2, ids, ctx)
    assert s.num_keys[:2].tolist() == [5, 1] and not s.active[:2].any()
    assert s.slot_mapping[:2].tolist() == [40, 99 * 4]


def test_larger_steps_than_the_buffers_take_the_eager_path():
    runner = DecodeGraphRunner(None, 4, max_batch=4, max_blocks=1, scratch_block=9,
                               device=torch.device("cpu"))  # fmt: skip
    _, wide = _step(2, [])  # 2 blocks a row, the buffers hold 1
    _, many = _step(5, [])
    _, fits = _step(2, [])
    fits.decode.block_tables = fits.decode.block_tables[:, :1]
    assert not runner.applies(wide) and not runner.applies(many) and runner.applies(fits)
