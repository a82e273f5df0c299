"""Block tables and slot counts per sequence, on top of the block pool.

NOTE: a sequence has two lengths. Its logical length (the position of its next
token) belongs to the scheduler's request; the slot count kept here is how many
cached tokens it holds. Without eviction they are equal; with eviction the slot
count stays at the budget while the logical length grows. Everything here is in
slots.
"""

from dataclasses import dataclass, field

from kv_manager.pool import BlockPool


def blocks_for(num_slots: int, block_size: int) -> int:
    """Blocks needed to hold `num_slots` slots."""
    return -(-num_slots // block_size)


@dataclass
class SequenceKV:
    """The KV memory one sequence holds."""

    block_table: list[int] = field(default_factory=list)
    num_slots: int = 0


class KVCacheManager:
    """Allocates, grows, shrinks and frees the KV memory of sequences.

    Its one caller is the scheduler, which decides what runs, is preempted
    or is cut back by eviction; this class only keeps the books.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._seqs: dict[str, SequenceKV] = {}

    # -- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def num_slots(self, seq_id: str) -> int:
        """Cached slots the sequence holds (0 if it holds none)."""
        seq = self._seqs.get(seq_id)
        return seq.num_slots if seq else 0

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's blocks, in slot order."""
        seq = self._seqs.get(seq_id)
        return seq.block_table if seq else []

    def num_blocks_held(self) -> int:
        """Blocks held by all sequences (equals the pool's used count)."""
        return sum(len(s.block_table) for s in self._seqs.values())

    # -- allocation ----------------------------------------------------------

    def blocks_needed(self, seq_id: str, num_new_slots: int) -> int:
        """Extra blocks the sequence needs to append `num_new_slots` slots."""
        seq = self._seqs.get(seq_id)
        held = len(seq.block_table) if seq else 0
        have = seq.num_slots if seq else 0
        return max(0, blocks_for(have + num_new_slots, self.block_size) - held)

    def allocate_slots(self, seq_id: str, num_new_slots: int) -> bool:
        """Append `num_new_slots` slots to the sequence, taking blocks as needed.

        Returns False, changing nothing, when the pool cannot supply them.
        """
        new_blocks = self.pool.allocate(self.blocks_needed(seq_id, num_new_slots))
        if new_blocks is None:
            return False
        seq = self._seqs.setdefault(seq_id, SequenceKV())
        seq.block_table.extend(new_blocks)
        seq.num_slots += num_new_slots
        return True

    def shrink(self, seq_id: str, new_num_slots: int) -> int:
        """Cut the sequence to `new_num_slots` slots; returns the blocks freed.

        The caller has already moved the contents it keeps into the first
        `new_num_slots` slots (eviction fills victims from the tail).
        """
        seq = self._seqs[seq_id]
        if not 0 <= new_num_slots <= seq.num_slots:
            raise ValueError(f"cannot shrink {seq.num_slots} slots to {new_num_slots}")
        keep = blocks_for(new_num_slots, self.block_size)
        freed = seq.block_table[keep:]
        del seq.block_table[keep:]
        seq.num_slots = new_num_slots
        self.pool.free(freed)
        return len(freed)

    def free(self, seq_id: str) -> None:
        """Return all of the sequence's blocks to the pool (no-op if none)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.free(seq.block_table)
