"""What an attention backend is given about its layer: the head geometry and
positional terms (fixed when the model is built) and the layer's views of the
paged cache (bound when the cache is made)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    alibi_slopes: torch.Tensor | None  # [Hq] float32, or None
    sliding_window: int | None

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def needs_key_positions(self) -> bool:
        """ALiBi and sliding windows depend on each key's original position,
        which after eviction is no longer its slot."""
        return self.alibi_slopes is not None or self.sliding_window is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.num_kv_heads, self.head_dim


@dataclass
class LayerCache:
    """One layer's views of the paged cache, [num_blocks, block_size, Hkv(, D)]."""

    layer_idx: int
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor  # float32 accumulated eviction score per slot and head
    positions: torch.Tensor  # int32 original position per slot and head

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    def read(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block ids -> K, V [B, nb * block_size, Hkv, D], by whole blocks."""
        # index_select copies whole rows; plain advanced indexing is several
        # times slower on CPU for the same gather.
        flat = block_tables.flatten()
        shape = (block_tables.shape[0], -1, *self.k.shape[2:])
        return self.k.index_select(0, flat).view(shape), self.v.index_select(0, flat).view(shape)

    def read_positions(self, block_tables: torch.Tensor) -> torch.Tensor:
        """[B, nb] block ids -> key positions [B, nb * block_size, Hkv] (int64)."""
        positions = self.positions.index_select(0, block_tables.flatten())
        return positions.view(block_tables.shape[0], -1, self.num_kv_heads).long()

    def write(
        self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """New tokens' K, V [T, Hkv, D] and positions [T] into physical `slots` [T]."""
        H, D = self.k.shape[2], self.k.shape[3]
        self.k.view(-1, H, D)[slots] = k
        self.v.view(-1, H, D)[slots] = v
        self.positions.view(-1, H)[slots] = positions.to(torch.int32).unsqueeze(1)
        # A slot may be reused from a freed block: its score starts afresh.
        self.scores.view(-1, H)[slots] = 0.0

    def add_scores(self, slots: torch.Tensor, contrib: torch.Tensor) -> None:
        """scores[slot, head] += contrib[..., slot, head] (slots [N], contrib [..., Hkv])."""
        H = self.num_kv_heads
        self.scores.view(-1, H).index_put_((slots,), contrib.reshape(-1, H), accumulate=True)
