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
    # Physical slots of everything the chunk attends to (cached slots then its
    # own), in slot order: [slot_start + num_tokens]. None when the chunk is a
    # whole fresh prompt (slot_start == 0): it attends only to its own K/V,
    # which are at hand without reading the cache.
    key_slots: torch.Tensor | None
    key_positions: torch.Tensor  # [slot_start + num_tokens] original positions
    query_positions: torch.Tensor  # [num_tokens]


@dataclass
class AttentionContext:
    # [T] physical slot (block * block_size + offset) each new token's K/V goes to
    slot_mapping: torch.Tensor
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Decodes (one new token each), batched: B rows, padded to L keys.
    decode_rows: torch.Tensor | None = None  # [B] rows in the batch
    decode_key_slots: torch.Tensor | None = None  # [B, L] physical slots, 0 in padding
    decode_key_valid: torch.Tensor | None = None  # [B, L] bool
    decode_key_positions: torch.Tensor | None = None  # [B, L]
    decode_query_positions: torch.Tensor | None = None  # [B]
