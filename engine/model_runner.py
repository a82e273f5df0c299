"""Batch to tensors, one forward pass, logits out; owns the KV cache tensors."""

from collections.abc import Callable

import torch

from engine.context import AttentionContext, PrefillSpan
from engine.models import CausalLM
from scheduler import ScheduledChunk


def kv_bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    elem = torch.empty(0, dtype=dtype).element_size()
    per_token = sum(2 * a.num_kv_heads * a.head_dim for a in model.attention_layers())
    return per_token * block_size * elem


class ModelRunner:
    """Runs the model over a scheduled batch, reading and writing the paged cache."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        for attn in model.attention_layers():
            # [num_blocks, block_size, Hkv, D] per layer, K and V
            shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledChunk], block_table: Callable[[str], list[int]]
    ) -> torch.Tensor:
        """Run the chunks; returns float32 logits [N, vocab] for the chunks that
        sample, in their order in `chunks`."""
        input_ids, positions, ctx, sample_rows = self._prepare(chunks, block_table)
        hidden = self.model(input_ids, positions, ctx)
        return self.model.compute_logits(hidden[sample_rows])

    def _prepare(
        self, chunks: list[ScheduledChunk], block_table: Callable[[str], list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, torch.Tensor]:
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        decode_positions: list[int] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            row = len(input_ids)
            input_ids += chunk.request.token_ids(chunk.start, chunk.end)
            positions += range(chunk.start, chunk.end)
            slots = self._physical_slots(
                block_table(chunk.request_id), chunk.slot_start + chunk.num_tokens
            )
            slot_mapping.append(slots[chunk.slot_start :])
            if chunk.num_tokens == 1 and chunk.slot_start > 0:
                decode_rows.append(row)
                decode_slots.append(slots)
                decode_positions.append(chunk.start)
            else:
                prefills.append(self._prefill_span(chunk, row, slots))
            if chunk.samples:
                sample_rows.append(row + chunk.num_tokens - 1)
        ctx = AttentionContext(slot_mapping=torch.cat(slot_mapping), prefills=prefills)
        if decode_rows:
            self._add_decodes(ctx, decode_rows, decode_slots, decode_positions)
        return (
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            ctx,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )

    def _physical_slots(self, blocks: list[int], num_slots: int) -> torch.Tensor:
        """Physical slot index of each of the first `num_slots` logical slots."""
        bs = self.block_size
        table = torch.tensor(blocks, dtype=torch.long, device=self.device)
        offsets = torch.arange(bs, dtype=torch.long, device=self.device)
        return (table.unsqueeze(1) * bs + offsets).flatten()[:num_slots]

    def _prefill_span(self, chunk: ScheduledChunk, row: int, slots: torch.Tensor) -> PrefillSpan:
        dev = self.device
        n_keys = chunk.slot_start + chunk.num_tokens
        # NOTE: without eviction a slot holds the token at the same position.
        return PrefillSpan(
            token_start=row,
            num_tokens=chunk.num_tokens,
            key_slots=None if chunk.slot_start == 0 else slots,
            key_positions=torch.arange(n_keys, device=dev),
            query_positions=torch.arange(chunk.start, chunk.end, device=dev),
        )

    def _add_decodes(
        self,
        ctx: AttentionContext,
        rows: list[int],
        slots: list[torch.Tensor],
        positions: list[int],
    ) -> None:
        dev = self.device
        lengths = torch.tensor([len(s) for s in slots], device=dev)
        width = int(lengths.max())
        key_slots = torch.zeros(len(slots), width, dtype=torch.long, device=dev)
        for i, s in enumerate(slots):
            key_slots[i, : len(s)] = s
        key_index = torch.arange(width, device=dev)
        ctx.decode_rows = torch.tensor(rows, dtype=torch.long, device=dev)
        ctx.decode_key_slots = key_slots
        ctx.decode_key_valid = key_index.unsqueeze(0) < lengths.unsqueeze(1)
        ctx.decode_key_positions = key_index.unsqueeze(0).expand(len(slots), width)
        ctx.decode_query_positions = torch.tensor(positions, dtype=torch.long, device=dev)
