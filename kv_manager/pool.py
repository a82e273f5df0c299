"""A fixed pool of KV blocks: a free list and who holds what."""

from collections import deque


class BlockPool:
    """Hands out block ids from a free list and takes them back.

    Each block has at most one owner: a sequence that evicts rewrites its
    blocks in place, so they are never shared (no prefix cache for evicting
    sequences: docs/architecture.md).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._allocated = [False] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by a sequence."""
        return self.num_blocks - len(self._free)

    def is_allocated(self, block: int) -> bool:
        return self._allocated[block]

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` free blocks, or None (changing nothing) if there are fewer."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._allocated[b] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list; freeing a free block is an error."""
        for b in blocks:
            if not self._allocated[b]:
                raise ValueError(f"block {b} freed twice")
            self._allocated[b] = False
            self._free.append(b)
