"""Batch to tensors, one forward pass, logits out; owns the KV cache tensors."""

from collections.abc import Callable

import torch

from engine.context import AttentionContext, DecodeBatch, PrefillSpan
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
        slot_mapping: list[int] = []
        prefills: list[PrefillSpan] = []
        decodes: list[tuple[int, ScheduledChunk, list[int]]] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            row = len(input_ids)
            blocks = block_table(chunk.request_id)
            input_ids += chunk.request.token_ids(chunk.start, chunk.end)
            positions += range(chunk.start, chunk.end)
            slot_mapping += self._slots(
                blocks, chunk.slot_start, chunk.slot_start + chunk.num_tokens
            )
            if chunk.num_tokens == 1 and chunk.slot_start > 0:
                decodes.append((row, chunk, blocks))
            else:
                prefills.append(self._prefill_span(chunk, row, blocks))
            if chunk.samples:
                sample_rows.append(row + chunk.num_tokens - 1)
        ctx = AttentionContext(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            prefills=prefills,
            decode=self._decode_batch(decodes) if decodes else None,
        )
        return (
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            ctx,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )

    def _slots(self, blocks: list[int], start: int, end: int) -> list[int]:
        """Physical slot index of logical slots [start, end)."""
        bs = self.block_size
        return [blocks[s // bs] * bs + s % bs for s in range(start, end)]

    def _prefill_span(self, chunk: ScheduledChunk, row: int, blocks: list[int]) -> PrefillSpan:
        dev = self.device
        num_keys = chunk.slot_start + chunk.num_tokens
        table = None
        if chunk.slot_start > 0:
            used = blocks[: -(-num_keys // self.block_size)]
            table = torch.tensor(used, dtype=torch.long, device=dev)
        # NOTE: without eviction a slot holds the token at the same position.
        return PrefillSpan(
            token_start=row,
            num_tokens=chunk.num_tokens,
            block_table=table,
            num_keys=num_keys,
            key_positions=torch.arange(num_keys, device=dev),
            query_positions=torch.arange(chunk.start, chunk.end, device=dev),
        )

    def _decode_batch(self, decodes: list[tuple[int, ScheduledChunk, list[int]]]) -> DecodeBatch:
        dev = self.device
        width = max(len(blocks) for _, _, blocks in decodes)
        tables = [blocks + [0] * (width - len(blocks)) for _, _, blocks in decodes]
        num_keys = torch.tensor([c.slot_start + 1 for _, c, _ in decodes], device=dev)
        key_index = torch.arange(width * self.block_size, device=dev)
        return DecodeBatch(
            rows=torch.tensor([row for row, _, _ in decodes], dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            key_valid=key_index.unsqueeze(0) < num_keys.unsqueeze(1),
            key_positions=key_index.unsqueeze(0).expand(len(decodes), -1),
            query_positions=torch.tensor([c.start for _, c, _ in decodes], device=dev),
        )
