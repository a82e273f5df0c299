"""Per-step attention metadata: where each token's K/V goes and what it reads.

The model runner builds one `AttentionContext` per forward pass from the
scheduler's chunks and the block tables; attention layers only read it.
Models never see block tables.
"""

from dataclasses import dataclass, field

import torch

from engine.attention.scoring import ScoreSpec


@dataclass
class PrefillSpan:
    """One prefill chunk inside the flattened batch."""

    token_start: int  # first row of the chunk in the batch's [T, ...] tensors
    num_tokens: int
    slot_start: int  # slots cached before this chunk
    # Blocks holding everything the chunk attends to (cached slots, then its
    # own), [num_blocks]. None when the chunk is a whole fresh prompt: it then
    # attends only to its own K/V, which are at hand without reading the cache.
    block_table: torch.Tensor | None
    query_positions: torch.Tensor  # [num_tokens]
    # Physical slots of all keys [slot_start + num_tokens]; set when scoring.
    key_slots: torch.Tensor | None = None
    score: ScoreSpec | None = None
    # The blocks holding slots [0, num_keys), host ints: what a varlen kernel
    # that reads every chunk through the cache needs (fresh prompts included).
    blocks: list[int] = field(default_factory=list)

    @property
    def num_keys(self) -> int:
        return self.slot_start + self.num_tokens


@dataclass
class DecodeScoring:
    """The decode rows that need scores, with their per-row values gathered
    once a step (every layer reads them)."""

    rows: torch.Tensor  # [b] indices into the decode batch
    all_rows: bool  # rows is the whole batch in order: no gather needed
    seed: torch.Tensor  # [b] int64
    gumbel: torch.Tensor  # [b] bool
    tau: torch.Tensor  # [b] float32: this step's temperature
    query_positions: torch.Tensor  # [b]
    num_keys: torch.Tensor  # [b] int64
    key_valid: torch.Tensor  # [b, L] bool
    block_tables: torch.Tensor  # [b, max_blocks]
    key_slots: torch.Tensor  # [b * L]: physical slot of each key, flattened


@dataclass
class DecodeBatch:
    """Sequences that add one token each, batched and padded to the longest."""

    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    key_valid: torch.Tensor  # [B, max_blocks * block_size] bool
    num_keys: torch.Tensor  # [B] int64: valid keys (cached slots + the new one)
    query_positions: torch.Tensor  # [B]
    scoring: DecodeScoring | None = None

    @property
    def num_rows(self) -> int:
        """B: the decodes are the batch's first B rows."""
        return self.num_keys.shape[0]


@dataclass
class AttentionContext:
    # [T] physical slot (block * block_size + offset) each new token's K/V goes to
    slot_mapping: torch.Tensor
    positions: torch.Tensor  # [T] each new token's position
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode: DecodeBatch | None = None
    # Per-step values the first layer builds and the rest reuse: position-free
    # masks, and kernel plans over the step's page tables.
    masks: dict = field(default_factory=dict)
