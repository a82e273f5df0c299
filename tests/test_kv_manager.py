"""BlockPool and KVCacheManager: block ids, ownership and slot counts."""

import random

import pytest

from kv_manager import BlockPool, KVCacheManager
from kv_manager.manager import blocks_for

# -- BlockPool ---------------------------------------------------------------


def test_pool_starts_all_free():
    pool = BlockPool(5)
    assert (pool.num_blocks, pool.num_free, pool.num_used) == (5, 5, 0)
    assert [pool.is_allocated(b) for b in range(5)] == [False] * 5


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_pool_rejects_non_positive_size(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks)


def test_pool_allocate_hands_out_distinct_blocks_it_marks_allocated():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(blocks) == 3
    assert len(set(blocks)) == 3
    assert all(0 <= b < 4 for b in blocks)
    assert [pool.is_allocated(b) for b in blocks] == [True, True, True]
    assert (pool.num_free, pool.num_used) == (1, 3)


def test_pool_allocate_zero_blocks_is_empty_and_negative_raises():
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free == 2
    with pytest.raises(ValueError):
        pool.allocate(-1)


def test_pool_allocate_when_short_returns_none_and_changes_nothing():
    pool = BlockPool(4)
    held = pool.allocate(3)
    (left,) = set(range(4)) - set(held)
    assert pool.allocate(2) is None
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert [pool.is_allocated(b) for b in held] == [True, True, True]
    assert not pool.is_allocated(left)
    # The block that was free is still the one handed out next.
    assert pool.allocate(1) == [left]
    assert pool.num_free == 0
    assert pool.allocate(1) is None


def test_pool_free_returns_blocks_for_reuse():
    pool = BlockPool(3)
    first = pool.allocate(3)
    pool.free(first[:2])
    assert (pool.num_free, pool.num_used) == (2, 1)
    assert [pool.is_allocated(b) for b in first] == [False, False, True]
    again = pool.allocate(2)
    assert sorted(again) == sorted(first[:2])


def test_pool_double_free_raises():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([block])
    # The failed free did not put the block on the free list a second time.
    assert pool.num_free == 2
    assert sorted(pool.allocate(2)) == [0, 1]


def test_pool_free_of_never_allocated_block_raises():
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.free([1])
    assert pool.num_free == 2


# -- KVCacheManager ----------------------------------------------------------


@pytest.mark.parametrize(
    "num_slots, block_size, expected",
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (7, 1, 7)],
)
def test_blocks_for(num_slots, block_size, expected):
    assert blocks_for(num_slots, block_size) == expected


def test_manager_rejects_non_positive_block_size():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)


@pytest.mark.parametrize(
    "held_slots, new_slots, expected",
    [
        (0, 1, 1),  # first slot takes a block
        (0, 4, 1),  # exactly one block
        (0, 5, 2),  # one past the boundary
        (3, 1, 0),  # fills the partial block
        (4, 1, 1),  # block full: the next slot needs a new one
        (5, 3, 0),  # 8 slots fit in the 2 blocks held
        (5, 4, 1),  # 9 slots need a third
        (5, 12, 3),  # 17 slots need 5 blocks, 2 held
        (6, 0, 0),
    ],
)
def test_blocks_needed_counts_only_blocks_past_those_held(held_slots, new_slots, expected):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    if held_slots:
        assert kv.allocate_slots("a", held_slots)
    assert kv.blocks_needed("a", new_slots) == expected
    assert kv.allocate_slots("a", new_slots)
    assert len(kv.block_table("a")) == blocks_for(held_slots, 4) + expected
    assert kv.num_slots("a") == held_slots + new_slots


def test_allocate_slots_grows_one_slot_at_a_time_across_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    tables = []
    for _ in range(9):
        assert kv.allocate_slots("a", 1)
        tables.append(len(kv.block_table("a")))
    assert tables == [1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert kv.num_slots("a") == 9
    assert kv.num_used_blocks == 3
    # The table only ever grows at its end.
    first = kv.block_table("a")[:2]
    assert kv.allocate_slots("a", 4)
    assert kv.block_table("a")[:2] == first


def test_unknown_sequence_holds_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert not kv.has("x")
    assert kv.num_slots("x") == 0
    assert kv.block_table("x") == []
    kv.free("x")  # no-op
    assert kv.num_free_blocks == 4


def test_allocate_slots_when_short_returns_false_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots("a", 6)  # 2 blocks
    table = list(kv.block_table("a"))
    assert kv.blocks_needed("a", 7) > kv.num_free_blocks  # 13 slots: 4 blocks
    assert not kv.allocate_slots("a", 7)
    assert kv.num_slots("a") == 6
    assert kv.block_table("a") == table
    assert kv.num_free_blocks == 1

    assert kv.blocks_needed("b", 5) > kv.num_free_blocks
    assert not kv.allocate_slots("b", 5)
    assert not kv.has("b")
    assert kv.num_free_blocks == 1

    # What does fit still does.
    assert kv.blocks_needed("a", 6) <= kv.num_free_blocks
    assert kv.allocate_slots("a", 6)  # 12 slots: 3 blocks
    assert kv.num_free_blocks == 0
    assert kv.blocks_needed("a", 0) == 0
    assert kv.blocks_needed("a", 1) > kv.num_free_blocks


def test_sequences_hold_disjoint_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=2)
    for seq, n in [("a", 5), ("b", 4), ("c", 1), ("a", 2)]:
        assert kv.allocate_slots(seq, n)
    tables = [kv.block_table(s) for s in "abc"]
    assert [len(t) for t in tables] == [4, 2, 1]
    all_blocks = [b for t in tables for b in t]
    assert len(set(all_blocks)) == len(all_blocks) == 7
    assert kv.num_blocks_held() == kv.num_used_blocks == 7


def test_shrink_frees_the_blocks_past_the_new_slot_count():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 10)  # 3 blocks
    table = list(kv.block_table("a"))
    assert kv.shrink("a", 5) == 1
    assert kv.block_table("a") == table[:2]
    assert kv.num_slots("a") == 5
    assert (kv.num_free_blocks, kv.num_used_blocks) == (2, 2)
    assert not kv.pool.is_allocated(table[2])

    # Cutting inside the last block held frees nothing.
    assert kv.shrink("a", 5) == 0
    assert kv.shrink("a", 4) == 1
    assert kv.block_table("a") == table[:1]
    assert kv.shrink("a", 1) == 0
    assert kv.shrink("a", 0) == 1
    assert kv.block_table("a") == []
    assert kv.num_slots("a") == 0
    assert kv.num_free_blocks == 4


def test_shrink_by_several_blocks_at_once():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    assert kv.allocate_slots("a", 15)  # 8 blocks
    assert kv.shrink("a", 3) == 6
    assert kv.num_free_blocks == 6
    assert kv.num_blocks_held() == kv.num_used_blocks == 2


def test_after_shrink_the_partial_block_is_filled_before_a_new_one_is_taken():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 12)
    kv.shrink("a", 5)
    assert kv.blocks_needed("a", 3) == 0
    assert kv.allocate_slots("a", 3)
    assert len(kv.block_table("a")) == 2
    assert kv.blocks_needed("a", 1) == 1


@pytest.mark.parametrize("new_num_slots", [-1, 7])
def test_shrink_out_of_range_raises_and_changes_nothing(new_num_slots):
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 6)
    with pytest.raises(ValueError):
        kv.shrink("a", new_num_slots)
    assert kv.num_slots("a") == 6
    assert len(kv.block_table("a")) == 2


def test_free_returns_all_blocks_and_forgets_the_sequence():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.allocate_slots("a", 9)
    assert kv.allocate_slots("b", 4)
    kv.free("a")
    assert not kv.has("a")
    assert kv.num_slots("a") == 0
    assert (kv.num_free_blocks, kv.num_used_blocks) == (5, 1)
    assert kv.num_blocks_held() == 1
    kv.free("a")  # second free is a no-op, not a double free
    assert kv.num_free_blocks == 5
    # A freed id starts again from nothing.
    assert kv.allocate_slots("a", 1)
    assert kv.num_slots("a") == 1
    assert len(kv.block_table("a")) == 1


def test_blocks_held_always_equal_the_pool_used_count():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=12, block_size=3)
    seqs = [f"s{i}" for i in range(5)]
    for _ in range(500):
        seq = rng.choice(seqs)
        op = rng.random()
        if op < 0.5:
            n = rng.randint(0, 7)
            expected = kv.blocks_needed(seq, n) <= kv.num_free_blocks
            assert kv.allocate_slots(seq, n) == expected
        elif op < 0.8 and kv.has(seq):
            kv.shrink(seq, rng.randint(0, kv.num_slots(seq)))
        else:
            kv.free(seq)
        assert kv.num_blocks_held() == kv.num_used_blocks
        assert kv.num_free_blocks + kv.num_used_blocks == 12
        for s in seqs:
            assert len(kv.block_table(s)) == blocks_for(kv.num_slots(s), 3)
    for s in seqs:
        kv.free(s)
    assert kv.num_free_blocks == 12
