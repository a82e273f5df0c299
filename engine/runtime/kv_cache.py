"""The paged KV cache tensors, and the slot moves eviction needs.

Per layer and slot the cache holds K and V, plus the token's original
position (int32) and its accumulated eviction score (float32); all four move
together when eviction compacts a sequence.
"""

import torch

from engine.attention.geometry import LayerCache
from engine.host.huge_pages import empty_with_huge_pages
from engine.models import CausalLM


def slot_index(block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Physical slot (block * block_size + offset) of every slot of the blocks
    in `block_tables` [..., nb] -> [..., nb * block_size], in slot order.
    The one place the engine turns block tables into slots."""
    offsets = torch.arange(block_size, dtype=torch.long, device=block_tables.device)
    return (block_tables.unsqueeze(-1) * block_size + offsets).flatten(-2)


def slot_of(blocks: list[int], slot: int, block_size: int) -> int:
    """The physical slot of a sequence's logical `slot` (host ints, no tensor)."""
    return blocks[slot // block_size] * block_size + slot % block_size


class PagedKVCache:
    """All layers in one tensor each: [L, num_blocks, block_size, Hkv, (D)]."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        layers = model.attention_layers()
        heads = {(a.num_kv_heads, a.head_dim) for a in layers}
        if len(heads) != 1:
            raise ValueError(f"layers differ in KV shape {sorted(heads)}; not supported")
        ((num_kv_heads, head_dim),) = heads
        self.block_size = block_size
        shape = (len(layers), num_blocks, block_size, num_kv_heads)
        # K and V are read block by block at random: 2 MB pages where the OS
        # gives them (advised before the zeroing touches the memory).
        self.k = empty_with_huge_pages(*shape, head_dim, dtype=dtype, device=device).zero_()
        self.v = empty_with_huge_pages(*shape, head_dim, dtype=dtype, device=device).zero_()
        self.scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.positions = torch.zeros(shape, dtype=torch.int32, device=device)
        for i, attn in enumerate(layers):
            attn.bind_cache(LayerCache(i, self.k[i], self.v[i], self.scores[i], self.positions[i]))

    @staticmethod
    def bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers: K, V, score and position."""
        elem = torch.empty(0, dtype=dtype).element_size()
        per_token = sum(
            a.num_kv_heads * (2 * a.head_dim * elem + 4 + 4) for a in model.attention_layers()
        )
        return per_token * block_size

    def physical_slots(self, blocks: list[int], num_slots: int) -> torch.Tensor:
        """Physical index (block * block_size + offset) of logical slots [0, num_slots)."""
        table = torch.tensor(blocks, dtype=torch.long, device=self.k.device)
        return slot_index(table, self.block_size)[:num_slots]

    def read_slot_state(
        self, blocks: list[int], num_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's scores and positions, each [L, Hkv, num_slots]."""
        slots = self.physical_slots(blocks, num_slots)
        L, _, _, H = self.scores.shape
        scores = self.scores.view(L, -1, H)[:, slots].transpose(1, 2)
        positions = self.positions.view(L, -1, H)[:, slots].transpose(1, 2)
        return scores, positions

    def compact(self, blocks: list[int], victims: torch.Tensor, num_slots: int) -> None:
        """Drop `victims` [L, Hkv, e] from a sequence of `num_slots` slots.

        Each (layer, head) fills its victim slots below the new count from its
        surviving slots past it, so slots [0, num_slots - e) end up holding
        exactly the survivors; the caller then frees the tail blocks.
        """
        L, H, e = victims.shape
        if e == 0:
            return
        new_count = num_slots - e
        keep = torch.ones(L, H, num_slots, dtype=torch.bool, device=victims.device)
        keep.scatter_(2, victims, False)
        # NOTE: per (layer, head) the holes below new_count and the survivors
        # at or past it are equally many, and nonzero() lists both row by row,
        # so the i-th hole pairs with the i-th survivor of the same row.
        holes = (~keep[:, :, :new_count]).nonzero()
        movers = keep[:, :, new_count:].nonzero()
        if holes.numel() == 0:
            return
        slots = self.physical_slots(blocks, num_slots)
        layer, head = holes[:, 0], holes[:, 1]
        dst = slots[holes[:, 2]]
        src = slots[movers[:, 2] + new_count]
        for t in (self.k, self.v, self.scores, self.positions):
            flat = t.view(L, -1, H, *t.shape[4:])
            flat[layer, dst, head] = flat[layer, src, head]

    def padded_slots(self, tables: list[list[int]], counts: list[int]) -> torch.Tensor:
        """Physical slots of several sequences, [B, max(counts)], padded with slot 0.
        A few ops for the whole batch, not a few per sequence: on a GPU each
        would be a launch."""
        dev = self.k.device
        blocks = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (blocks - len(t)) for t in tables], device=dev)
        width = max(counts)
        slots = slot_index(padded, self.block_size)[:, :width]
        past_end = torch.arange(width, device=dev) >= torch.tensor(counts, device=dev).view(-1, 1)
        return slots.masked_fill(past_end, 0)

    def read_slot_state_batch(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and positions at physical `slots` [B, S], each [B, L, Hkv, S]."""
        L, _, _, H = self.scores.shape
        scores = self.scores.view(L, -1, H)[:, slots].permute(1, 0, 3, 2)
        positions = self.positions.view(L, -1, H)[:, slots].permute(1, 0, 3, 2)
        return scores, positions

    def drop_one_each(self, slots: torch.Tensor, victims: torch.Tensor, last: torch.Tensor) -> None:
        """Each (sequence, layer, head) drops one slot: its last slot's contents
        fill the victim's (nothing moves where the victim is the last slot).

        slots: [B, S] physical slots; victims: [B, L, Hkv] slot indices;
        last: [B] index of each sequence's last slot.
        """
        seq, layer, head = (victims != last.view(-1, 1, 1)).nonzero(as_tuple=True)
        if seq.numel() == 0:
            return
        dst = slots[seq, victims[seq, layer, head]]
        src = slots[seq, last[seq]]
        L, _, _, H = self.scores.shape
        for t in (self.k, self.v, self.scores, self.positions):
            flat = t.view(L, -1, H, *t.shape[4:])
            flat[layer, dst, head] = flat[layer, src, head]
