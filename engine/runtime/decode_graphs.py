"""Decode steps replayed from CUDA graphs: one capture per batch-size bucket.

A decode step is dozens of small kernels per layer; on a GPU the host spends
longer launching them than the GPU spends running them. Captured once per
bucket of batch sizes (and per scored / plain step), a whole decode forward
is one replay. The inputs live in static buffers: each step copies its rows
in and pads the bucket's remaining rows so they attend one key of a scratch
block that belongs to no sequence (their K/V writes land there too), and
never add scores.

On a CPU the same buffers and padding run eagerly (nothing is captured), so
the tests check the padding through whole generations.
"""

from dataclasses import dataclass

import torch

from engine.attention.context import AttentionContext, DecodeBatch, DecodeScoring
from engine.models import CausalLM


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then every 8 up to max_batch (and
    max_batch itself), so padding wastes at most 7 rows past 8."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted({*sizes, max_batch})


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `rows` (ValueError past the largest)."""
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"{rows} decode rows, more than the largest bucket {buckets[-1]}")


@dataclass
class StaticInputs:
    """The buffers a captured decode forward reads, sized for the largest bucket."""

    input_ids: torch.Tensor  # [M]
    positions: torch.Tensor  # [M]
    slot_mapping: torch.Tensor  # [M]
    block_tables: torch.Tensor  # [M, max_blocks]
    num_keys: torch.Tensor  # [M]
    # Per-row scoring columns (the Triton decode kernel's DecodeScoreArgs).
    active: torch.Tensor  # [M] bool
    tau: torch.Tensor  # [M] float32
    seed: torch.Tensor  # [M] int64
    use_noise: torch.Tensor  # [M] bool

    @classmethod
    def allocate(cls, rows: int, max_blocks: int, device: torch.device) -> "StaticInputs":
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            zeros(rows), zeros(rows), zeros(rows), zeros(rows, max_blocks), zeros(rows),
            zeros(rows, dtype=torch.bool), zeros(rows, dtype=torch.float32), zeros(rows),
            zeros(rows, dtype=torch.bool),
        )  # fmt: skip

    def context(self, rows: int, scored: bool) -> AttentionContext:
        """An AttentionContext over the first `rows` rows of the buffers."""
        r = slice(0, rows)
        empty = self.num_keys.new_empty(0)
        batch = DecodeBatch(
            block_tables=self.block_tables[r],
            key_valid=empty.bool(),
            num_keys=self.num_keys[r],
            query_positions=self.positions[r],
        )
        ctx = AttentionContext(self.slot_mapping[r], self.positions[r], decode=batch)
        if scored:
            batch.scoring = DecodeScoring(
                rows=torch.arange(rows, device=empty.device), all_rows=True,
                seed=self.seed[r], gumbel=self.use_noise[r], tau=self.tau[r],
                query_positions=self.positions[r], num_keys=self.num_keys[r],
                key_valid=empty.bool(), block_tables=self.block_tables[r], key_slots=empty,
            )  # fmt: skip
            # The columns the Triton backend would otherwise build in the step.
            ctx.masks["triton_decode_scores"] = {
                "active": self.active[r], "tau": self.tau[r], "seed": self.seed[r],
                "use_noise": self.use_noise[r], "query_pos": self.positions[r],
            }  # fmt: skip
        return ctx


class DecodeGraphRunner:
    """Runs decode-only steps from static buffers, replaying a CUDA graph per
    (bucket, scored) on CUDA and running the model on the buffers elsewhere."""

    def __init__(
        self,
        model: CausalLM,
        block_size: int,
        max_batch: int,
        max_blocks: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = decode_buckets(max_batch)
        self.inputs = StaticInputs.allocate(self.buckets[-1], max_blocks, device)
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.capture = device.type == "cuda"
        # (bucket, scored) -> (graph, its hidden-state output, the context it read)
        self._graphs: dict[tuple[int, bool], tuple] = {}
        self._pool = None

    def applies(self, ctx: AttentionContext) -> bool:
        d = ctx.decode
        return (
            not ctx.prefills
            and d is not None
            and d.num_rows <= self.buckets[-1]
            and d.block_tables.shape[1] <= self.inputs.block_tables.shape[1]
        )

    def run(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The decode step's hidden states [B, hidden], B = its rows."""
        rows = ctx.decode.num_rows
        bucket = bucket_for(rows, self.buckets)
        key = (bucket, ctx.decode.scoring is not None)
        if self.capture and key not in self._graphs:
            self._capture(*key)
        self._fill(bucket, input_ids, ctx)
        if not self.capture:
            inputs = self.inputs
            step_ctx = inputs.context(bucket, key[1])
            return self.model(inputs.input_ids[:bucket], inputs.positions[:bucket], step_ctx)[:rows]
        graph, hidden, _ = self._graphs[key]
        graph.replay()
        return hidden[:rows]

    def _fill(
        self, bucket: int, input_ids: torch.Tensor | None, ctx: AttentionContext | None
    ) -> None:
        """Copy the step's rows in; pad the rest of the bucket to the scratch
        block, one key each, adding no scores. No step: all padding."""
        s = self.inputs
        s.input_ids[:bucket].zero_()
        s.positions[:bucket].zero_()
        s.slot_mapping[:bucket].fill_(self.scratch_slot)
        s.block_tables[:bucket].fill_(self.scratch_block)
        s.num_keys[:bucket].fill_(1)
        s.active[:bucket].zero_()
        s.tau[:bucket].fill_(1.0)
        if ctx is None:
            return
        d = ctx.decode
        rows, width = d.num_rows, d.block_tables.shape[1]
        s.input_ids[:rows].copy_(input_ids)
        s.positions[:rows].copy_(ctx.positions)
        s.slot_mapping[:rows].copy_(ctx.slot_mapping)
        s.block_tables[:rows, :width].copy_(d.block_tables)
        s.num_keys[:rows].copy_(d.num_keys)
        if d.scoring is not None:
            scored = d.scoring.rows
            s.active[scored] = True
            s.tau[scored] = d.scoring.tau
            s.seed[scored] = d.scoring.seed
            s.use_noise[scored] = d.scoring.gumbel

    def _capture(self, bucket: int, scored: bool) -> None:
        """Capture a bucket over padding only: the warm-up run (which compiles
        the kernels) and the capture write nothing but the scratch block."""
        self._fill(bucket, None, None)
        s = self.inputs
        ctx = s.context(bucket, scored)
        ids, positions = s.input_ids[:bucket], s.positions[:bucket]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(ids, positions, ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self.model(ids, positions, ctx)
        self._pool = graph.pool()
        self._graphs[(bucket, scored)] = (graph, hidden, ctx)
