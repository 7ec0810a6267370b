"""The hash tree of one disk, kept in its trusted state file and loaded node by node.

The file (`STATE/disks/NAME/tree`, byte layout in docs/format.md section 2.5) holds
every level of the tree over the disk's leaf pages, leaves first. A node of 32
zero bytes stands for that level's empty subtree, so a new disk's file is a
header and a hole: making or opening a 16 TiB disk hashes nothing.

Nothing read from the file is believed until it hashes up to the root the trusted
anchor holds: loading a node loads (and checks) its parent first, then checks the
node and its sibling against it. A damaged, tampered or rolled-back node is found
the moment it is needed, naming the blocks it covers. Checked nodes stay in a
bounded cache; nodes changed by a commit stay in memory until written back.

Changes reach the file after the anchor, without fsync; the intent log carries
each changed page hash until the file is synced (intent_log.IntentLog), so after a
power cut `redo` puts them back and the root is checked again. An orderly close
syncs the file and marks it clean with the anchor's epoch and root.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from trustvbd.crypt.tree import EMPTY, HASH_SIZE, level_counts, node
from trustvbd.fileops import OS_FILES, FileOps

HEADER_SIZE = 4096
_HEADER = struct.Struct(">8sIIQQ32s")
_MAGIC = b"TVBDTREE"
VERSION = 1
_CLEAN = 1
_ZERO = bytes(HASH_SIZE)
LEAVES_PER_PAGE = 128
# Checked nodes kept in memory: ~25 per leaf page on a 16 TiB disk, about 150
# bytes each with Python's overhead, so ~5 MiB.
DEFAULT_CACHE_NODES = 32768


class TreeFileError(Exception):
    """The tree file is missing, of another format, or does not hash to the anchor."""


def _encode_header(pages: int, clean: bool, epoch: int, root: bytes) -> bytes:
    body = _HEADER.pack(_MAGIC, VERSION, _CLEAN if clean else 0, pages, epoch, root)
    head = body + struct.pack(">I", zlib.crc32(body))
    return head + bytes(HEADER_SIZE - len(head))


def file_size(pages: int) -> int:
    return HEADER_SIZE + HASH_SIZE * sum(level_counts(pages))


def create(path: Path, pages: int, ops: FileOps = OS_FILES) -> bytes:
    """A new, all-empty tree file (a header and a hole); returns its root."""
    root = EMPTY[len(level_counts(pages)) - 1]
    tmp = path.with_name(path.name + ".tmp")
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        ops.pwrite(fd, _encode_header(pages, True, 0, root), 0)
        ops.ftruncate(fd, file_size(pages))
        ops.fsync(fd)
    finally:
        ops.close(fd)
    ops.replace(tmp, path)
    ops.fsync_dir(path.parent)
    return root


class TreeFile:
    """One disk's tree: checked against `root` (the anchor's) as it is loaded."""

    def __init__(self, path: Path, disk: str, pages: int, root: bytes,
                 ops: FileOps = OS_FILES, cache_nodes: int = DEFAULT_CACHE_NODES) -> None:
        self.path, self.disk, self.pages, self._ops = path, disk, pages, ops
        self.counts = level_counts(pages)
        self.top_level = len(self.counts) - 1
        self._offsets = []
        off = HEADER_SIZE
        for c in self.counts:
            self._offsets.append(off)
            off += c * HASH_SIZE
        self._size = off
        self._cache_nodes = max(cache_nodes, 4 * len(self.counts))
        self._clean: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._dirty: dict[tuple[int, int], bytes] = {}
        self.root = root
        self.marked_dirty = False
        try:
            self._fd = ops.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise TreeFileError(f"{path} is missing; restore the trusted state of disk "
                                f"{disk!r} from its backup") from None
        st = os.fstat(self._fd)
        if st.st_size != self._size:
            self.close()
            raise TreeFileError(f"{path} is {st.st_size} bytes, not the {self._size} of a "
                                f"{pages}-page tree; restore it")

    def close(self) -> None:
        if self._fd >= 0:
            self._ops.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------ header

    def header(self) -> tuple[bool, int, bytes]:
        """(clean, epoch, root) as the file's header says."""
        raw = os.pread(self._fd, _HEADER.size + 4, 0)
        if len(raw) != _HEADER.size + 4 or zlib.crc32(raw[:-4]) != struct.unpack(">I", raw[-4:])[0]:
            raise TreeFileError(f"{self.path} has a damaged header; restore it")
        magic, version, flags, pages, epoch, root = _HEADER.unpack_from(raw)
        if magic != _MAGIC or version != VERSION:
            raise TreeFileError(f"{self.path} is not a version-{VERSION} tree file")
        if pages != self.pages or flags & ~_CLEAN:
            raise TreeFileError(f"{self.path} describes {pages} leaf pages (flags {flags:#x}); "
                                f"disk {self.disk!r} has {self.pages}; restore it")
        return bool(flags & _CLEAN), epoch, root

    def mark_dirty(self) -> None:
        """Before the first change after open: the file may lag the anchor from now on."""
        if not self.marked_dirty:
            _, epoch, root = self.header()
            self._ops.pwrite(self._fd, _encode_header(self.pages, False, epoch, root), 0)
            self._ops.fdatasync(self._fd)
            self.marked_dirty = True

    def mark_clean(self, epoch: int) -> None:
        """An orderly close: everything written back and synced matches `epoch`'s anchor."""
        self.write_back()
        self._ops.fdatasync(self._fd)
        self._ops.pwrite(self._fd, _encode_header(self.pages, True, epoch, self.root), 0)
        self._ops.fdatasync(self._fd)
        self.marked_dirty = False

    def sync(self) -> None:
        self._ops.fdatasync(self._fd)

    # ------------------------------------------------------------ nodes

    def _raw(self, level: int, index: int, count: int) -> list[bytes]:
        raw = os.pread(self._fd, count * HASH_SIZE, self._offsets[level] + index * HASH_SIZE)
        if len(raw) != count * HASH_SIZE:
            raise TreeFileError(f"{self.path} is short at level {level}; restore it")
        out = []
        for i in range(count):
            h = raw[i * HASH_SIZE:(i + 1) * HASH_SIZE]
            out.append(EMPTY[level] if h == _ZERO else h)
        return out

    def _cached(self, key: tuple[int, int]) -> bytes | None:
        h = self._dirty.get(key)
        if h is not None:
            return h
        h = self._clean.get(key)
        if h is not None:
            self._clean.move_to_end(key)
        return h

    def _keep(self, key: tuple[int, int], h: bytes) -> None:
        if key not in self._dirty:
            self._clean[key] = h
            self._clean.move_to_end(key)
            while len(self._clean) > self._cache_nodes:
                self._clean.popitem(last=False)

    def blocks_of(self, level: int, index: int) -> tuple[int, int]:
        """Blocks [first, end) a node covers."""
        first = (index << level) * LEAVES_PER_PAGE
        return first, ((index + 1) << level) * LEAVES_PER_PAGE

    def get(self, level: int, index: int) -> bytes:
        """Node `index` of `level`, checked up to the root."""
        if level == self.top_level:
            return self.root
        key = (level, index)
        h = self._cached(key)
        if h is not None:
            return h
        parent = self.get(level + 1, index >> 1)
        left_i = index & ~1
        pair = self._raw(level, left_i, 2 if left_i + 1 < self.counts[level] else 1)
        for k in range(len(pair)):  # changed nodes in memory are newer than the file
            mine = self._cached((level, left_i + k))
            if mine is not None:
                pair[k] = mine
        right = pair[1] if len(pair) == 2 else EMPTY[level]
        if node(pair[0], right) != parent:
            first, end = self.blocks_of(level + 1, index >> 1)  # the pair: either may be bad
            raise TreeTamperedError(
                f"disk {self.disk!r}: the trusted tree file {self.path} was altered or rolled "
                f"back at level {level} nodes {left_i}-{left_i + len(pair) - 1}: blocks "
                f"{first}-{end - 1} cannot be "
                "verified; restore the trusted state directory from its backup",
                self.disk, range(first, end))
        for k, h in enumerate(pair):
            self._keep((level, left_i + k), h)
        return pair[index - left_i]

    def leaf(self, page: int) -> bytes:
        return self.get(0, page)

    def is_empty(self, level: int, index: int) -> bool:
        return self.get(level, index) == EMPTY[level]

    def nonempty_pages(self, first: int = 0, end: int | None = None) -> list[int]:
        """Leaf pages in [first, end) whose hash is not the empty one, found from the top."""
        return list(self.iter_nonempty_pages(first, end))

    def iter_nonempty_pages(self, first: int = 0, end: int | None = None) -> Iterator[int]:
        """nonempty_pages in order, found as they are taken (no list of them all)."""
        end = self.pages if end is None else end

        def walk(level: int, index: int) -> Iterator[int]:
            lo, hi = index << level, (index + 1) << level
            if hi <= first or lo >= end or lo >= self.pages or self.is_empty(level, index):
                return
            if level == 0:
                yield index
                return
            yield from walk(level - 1, 2 * index)
            yield from walk(level - 1, 2 * index + 1)

        return walk(self.top_level, 0)

    def update(self, changes: dict[int, bytes]) -> None:
        """Set page hashes and re-hash their paths; kept in memory until write_back."""
        if not changes:
            return
        for p in changes:
            self.get(0, p)  # its path is checked before it changes
        computed = self._hash_up(changes, self.get)
        for key, h in computed.items():
            self._dirty[key] = h
            self._clean.pop(key, None)
        self.root = computed[(self.top_level, 0)]

    def _hash_up(self, changes: dict[int, bytes],
                 value: Callable[[int, int], bytes]) -> dict[tuple[int, int], bytes]:
        """New nodes on the paths of changed page hashes, up to the root (included);
        unchanged siblings come from `value`."""
        computed: dict[tuple[int, int], bytes] = {(0, p): h for p, h in changes.items()}

        def get(level: int, index: int) -> bytes:
            h = computed.get((level, index))
            return h if h is not None else value(level, index)

        dirty = set(changes)
        for level in range(self.top_level):
            parents = {i >> 1 for i in dirty}
            for p in parents:
                right = get(level, 2 * p + 1) if 2 * p + 1 < self.counts[level] else EMPTY[level]
                computed[(level + 1, p)] = node(get(level, 2 * p), right)
            dirty = parents
        return computed

    def write_back(self) -> None:
        """Changed nodes to the file (no fsync: the intent log carries the page hashes)."""
        if not self._dirty:
            return
        self.mark_dirty()
        for (level, index), h in sorted(self._dirty.items()):
            stored = _ZERO if h == EMPTY[level] else h
            self._ops.pwrite(self._fd, stored, self._offsets[level] + index * HASH_SIZE)
        dirty, self._dirty = self._dirty, {}
        for key, h in dirty.items():
            self._keep(key, h)

    def top(self, top_max: int) -> tuple[int, bytes]:
        """(level, nodes) of the lowest level with at most `top_max` nodes (the superblock's)."""
        for level, count in enumerate(self.counts):
            if count <= top_max:
                return level, b"".join(self.get(level, i) for i in range(count))
        raise AssertionError("the root level has one node")

    def redo(self, changes: dict[int, bytes]) -> bool:
        """After a power cut: put back page hashes the file may have lost, re-hash their
        paths from the file, and keep them if the root comes out as the anchor's."""
        if not changes:  # nothing to put back: the root the file holds must be the anchor's
            return self._raw(self.top_level, 0, 1)[0] == self.root
        computed = self._hash_up(changes, lambda level, i: self._raw(level, i, 1)[0])
        if computed[(self.top_level, 0)] != self.root:
            return False
        self._dirty.update(computed)
        self.write_back()
        self.sync()
        return True

    def resident(self) -> int:
        return len(self._clean) + len(self._dirty)


class TreeTamperedError(TreeFileError):
    """A node of the trusted tree file does not hash up to the anchor's root."""

    def __init__(self, message: str, disk: str, blocks: range) -> None:
        super().__init__(message)
        self.disk, self.blocks = disk, blocks
