"""The approximate prefix tree: chained block hashes, bounded like a cache."""

from gateway.prefix_tree import PrefixTree, block_keys


def test_shared_prefix_matches_block_by_block() -> None:
    tree = PrefixTree()
    tree.insert(block_keys("a" * 64 + "b" * 64 + "c" * 64, 64))
    assert tree.match(block_keys("a" * 64 + "b" * 64 + "z" * 64, 64)) == 2
    assert tree.match(block_keys("z" * 64 + "b" * 64, 64)) == 0  # same block, other prefix


def test_partial_blocks_are_not_keys() -> None:
    assert block_keys("x" * 63, 64) == []
    assert len(block_keys("x" * 130, 64)) == 2


def test_least_recently_used_blocks_fall_out() -> None:
    tree = PrefixTree(max_blocks=2)
    old, new = block_keys("o" * 64, 64), block_keys("n" * 128, 64)
    tree.insert(old)
    tree.insert(new)
    assert tree.size == 2 and tree.match(old) == 0 and tree.match(new) == 2
