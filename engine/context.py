"""Per-step attention metadata: where each token's K/V goes and what it reads.

The model runner builds one `AttentionContext` per forward pass from the
scheduler's chunks and the block tables; attention layers only read it.
Models never see block tables.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSpan:
    """One prefill chunk inside the flattened batch."""

    token_start: int  # first row of the chunk in the batch's [T, ...] tensors
    num_tokens: int
    # Blocks holding everything the chunk attends to (cached slots, then its
    # own), [num_blocks]. None when the chunk is a whole fresh prompt: it then
    # attends only to its own K/V, which are at hand without reading the cache.
    block_table: torch.Tensor | None
    num_keys: int  # slots attended to: cached + this chunk's
    key_positions: torch.Tensor  # [num_keys] original positions
    query_positions: torch.Tensor  # [num_tokens]


@dataclass
class DecodeBatch:
    """Sequences that add one token each, batched and padded to the longest."""

    rows: torch.Tensor  # [B] rows in the batch
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    key_valid: torch.Tensor  # [B, max_blocks * block_size] bool
    key_positions: torch.Tensor  # [B, max_blocks * block_size]
    query_positions: torch.Tensor  # [B]


@dataclass
class AttentionContext:
    # [T] physical slot (block * block_size + offset) each new token's K/V goes to
    slot_mapping: torch.Tensor
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode: DecodeBatch | None = None
    # Masks and biases built by the first layer that needs them and reused by
    # the rest: they depend on the step, not the layer.
    masks: dict = field(default_factory=dict)
