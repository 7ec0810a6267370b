"""BlockRuns (blocks/block_runs.py): a replica's dirty map as runs, bounded by a cap."""

from __future__ import annotations

import random

import pytest

from trustvbd.blocks.block_runs import BlockRuns


def check_shape(s: BlockRuns) -> None:
    """Sorted, disjoint, non-touching runs; the count is their total."""
    rs = list(s.runs())
    assert all(a < b for a, b in rs), rs
    assert all(rs[k][1] < rs[k + 1][0] for k in range(len(rs) - 1)), rs
    assert len(s) == sum(b - a for a, b in rs)


@pytest.mark.parametrize("seed", range(6))
def test_below_the_cap_it_is_exactly_the_set_of_blocks(seed: int) -> None:
    rng = random.Random(seed)
    s, ref = BlockRuns(), set[int]()
    for _ in range(3000):
        b0 = rng.randrange(2000)
        b1 = b0 + rng.choice((1, 1, 2, 7, 40))
        if rng.random() < 0.7:
            s.add(b0, b1)
            ref.update(range(b0, b1))
        else:
            s.discard(b0, b1)
            ref.difference_update(range(b0, b1))
        if rng.random() < 0.05:
            check_shape(s)
            assert set(s) == ref
    check_shape(s)
    assert set(s) == ref and len(s) == len(ref) and s.coarsened == 0
    probe = rng.sample(range(2100), 200)
    assert [b in s for b in probe] == [b in ref for b in probe]


def test_touching_and_overlapping_runs_merge() -> None:
    s = BlockRuns()
    s.add(10, 20)
    s.add(30, 40)
    s.add(20, 30)  # touches both: one run
    assert list(s.runs()) == [(10, 40)] and len(s) == 30
    s.update([5, 6, 7, 9])
    assert list(s.runs()) == [(5, 8), (9, 40)]
    s.update(range(8, 9))
    assert list(s.runs()) == [(5, 40)]
    s.discard(12, 14)
    assert list(s.runs()) == [(5, 12), (14, 40)] and len(s) == 33
    s.discard(0, 100)
    assert not s and list(s.runs()) == []


def test_the_first_batch_is_cut_by_total_and_by_run_length() -> None:
    s = BlockRuns.of_runs([(0, 5), (10, 1000), (2000, 2001)])
    assert s.first(300, 256) == [(0, 5), (10, 266), (266, 305)]
    assert s.first(10_000, 1 << 20) == [(0, 5), (10, 1000), (2000, 2001)]


@pytest.mark.parametrize("cap", [1, 2, 16, 100])
def test_past_the_cap_it_coarsens_to_a_superset_never_fewer_blocks(cap: int) -> None:
    rng = random.Random(cap)
    s, ref = BlockRuns(max_runs=cap), set[int]()
    for _ in range(5000):
        b = rng.randrange(1 << 40)  # scattered over a 4 PiB disk's worth of blocks
        n = rng.choice((1, 3))
        s.add(b, b + n)
        ref.update(range(b, b + n))
        assert s.run_count <= cap
    check_shape(s)
    assert all(b in s for b in ref)  # never fewer
    assert s.coarsened > 0 and len(ref) <= len(s) <= len(ref) + s.coarsened
    # The smallest gaps go first: 60 tight clusters of 50 blocks (3000 runs) in room for
    # 100 runs are each one run at worst, never merged with each other.
    t = BlockRuns(max_runs=100)
    for cluster in range(60):
        for i in range(50):
            t.add(cluster * 1_000_000 + 3 * i, cluster * 1_000_000 + 3 * i + 1)
    assert 60 <= t.run_count <= 100 and len(t) <= 60 * (3 * 49 + 1)
    assert all(c * 1_000_000 in t and c * 1_000_000 + 147 in t for c in range(60))


def test_a_copy_is_independent_and_a_bad_cap_or_block_is_refused() -> None:
    s = BlockRuns([1, 2, 3])
    c = s.copy()
    c.add(10, 11)
    assert set(s) == {1, 2, 3} and set(c) == {1, 2, 3, 10}
    with pytest.raises(ValueError, match="max_runs"):
        BlockRuns(max_runs=0)
    with pytest.raises(ValueError, match="negative"):
        s.add(-1, 3)


@pytest.mark.parametrize("seed", range(4))
def test_a_big_set_added_to_another_merges_exactly(seed: int) -> None:
    rng = random.Random(seed)
    a, b = BlockRuns(), BlockRuns()
    ref = set[int]()
    for s in (a, b):
        for _ in range(400):  # well past the 64 runs from which `update` merges in one pass
            b0 = rng.randrange(20_000)
            b1 = b0 + rng.choice((1, 2, 30))
            s.add(b0, b1)
            ref.update(range(b0, b1))
    a.update(b)
    check_shape(a)
    assert set(a) == ref and len(a) == len(ref)
    small = BlockRuns(max_runs=50)
    small.update(b)  # merged, then coarsened to the cap
    check_shape(small)
    assert small.run_count <= 50 and set(b) <= set(small)
