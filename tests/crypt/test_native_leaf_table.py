"""The native leaf table and range lock (native/src/leaf_table) against a model in Python:
the residency, LRU eviction, pins, dirty pages and range-lock rules the Python code had
before they moved, driven by seeded random operations; then the binding's refusals."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from trustvbd._native import LeafTable, RangeTable

PAGE, LEAF, PER_PAGE = 4096, 32, 128


class Model:
    """The former LeafPages storage and RangeLock, reduced to what the table decides."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.clean: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: dict[int, bytearray] = {}
        self.pins: dict[int, int] = {}
        self.changes: dict[int, int] = {}
        self.holds: dict[int, tuple[int, int, bool, bool]] = {}  # id -> (start, end, excl, pinned)

    def resident(self, p: int) -> bool:
        return p in self.clean or p in self.dirty

    def evict(self) -> None:
        over = len(self.clean) + len(self.dirty) - self.capacity
        tries = len(self.clean)
        while over > 0 and tries > 0:
            p = next(iter(self.clean))
            tries -= 1
            if self.pins.get(p):
                self.clean.move_to_end(p)
                continue
            del self.clean[p]
            over -= 1

    def insert(self, p: int, page: bytes, dirty: bool) -> bool:
        if self.resident(p):
            return False
        if dirty:
            self.dirty[p] = bytearray(page)
        else:
            self.clean[p] = bytearray(page)
            self.evict()
        return True

    def pages_of(self, b0: int, b1: int) -> range:
        return range(b0 // PER_PAGE, (b1 - 1) // PER_PAGE + 1)

    def page(self, p: int) -> bytearray:
        return self.dirty[p] if p in self.dirty else self.clean[p]

    def get(self, b0: int, b1: int) -> bytes:
        return b"".join(bytes(self.page(b // PER_PAGE)[(b % PER_PAGE) * LEAF:][:LEAF])
                        for b in range(b0, b1))

    def set(self, b0: int, leaves: bytes) -> None:
        for p in self.pages_of(b0, b0 + len(leaves) // LEAF):  # a change per page and call
            if p not in self.dirty:
                self.dirty[p] = self.clean.pop(p)
            self.changes[p] = self.changes.get(p, 0) + 1
        for i in range(len(leaves) // LEAF):
            b = b0 + i
            self.dirty[b // PER_PAGE][(b % PER_PAGE) * LEAF:(b % PER_PAGE + 1) * LEAF] = leaves[i * LEAF:(i + 1) * LEAF]

    def conflict(self, start: int, end: int, excl: bool) -> bool:
        return any(s < end and start < e and (excl or x) for s, e, x, _ in self.holds.values())

    def try_hold(self, hid: int, start: int, end: int, excl: bool) -> bool:
        if self.conflict(start, end, excl) or not all(self.resident(p) for p in self.pages_of(start, end)):
            return False
        for p in self.pages_of(start, end):
            if p in self.clean:
                self.clean.move_to_end(p)
            self.pins[p] = self.pins.get(p, 0) + 1
        self.holds[hid] = (start, end, excl, True)
        return True

    def release(self, hid: int) -> None:
        start, end, _, pinned = self.holds.pop(hid)
        if pinned:
            for p in self.pages_of(start, end):
                self.pins[p] -= 1
                if not self.pins[p]:
                    del self.pins[p]
            self.evict()

    def committed(self, pages: dict[int, int]) -> None:
        for p, n in pages.items():
            if self.changes.get(p, 0) != n:
                continue
            self.changes.pop(p, None)
            if p in self.dirty:
                self.clean[p] = self.dirty.pop(p)
        self.evict()


@pytest.mark.parametrize("seed", range(6))
def test_the_native_table_decides_as_the_python_model(seed: int) -> None:
    rnd = random.Random(seed)
    capacity = rnd.choice([2, 3, 8])
    table, model = LeafTable(capacity), Model(capacity)
    held: dict[int, int] = {}  # model id -> native hold
    pages = 12
    for step in range(3000):
        op = rnd.random()
        b0 = rnd.randrange(pages * PER_PAGE - 1)
        b1 = min(b0 + rnd.choice([1, 1, 2, 3, 40, 200]), pages * PER_PAGE)
        where = f"seed {seed}, step {step}"
        if op < 0.2:
            p = rnd.randrange(pages)
            page = rnd.randbytes(PAGE) if rnd.random() < 0.7 else bytes(PAGE)
            dirty = rnd.random() < 0.1
            assert table.insert(p, page, dirty) == model.insert(p, page, dirty), where
        elif op < 0.45:
            excl = rnd.random() < 0.4
            got = table.try_hold(b0, b1, excl)
            assert (got is not None) == model.try_hold(step, b0, b1, excl), where
            if got is not None:
                held[step] = got
        elif op < 0.65 and held:
            hid = rnd.choice(list(held))
            table.release(held.pop(hid))
            model.release(hid)
        elif op < 0.8:
            if all(model.resident(p) for p in model.pages_of(b0, b1)):
                assert table.get(b0, b1) == model.get(b0, b1), where
                assert table.all_zero(b0, b1) == (model.get(b0, b1).count(0) == (b1 - b0) * LEAF)
                leaves = rnd.randbytes((b1 - b0) * LEAF)
                table.set(b0, leaves)
                model.set(b0, leaves)
            else:
                with pytest.raises(KeyError, match="not in memory"):
                    table.set(b0, bytes((b1 - b0) * LEAF))
        elif op < 0.85:
            snapshot = table.dirty_pages()
            assert dict(snapshot) == {p: model.changes.get(p, 0) for p in sorted(model.dirty)}, where
            table.committed(snapshot)
            model.committed(dict(snapshot))
        resident = sorted([*model.clean, *model.dirty])
        assert table.resident_in(0, pages) == resident, where
        assert table.dirty_count == len(model.dirty), where
        assert table.holds == len(model.holds), where
        for p in resident:
            assert table.page(p) == bytes(model.page(p)), where
    for hid, hold in held.items():
        table.release(hold)
        model.release(hid)
    assert table.holds == 0 and table.reads_held == 0


def test_refusals_name_what_is_wrong() -> None:
    table = LeafTable(4)
    with pytest.raises(KeyError, match="leaf page 0 is not in memory"):
        table.get(0, 1)
    with pytest.raises(ValueError, match="4096 bytes"):
        table.insert(0, bytes(100), False)
    table.insert(0, bytes(PAGE), False)
    with pytest.raises(ValueError, match="whole 32-byte leaves"):
        table.set(0, bytes(33))
    with pytest.raises(ValueError, match=r"block range \[5, 3\) ends before it starts"):
        table.try_hold(5, 3, False)
    hold = table.try_hold(0, 1, True)
    assert hold is not None
    table.release(hold)
    with pytest.raises(KeyError, match=f"no range lock hold {hold} is held"):
        table.release(hold)
    locks = RangeTable()
    with pytest.raises(KeyError, match="no range lock hold 7"):
        locks.release(7)
    read = locks.hold(0, 8, False)
    assert locks.conflict(4, 5, True) == read and locks.conflict(4, 5, False) is None
    assert locks.reads_held == 1 and len(locks) == 1


@pytest.mark.parametrize("kind", ["leaf table", "range table"])
def test_release_all_releases_every_hold_held_then_names_one_that_is_not(kind: str) -> None:
    """The holds of writes behind that ended together go in one call (RangeLock.release_all):
    each held is released, even past one that is not held, which
    is then the error."""
    table: LeafTable | RangeTable
    if kind == "leaf table":
        table = LeafTable(4)
        table.insert(0, bytes(PAGE), False)
        holds = [table.try_hold(b, b + 1, True) for b in (0, 5, 9)]
    else:
        table = RangeTable()
        holds = [table.try_hold(b, b + 1, True) for b in (0, 5, 9)]
    assert None not in holds
    a, b, c = (h for h in holds if h is not None)
    table.release_all([a])
    assert table.conflict(0, 1, True) is None and table.conflict(5, 6, True) == b
    with pytest.raises(KeyError, match=f"no range lock hold {a} is held"):
        table.release_all([b, a, c])
    assert table.conflict(0, 16, True) is None  # b and c released all the same
    table.release_all([])
    if isinstance(table, LeafTable):
        assert table.holds == 0
    else:
        assert len(table) == 0
