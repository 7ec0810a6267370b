"""The independent reader of docs/format.md, for a whole replica: every block's plaintext.

Written from the document alone, with the `cryptography` primitives and the hand-written
HKDF of test_format_doc, and none of trustvbd's parsers: what the data plane writes that
the document does not describe fails here. It checks what the document says a reader
checks (superblock validity, the tree root against the trusted anchor, leaf shapes, no
(key_id, version) pair used twice, every tag) and, when the encryption domain was killed,
picks each logged block's leaf as the recovery of section 2.4 does.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.crypt.test_format_doc import _crc_ok, _unwrap, doc_block_key

BLOCK = 4096
LOST = (1 << 64) - 1
ZERO_LEAF = bytes(32)


class FormatError(AssertionError):
    """The bytes are not what docs/format.md describes (or fail its checks)."""


def need(ok: bool, what: str) -> None:
    if not ok:
        raise FormatError(what)


@dataclass(frozen=True)
class Anchor:
    """Section 2.3: the trusted record of the last commit."""

    disk_id: bytes
    size: int
    epoch: int
    counter_high: int
    root: bytes
    replicas: dict[bytes, int]  # replica id -> state (1 current, 2 behind, 3 rebuild)


def replica_id(name: str) -> bytes:
    return hashlib.sha256(b"trustvbd-replica\x00" + name.encode()).digest()[:16]


def read_anchor(whole: bytes) -> Anchor:
    need(len(whole) == 1024, f"anchor: {len(whole)} bytes, not two 512-byte slots")
    complete: list[tuple[int, bytes]] = []
    for i in range(2):
        slot = whole[512 * i:512 * (i + 1)]
        if slot[:8] != b"TVBDANCR" or struct.unpack_from(">I", slot, 8)[0] != 3:
            continue
        (count,) = struct.unpack_from(">I", slot, 88)
        end = 92 + 17 * count
        if count <= 8 and _crc_ok(slot, end):
            need(slot[end + 4:] == bytes(512 - end - 4), f"anchor slot {i}: bytes after the record")
            (seq,) = struct.unpack_from(">I", slot, 12)
            need(seq % 2 == i, f"anchor: seq {seq} in slot {i}")
            complete.append((seq, slot))
    need(bool(complete), "anchor: no complete slot")
    if len(complete) == 2:
        (s0, r0), (s1, r1) = complete
        need((s0 - s1) % (1 << 32) in (1, (1 << 32) - 1), "anchor: both slots complete, seq not one apart")
        rec = r0 if (s0 - s1) % (1 << 32) == 1 else r1  # the one written last
    else:
        rec = complete[0][1]
    size, epoch, counter_high = struct.unpack_from(">QQQ", rec, 32)
    (count,) = struct.unpack_from(">I", rec, 88)
    replicas = {rec[93 + 17 * i:109 + 17 * i]: rec[92 + 17 * i] for i in range(count)}
    need(all(s in (1, 2, 3) for s in replicas.values()), f"anchor: replica states {replicas}")
    return Anchor(rec[16:32], size, epoch, counter_high, rec[56:88], replicas)


@dataclass(frozen=True)
class Superblock:
    epoch: int
    counter_high: int
    root: bytes
    top_depth: int
    top: list[bytes]


def read_superblock(sb: bytes, slot: int, disk_id: bytes, size: int, public: bytes) -> Superblock | None:
    """Section 1.4: a valid slot, None if blank; FormatError for anything else."""
    if sb == bytes(BLOCK):
        return None
    n = size // BLOCK
    p = -(-n // 128)
    need(sb[:8] == b"TVBDSUPR", f"superblock {slot}: magic {sb[:8]!r}")
    need(struct.unpack_from(">II", sb, 8) == (2, BLOCK), f"superblock {slot}: version/block size")
    need(sb[16:32] == disk_id, f"superblock {slot}: another disk's id")
    lsize, loff, lpages, doff, epoch, counter = struct.unpack_from(">QQQQQQ", sb, 32)
    need((lsize, loff, lpages, doff) == (size, 8192, p, 8192 + p * BLOCK),
         f"superblock {slot}: layout {lsize, loff, lpages, doff}")
    need(epoch % 2 == slot, f"superblock {slot}: epoch {epoch} in the wrong slot")
    need(sb[112:144] == hashlib.sha256(public).digest(), f"superblock {slot}: key fingerprint")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            sb[2200:2264], b"trustvbd-superblock-v1\x00" + sb[:2200])
    except Exception:
        raise FormatError(f"superblock {slot}: signature does not verify") from None
    need(sb[2264:] == bytes(BLOCK - 2264), f"superblock {slot}: bytes 2264.. not zero")
    top_depth, top_count = struct.unpack_from(">II", sb, 144)
    need(1 <= top_count <= 64, f"superblock {slot}: top_count {top_count}")
    need(sb[152 + 32 * top_count:2200] == bytes(2048 - 32 * top_count),
         f"superblock {slot}: unused top entries not zero")
    top = [sb[152 + 32 * j:184 + 32 * j] for j in range(top_count)]
    need(tree_levels(top, top_depth)[-1][0] == sb[80:112], f"superblock {slot}: top level does not hash to root")
    return Superblock(epoch, counter, sb[80:112], top_depth, top)


def page_hash(p: int, page: bytes) -> bytes:
    if page == bytes(BLOCK):
        return bytes(32)
    return hashlib.sha256(b"\x00" + p.to_bytes(8, "big") + page).digest()


def tree_levels(hashes: list[bytes], depth: int = 0) -> list[list[bytes]]:
    """Section 1.3: every level from level `depth` (`hashes`; 0: the page hashes) up,
    the last one the root."""
    empty = bytes(32)
    for _ in range(depth):
        empty = hashlib.sha256(b"\x01" + empty + empty).digest()
    levels = [hashes]
    while len(levels[-1]) > 1:
        level = levels[-1]
        if len(level) % 2:
            level = [*level, empty]
        levels.append([hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
                       for i in range(0, len(level), 2)])
        empty = hashlib.sha256(b"\x01" + empty + empty).digest()
    return levels


@dataclass
class IntentLog:
    """Section 2.4, as far as recovery needs it."""

    base_epoch: int
    # (first_block, old leaves, new leaves) per leaf record, None for a flush mark
    records: list[tuple[int, list[bytes], list[bytes]] | None]
    trees: list[tuple[int, dict[int, bytes]]]  # (epoch, page -> page hash) per tree record
    bare: bool  # a header and nothing after it (an orderly close)


def read_intent_log(raw: bytes) -> IntentLog:
    need(len(raw) >= 32 and raw[:8] == b"TVBDINTL" and _crc_ok(raw, 28), "intent log: bad header")
    version, reserved, base_epoch, reserved2 = struct.unpack_from(">IIQI", raw, 8)
    need((version, reserved, reserved2) == (2, 0, 0), f"intent log: header fields {version, reserved, reserved2}")
    records: list[tuple[int, list[bytes], list[bytes]] | None] = []
    trees: list[tuple[int, dict[int, bytes]]] = []
    at = 32
    while at + 20 <= len(raw):
        magic, n = raw[at:at + 4], struct.unpack_from(">I", raw, at + 4)[0]
        if magic == b"IREC":
            end = at + 16 + 64 * n
            if end + 4 > len(raw) or not _crc_ok(raw[at:end + 4], end - at):
                break
            (first,) = struct.unpack_from(">Q", raw, at + 8)
            if n == 0:
                need(first == 0, f"intent log at {at}: a flush mark with first_block {first}")
                records.append(None)
            else:
                olds = [raw[at + 16 + 32 * i:at + 48 + 32 * i] for i in range(n)]
                news = [raw[at + 16 + 32 * (n + i):at + 48 + 32 * (n + i)] for i in range(n)]
                records.append((first, olds, news))
            at = end + 4
        elif magic == b"TREC":
            end = at + 16 + 40 * n
            if end + 4 > len(raw) or not _crc_ok(raw[at:end + 4], end - at):
                break
            (epoch,) = struct.unpack_from(">Q", raw, at + 8)
            pages = [struct.unpack_from(">Q", raw, at + 16 + 40 * i)[0] for i in range(n)]
            need(pages == sorted(set(pages)), f"intent log at {at}: tree record pages not ascending")
            trees.append((epoch, {p: raw[at + 24 + 40 * i:at + 56 + 40 * i] for i, p in enumerate(pages)}))
            at = end + 4
        else:
            break
    return IntentLog(base_epoch, records, trees, bare=len(raw) == 32)


def recovered_leaves(log: IntentLog) -> dict[int, tuple[bytes, list[bytes]]]:
    """Section 2.4: per logged block, (committed leaf, candidates newest first down to the floor)."""
    committed: dict[int, bytes] = {}
    news: dict[int, list[bytes]] = {}
    floor: dict[int, int] = {}  # block -> how many of its new leaves came before the last mark
    for rec in log.records:
        if rec is None:
            floor = {b: len(v) for b, v in news.items()}
            continue
        first, olds, leaves = rec
        for i, (old, new) in enumerate(zip(olds, leaves, strict=True)):
            b = first + i
            # A record's old leaf is the one the block had: the previous record's new one.
            need(b not in news or news[b][-1] == old,
                 f"intent log: block {b}'s old leaf is not the new leaf of its previous record")
            committed.setdefault(b, old)
            news.setdefault(b, []).append(new)
    out = {}
    for b, leaves in news.items():
        below = floor.get(b, 0)  # the floor is new leaf number below-1, or the committed leaf
        candidates = list(reversed(leaves[max(below - 1, 0):]))
        if below == 0:
            candidates.append(committed[b])
        out[b] = (committed[b], candidates)
    return out


@dataclass
class Replica:
    """What a replica holds, read and checked as docs/format.md says."""

    plaintext: bytes  # the logical disk
    epoch: int
    recovered: int  # blocks whose leaf came from the intent log
    closed: bool  # as an orderly close leaves it: a bare intent log, a clean tree file


def read_replica(state: Path, disk: str, raw: bytes, kek: bytes, replica_name: str) -> Replica:
    """Read `raw` (a replica's bytes) of disk `disk` with the trusted state directory
    `state` and the key file's `kek`; FormatError says what does not follow the document."""
    d_state = state / "disks" / disk
    keys = (d_state / "keys").read_bytes()
    disk_id, data_key = _unwrap(keys, kek, None)
    public = (d_state / "disk.pub").read_bytes()
    need(keys[64:96] == public, "disk.pub is not the key in keys")
    anchor = read_anchor((d_state / "anchor").read_bytes())
    need(anchor.disk_id == disk_id, "anchor: another disk's id")
    need(anchor.replicas.get(replica_id(replica_name)) == 1,
         f"anchor: replica {replica_name} not listed current: {anchor.replicas}")
    size = anchor.size
    n, p = size // BLOCK, -(-(size // BLOCK) // 128)
    d = 8192 + p * BLOCK
    need(len(raw) >= d + n * BLOCK, f"replica: {len(raw)} bytes, the layout needs {d + n * BLOCK}")

    slots = [read_superblock(raw[s * BLOCK:(s + 1) * BLOCK], s, disk_id, size, public) for s in (0, 1)]
    ours = [sb for sb in slots if sb is not None and sb.epoch == anchor.epoch]
    need(len(ours) == 1, f"replica: no valid superblock of the anchor's epoch {anchor.epoch}")
    sb = ours[0]
    need(sb.root == anchor.root, "superblock: root is not the anchor's")
    need(sb.counter_high <= anchor.counter_high, "superblock: counter_high above the anchor's")
    need(all(s is None or s.epoch <= anchor.epoch + 1 for s in slots), "superblock: epoch from the future")

    # The committed leaf table: the replica's, with the leaves the log says a commit
    # that never reached the anchor may have changed put back (section 2.4).
    table = bytearray(raw[8192:d])
    log = read_intent_log((d_state / "intent.log").read_bytes())
    need(log.base_epoch <= anchor.epoch, f"intent log: base_epoch {log.base_epoch} above the anchor's")
    logged = recovered_leaves(log) if log.base_epoch == anchor.epoch else {}
    for b, (old, _) in logged.items():
        need(b < n, f"intent log: block {b} past the end")
        table[32 * b:32 * b + 32] = old
    hashes = [page_hash(i, bytes(table[i * BLOCK:(i + 1) * BLOCK])) for i in range(p)]
    levels = tree_levels(hashes)
    need(levels[-1][0] == anchor.root, "leaf table: tree root is not the anchor's")
    need(levels[sb.top_depth] == sb.top, "superblock: carried top level differs from the leaf table's")
    need(len(levels[sb.top_depth]) <= 64 and (sb.top_depth == 0 or len(levels[sb.top_depth - 1]) > 64),
         "superblock: top_depth is not the lowest level with at most 64 nodes")
    need(table[32 * n:] == bytes(len(table) - 32 * n), "leaf table: leaves past the last block")
    tree_clean = _check_tree_file(d_state / "tree", anchor, levels, log)

    def leaf(b: int) -> tuple[int, bytes, int]:
        return struct.unpack_from(">Q16sQ", table, 32 * b)  # type: ignore[return-value]

    def open_block(b: int, entry: bytes) -> bytes | None:
        version, tag, key_id = struct.unpack(">Q16sQ", entry)
        if version == 0:
            need(entry == ZERO_LEAF, f"block {b}: a version-0 leaf that is not all zero")
            return bytes(BLOCK)
        need(version != LOST, f"block {b}: leaf marked lost")
        need(version < anchor.counter_high, f"block {b}: version {version} not below counter_high")
        nonce = version.to_bytes(8, "big") + bytes(4)
        aad = disk_id + b.to_bytes(8, "big") + version.to_bytes(8, "big")
        ct = raw[d + BLOCK * b:d + BLOCK * (b + 1)]
        try:
            return AESGCM(doc_block_key(data_key, disk_id, key_id)).decrypt(nonce, ct + tag, aad)
        except InvalidTag:
            return None

    out = bytearray(n * BLOCK)
    used: dict[tuple[int, int], int] = {}
    for b in range(n):
        if b in logged:
            for entry in logged[b][1]:
                plain = open_block(b, entry)
                if plain is not None:
                    break
            need(plain is not None, f"block {b}: no candidate leaf of the intent log verifies")
            table[32 * b:32 * b + 32] = entry
        else:
            plain = open_block(b, bytes(table[32 * b:32 * b + 32]))
            need(plain is not None, f"block {b}: tag does not verify (leaf {leaf(b)})")
        assert plain is not None
        version, _, key_id = leaf(b)
        if version:
            need((key_id, version) not in used,
                 f"blocks {used.get((key_id, version))} and {b} share key_id {key_id:#x} version {version}")
            used[(key_id, version)] = b
        out[b * BLOCK:(b + 1) * BLOCK] = plain
    return Replica(bytes(out), anchor.epoch, len(logged), log.bare and tree_clean)


def _check_tree_file(path: Path, anchor: Anchor, levels: list[list[bytes]], log: IntentLog) -> bool:
    """Section 2.5: the tree file holds every level of the tree over the committed leaf
    table (`levels`): as it is if marked clean with the anchor's epoch and root, else once
    the intent log's tree records are applied (their page hashes into level 0, their
    paths re-hashed with the file's other nodes). True if it was marked clean."""
    tree = path.read_bytes()
    need(tree[:8] == b"TVBDTREE" and _crc_ok(tree, 64) and tree[68:4096] == bytes(4028), "tree: bad header")
    version, flags, pages, epoch = struct.unpack_from(">IIQQ", tree, 8)
    need(version == 1 and flags in (0, 1) and pages == len(levels[0]), f"tree: header {version, flags, pages}")
    need(len(tree) == 4096 + 32 * sum(len(level) for level in levels),
         f"tree: {len(tree)} bytes for levels {[len(level) for level in levels]}")
    empties, at, stored = [bytes(32)], 4096, []
    for level in levels:  # a node of 32 zero bytes is its level's empty node
        nodes = [tree[at + 32 * i:at + 32 * (i + 1)] for i in range(len(level))]
        stored.append([empties[-1] if h == bytes(32) else h for h in nodes])
        at += 32 * len(level)
        empties.append(hashlib.sha256(b"\x01" + empties[-1] + empties[-1]).digest())
    clean = flags == 1 and epoch == anchor.epoch and tree[32:64] == anchor.root
    if not clean:
        records = [hashes for e, hashes in log.trees if e <= anchor.epoch]
        changed = {p for hashes in records for p in hashes}
        for hashes in records:  # later records over earlier ones
            for p, h in hashes.items():
                need(p < len(stored[0]), f"intent log: tree record for page {p} past the end")
                stored[0][p] = h
        for k in range(len(stored) - 1):
            for i in sorted(changed):
                pair = [stored[k][j] if j < len(stored[k]) else empties[k] for j in (i & ~1, i | 1)]
                stored[k + 1][i // 2] = hashlib.sha256(b"\x01" + pair[0] + pair[1]).digest()
            changed = {i // 2 for i in changed}
        need(stored[-1] == [anchor.root], "tree: the file and the log's tree records do not give the anchor's root")
    for k, level in enumerate(levels):
        need(stored[k] == level, f"tree: level {k} differs from the tree over the leaf table"
             + ("" if clean else " (after the log's tree records)"))
    return clean
