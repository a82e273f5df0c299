"""A fixed pool of KV blocks: free list and reference counts."""

from collections import deque


class BlockPool:
    """Hands out block ids from a free list and takes them back.

    Blocks carry reference counts so that a later prefix cache can share a
    block between sequences; a block returns to the free list when its count
    drops to zero.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one owner."""
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free blocks (ref count 1 each), or None if there are fewer."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, block: int) -> None:
        """Add an owner to an allocated block."""
        if self._ref_counts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one owner from each block; blocks with no owner left go back."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]
