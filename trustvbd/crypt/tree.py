"""The hash tree over leaf pages, whose root is what a commit signs.

Tree leaves are whole 4 KiB *leaf pages* (128 block leaves each), not single
blocks: a 1 GiB disk has 2048 tree leaves, so building the tree at open and
updating it at commit are cheap.

    page hash  = SHA-256(0x00 || page_index u64 BE || page), or 32 zero bytes
                 (empty[0]) for a page of zeros (never written)
    inner node = SHA-256(0x01 || left || right)

Because a never-written page hashes as the empty leaf, the tree of a fresh disk is
empty[depth] without hashing anything: a 16 TiB disk is made in constant time.

Each level with an odd count pairs its last node with the empty-subtree hash of
that level (empty[0] = 32 zero bytes, empty[k+1] = node(empty[k], empty[k])),
which is the same as padding the leaves to a power of two with empty leaves.
A one-page tree's root is that page's hash.
"""

from __future__ import annotations

import hashlib

HASH_SIZE = 32
PAGE_SIZE = 4096
# How many nodes of one tree level a superblock carries so that a verifier
# holding only the public key can tell which group of leaf pages is bad.
TOP_MAX = 64

_sha256 = hashlib.sha256
_EMPTY = [bytes(HASH_SIZE)]
for _ in range(64):
    _EMPTY.append(_sha256(b"\x01" + _EMPTY[-1] + _EMPTY[-1]).digest())


EMPTY: tuple[bytes, ...] = tuple(_EMPTY)
_ZERO_PAGE = bytes(PAGE_SIZE)


def page_hash(index: int, page: bytes | bytearray | memoryview) -> bytes:
    if page == _ZERO_PAGE:
        return _EMPTY[0]
    h = _sha256(b"\x00" + index.to_bytes(8, "big"))
    h.update(page)
    return h.digest()


def _parent_level(level: bytes | bytearray, depth: int) -> bytearray:
    count = len(level) // HASH_SIZE
    out = bytearray(((count + 1) // 2) * HASH_SIZE)
    for j in range(0, count, 2):
        left = bytes(level[j * HASH_SIZE:(j + 1) * HASH_SIZE])
        if j + 1 < count:
            right = bytes(level[(j + 1) * HASH_SIZE:(j + 2) * HASH_SIZE])
        else:
            right = _EMPTY[depth]
        out[(j // 2) * HASH_SIZE:(j // 2 + 1) * HASH_SIZE] = _sha256(
            b"\x01" + left + right).digest()
    return out


def root_from_level(level: bytes | bytearray, depth: int) -> bytes:
    """The root of the tree whose level `depth` (0 = page hashes) is `level`."""
    cur = bytearray(level)
    if not cur:
        raise ValueError("a tree needs at least one leaf")
    while len(cur) > HASH_SIZE:
        cur = _parent_level(cur, depth)
        depth += 1
    return bytes(cur)


class HashTree:
    """All levels of the tree in memory; dirty leaves are re-hashed up to the root."""

    def __init__(self, page_hashes: bytes | bytearray) -> None:
        if not page_hashes or len(page_hashes) % HASH_SIZE:
            raise ValueError("page hashes must be a non-empty multiple of 32 bytes")
        self.levels: list[bytearray] = [bytearray(page_hashes)]
        while len(self.levels[-1]) > HASH_SIZE:
            self.levels.append(_parent_level(self.levels[-1], len(self.levels) - 1))

    @property
    def leaf_count(self) -> int:
        return len(self.levels[0]) // HASH_SIZE

    @property
    def root(self) -> bytes:
        return bytes(self.levels[-1][:HASH_SIZE])

    def leaf(self, index: int) -> bytes:
        return bytes(self.levels[0][index * HASH_SIZE:(index + 1) * HASH_SIZE])

    def update(self, changes: dict[int, bytes]) -> None:
        """Set leaf hashes {index: hash} and re-hash their paths to the root."""
        dirty = set()
        for i, h in changes.items():
            self.levels[0][i * HASH_SIZE:(i + 1) * HASH_SIZE] = h
            dirty.add(i)
        for depth in range(len(self.levels) - 1):
            level, above = self.levels[depth], self.levels[depth + 1]
            count = len(level) // HASH_SIZE
            parents = set()
            for i in dirty:
                p = i // 2
                if p in parents:
                    continue
                parents.add(p)
                left = bytes(level[2 * p * HASH_SIZE:(2 * p + 1) * HASH_SIZE])
                if 2 * p + 1 < count:
                    right = bytes(level[(2 * p + 1) * HASH_SIZE:(2 * p + 2) * HASH_SIZE])
                else:
                    right = _EMPTY[depth]
                above[p * HASH_SIZE:(p + 1) * HASH_SIZE] = _sha256(
                    b"\x01" + left + right).digest()
            dirty = parents

    def top(self) -> tuple[int, bytes]:
        """(depth, hashes) of the lowest level with at most TOP_MAX nodes."""
        for depth, level in enumerate(self.levels):
            if len(level) // HASH_SIZE <= TOP_MAX:
                return depth, bytes(level)
        raise AssertionError("the root level always has one node")


def level_counts(leaves: int) -> list[int]:
    """Node count of each level, leaves first, root (1) last."""
    counts = [leaves]
    while counts[-1] > 1:
        counts.append((counts[-1] + 1) // 2)
    return counts


def node(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def group_size(depth: int) -> int:
    """How many leaf pages one node at `depth` covers."""
    return 1 << depth


class TreeBuilder:
    """The root of the tree over `leaves` page hashes given in order, in memory that grows
    with the tree's depth only (one pending node per level), and the nodes of level
    `keep` (a superblock's top level: at most `keep_max` of them, else none are kept and
    `kept` is None). For checking a leaf table of any size as it streams by."""

    def __init__(self, leaves: int, keep: int, keep_max: int = TOP_MAX) -> None:
        if leaves < 1:
            raise ValueError("a tree needs at least one leaf")
        self._leaves = leaves
        self._height = len(level_counts(leaves)) - 1
        self._keep, self._keep_max = keep, keep_max
        self.kept: list[bytes] | None = []
        self._pending: list[bytes | None] = [None] * (self._height + 1)
        self._count = 0  # leaves given so far

    def add(self, page_hash_: bytes) -> None:
        """The next page's hash."""
        self._push(page_hash_, 0)
        self._count += 1

    def add_empty(self, count: int) -> None:
        """`count` never-written pages in a row: whole empty subtrees, without hashing."""
        while count > 0:
            pos = self._count
            k = min((pos & -pos).bit_length() - 1 if pos else 63, count.bit_length() - 1)
            self._push(_EMPTY[k], k)
            self._count += 1 << k
            count -= 1 << k

    def _keep_node(self, node_hash: bytes, times: int = 1) -> None:
        kept = self.kept
        if kept is None:
            return
        if len(kept) + times > self._keep_max:
            self.kept = None
        else:
            kept.extend([node_hash] * times)

    def _push(self, h: bytes, level: int) -> None:
        """A node at `level`; the pending nodes below it are all None (it is aligned)."""
        if level > self._keep:
            self._keep_node(_EMPTY[self._keep], 1 << (level - self._keep))  # only empties
        pending = self._pending
        while True:
            if level == self._keep:
                self._keep_node(h)
            left = pending[level]
            if left is None:
                pending[level] = h
                return
            pending[level] = None
            h = _sha256(b"\x01" + left + h).digest()
            level += 1

    def finish(self) -> bytes:
        """The root, once every leaf was given; `kept` is then complete."""
        if self._count != self._leaves:
            raise ValueError(f"the tree has {self._leaves} leaves, {self._count} were given")
        pending, carry = self._pending, None
        for depth in range(self._height):
            left = pending[depth]
            if carry is None:
                if left is None:
                    continue
                carry = _sha256(b"\x01" + left + _EMPTY[depth]).digest()  # an odd last node
            elif left is None:
                carry = _sha256(b"\x01" + carry + _EMPTY[depth]).digest()
            else:
                carry = _sha256(b"\x01" + left + carry).digest()
            if depth + 1 == self._keep:
                self._keep_node(carry)
        root = carry if carry is not None else pending[self._height]
        assert root is not None
        return root
