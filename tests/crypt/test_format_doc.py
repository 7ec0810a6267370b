"""docs/format.md is enough to read a disk: an independent reader written from it alone.

Uses the `cryptography` primitives directly and none of trustvbd's parsers, so a
drift between the document and the code fails here.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tests.crypt.helpers import BS, RawMemory, open_disk, pattern, run
from trustvbd.blocks.crypt_layer import CryptDisk, create_disk_state, load_kek, physical_size

SIZE = 300 * BS  # N = 300, P = 3


def _crc_ok(raw: bytes, end: int) -> bool:
    return zlib.crc32(raw[:end]) == struct.unpack_from(">I", raw, end)[0]


def _unwrap(keys: bytes, kek_bytes: bytes | None, passphrase: str | None) -> tuple[bytes, bytes]:
    assert len(keys) == 220 and keys[:8] == b"TVBDKEYS" and _crc_ok(keys, 216)
    kind, disk_id, salt = struct.unpack_from(">I", keys, 12)[0], keys[16:32], keys[32:48]
    log_n, r, p = struct.unpack_from(">III", keys, 48)
    if kind == 2:
        assert passphrase is not None
        kek = Scrypt(salt=salt, length=32, n=1 << log_n, r=r, p=p).derive(passphrase.encode())
    else:
        assert kek_bytes is not None
        kek = kek_bytes
    aad = b"trustvbd-keywrap-v1\x00" + b"data key" + b"\x00" + keys[:96]
    data_key = AESGCM(kek).decrypt(keys[96:108], keys[108:156], aad)
    return disk_id, data_key


def _tree_root(page_hashes: list[bytes]) -> bytes:
    level, depth = page_hashes, 0
    empty = [bytes(32)]
    for _ in range(64):
        empty.append(hashlib.sha256(b"\x01" + empty[-1] + empty[-1]).digest())
    while len(level) > 1:
        if len(level) % 2:
            level = [*level, empty[depth]]
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
                 for i in range(0, len(level), 2)]
        depth += 1
    return level[0]


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with no salt, written out (not the library's): section 1.2's block_key."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + t, i + 1
    return out[:length]


def doc_block_key(data_key: bytes, disk_id: bytes, key_id: int) -> bytes:
    if key_id == 0:
        return data_key
    return hkdf_sha256(data_key, b"trustvbd-block-key-v1\x00" + disk_id + key_id.to_bytes(8, "big"))


def doc_leaf(raw: bytes, b: int) -> tuple[int, bytes, int]:
    """(version, tag, key_id) of block b's leaf, section 1.1."""
    version, tag, key_id = struct.unpack_from(">Q16sQ", raw, 8192 + 32 * b)
    return version, tag, key_id


def doc_read_block(raw: bytes, d: int, b: int, data_key: bytes, disk_id: bytes,
                   counter: int) -> bytes:
    version, tag, key_id = doc_leaf(raw, b)
    if version == 0:
        assert tag == bytes(16) and key_id == 0
        return bytes(4096)
    assert version < counter
    nonce = version.to_bytes(8, "big") + bytes(4)
    aad = disk_id + b.to_bytes(8, "big") + version.to_bytes(8, "big")
    ct = raw[d + 4096 * b:d + 4096 * (b + 1)]
    return AESGCM(doc_block_key(data_key, disk_id, key_id)).decrypt(nonce, ct + tag, aad)


def test_an_independent_reader_follows_the_document(tmp_path: Path) -> None:
    async def write() -> RawMemory:
        kek = load_kek(tmp_path, passphrase="doc reader")
        create_disk_state(tmp_path, "doc", SIZE, kek)
        replica = RawMemory(physical_size(SIZE))
        disk = await open_disk(tmp_path, replica, kek, "doc")
        await disk.pwrite(0, pattern(0) + pattern(1))
        await disk.pwrite(299 * BS, pattern(299))
        await disk.trim(BS, BS)
        await disk.flush()
        await disk.close()
        return replica

    replica = run(write())
    raw = bytes(replica.raw)
    state = tmp_path / "disks" / "doc"
    disk_id, data_key = _unwrap((state / "keys").read_bytes(), None, "doc reader")
    public = (state / "disk.pub").read_bytes()
    assert (state / "keys").read_bytes()[64:96] == public

    # Section 1: layout.
    n, p = 300, 3
    d = 8192 + p * 4096
    assert len(raw) == d + n * 4096

    # Section 1.4: the newest valid superblock.
    best = None
    for slot in (0, 1):
        sb = raw[slot * 4096:(slot + 1) * 4096]
        if sb.count(0) == 4096:
            continue
        assert sb[:8] == b"TVBDSUPR" and struct.unpack_from(">II", sb, 8) == (2, 4096)
        assert sb[16:32] == disk_id
        size, loff, lpages, doff, epoch, counter = struct.unpack_from(">QQQQQQ", sb, 32)
        assert (size, loff, lpages, doff) == (SIZE, 8192, p, d) and epoch % 2 == slot
        assert sb[112:144] == hashlib.sha256(public).digest()
        Ed25519PublicKey.from_public_bytes(public).verify(
            sb[2200:2264], b"trustvbd-superblock-v1\x00" + sb[:2200])
        assert sb[2264:].count(0) == 4096 - 2264
        if best is None or epoch > best[0]:
            best = (epoch, counter, sb[80:112], struct.unpack_from(">II", sb, 144), sb)
    assert best is not None
    epoch, counter, root, (top_depth, top_count), sb = best

    # Section 1.3: the tree over leaf pages.
    pages = [raw[8192 + i * 4096:8192 + (i + 1) * 4096] for i in range(p)]
    hashes = [bytes(32) if pg == bytes(4096) else  # a page of zeros is the empty leaf
              hashlib.sha256(b"\x00" + i.to_bytes(8, "big") + pg).digest()
              for i, pg in enumerate(pages)]
    assert hashes[1] == bytes(32)  # blocks 128-255: never written
    assert _tree_root(hashes) == root
    assert (top_depth, top_count) == (0, 3) and sb[152:152 + 96] == b"".join(hashes)

    # Sections 1.1 and 1.2: leaves and blocks.
    def read_block(b: int) -> bytes:
        return doc_read_block(raw, d, b, data_key, disk_id, counter)

    key_ids = {struct.unpack_from(">Q", raw, 8192 + 32 * b + 24)[0] for b in (0, 299)}
    assert len(key_ids) == 1 and 0 not in key_ids  # one open, one random non-zero key id
    assert read_block(0) == pattern(0)
    assert read_block(1) == bytes(4096)  # trimmed
    assert raw[8192 + 32:8192 + 64] == bytes(32)
    assert read_block(299) == pattern(299)
    assert read_block(5) == bytes(4096)

    # Section 2.3: the anchor agrees with the replica.
    # Two 512-byte slots; the newest complete one (sequence number one higher) counts.
    # Version 3 records carry the replicas: a count and 17-byte (state, replica id) entries.
    whole = (state / "anchor").read_bytes()
    assert len(whole) == 1024

    def record(i: int) -> bytes | None:
        raw = whole[i * 512:(i + 1) * 512]
        if raw[:8] != b"TVBDANCR" or struct.unpack_from(">I", raw, 8)[0] != 3:
            return None
        (count,) = struct.unpack_from(">I", raw, 88)
        end = 92 + 17 * count
        return raw[:end + 4] if count <= 8 and _crc_ok(raw[:end + 4], end) else None

    complete = [r for i in range(2) if (r := record(i)) is not None]
    anchor = max(complete, key=lambda a: struct.unpack_from(">I", a, 12)[0])
    if len(complete) == 2:
        s0, s1 = (struct.unpack_from(">I", a, 12)[0] for a in complete)
        assert abs(s0 - s1) == 1
    a_epoch, a_counter = struct.unpack_from(">QQ", anchor, 40)
    assert anchor[16:32] == disk_id and (a_epoch, anchor[56:88]) == (epoch, root)
    assert a_counter == counter
    # Section 2.3.1: the one replica, "r0", is listed as current.
    assert struct.unpack_from(">I", anchor, 88)[0] == 1 and anchor[92] == 1
    assert anchor[93:109] == hashlib.sha256(b"trustvbd-replica\x00r0").digest()[:16]

    # Section 2.4: after an orderly close, the intent log is a bare header for that epoch.
    log = (state / "intent.log").read_bytes()
    assert len(log) == 32 and log[:8] == b"TVBDINTL" and _crc_ok(log, 28)
    assert struct.unpack_from(">IIQ", log, 8) == (2, 0, epoch)

    # Section 2.5: the tree file, every level, marked clean with the anchor's root.
    tree = (state / "tree").read_bytes()
    counts = [3, 2, 1]
    assert len(tree) == 4096 + 32 * sum(counts)
    assert tree[:8] == b"TVBDTREE" and struct.unpack_from(">IIQQ", tree, 8) == (1, 1, p, epoch)
    assert tree[32:64] == root and _crc_ok(tree, 64) and tree[68:4096] == bytes(4028)
    empty = [bytes(32)]
    for _ in range(3):
        empty.append(hashlib.sha256(b"\x01" + empty[-1] + empty[-1]).digest())
    level, at = hashes, 4096
    for k, count in enumerate(counts):
        stored = [tree[at + 32 * i:at + 32 * (i + 1)] for i in range(count)]
        assert [empty[k] if h == bytes(32) else h for h in stored] == level, k
        at += 32 * count
        if count == 1:
            assert level == [root]  # the top level holds the root
            break
        padded = level + [empty[k]] * (len(level) % 2)
        level = [hashlib.sha256(b"\x01" + padded[i] + padded[i + 1]).digest()
                 for i in range(0, len(padded), 2)]


def test_intent_records_follow_the_document(tmp_path: Path) -> None:
    async def go() -> None:
        kek = load_kek(tmp_path)
        create_disk_state(tmp_path, "doc", SIZE, kek)
        disk = await open_disk(tmp_path, RawMemory(physical_size(SIZE)), kek, "doc")
        await disk.pwrite(10 * BS, pattern(10) + pattern(11))
        await disk.settle()  # its record is written before its ciphertext leaves
        log = (tmp_path / "disks" / "doc" / "intent.log").read_bytes()
        rec = log[32:32 + 148]
        assert rec[:4] == b"IREC" and struct.unpack_from(">IQ", rec, 4) == (2, 10)
        assert rec[16:80] == bytes(64)  # old leaves: never written
        new = rec[80:144]
        assert bytes(disk._leaves.get(10, 12)) == new
        assert _crc_ok(rec, 144)
        assert len(log) % 4096 == 0 and log[32 + 148:] == bytes(len(log) - 180)  # zeroed room
        await disk.flush()  # the log stands for the commit: a flush mark follows the record
        log = (tmp_path / "disks" / "doc" / "intent.log").read_bytes()
        mark = log[32 + 148:32 + 148 + 20]
        assert mark[:4] == b"IREC" and struct.unpack_from(">IQ", mark, 4) == (0, 0)
        assert _crc_ok(mark, 16) and log[200:] == bytes(len(log) - 200)
        await disk.commit()  # the log is reset and carries page 0's hash (a TREC record)
        log = (tmp_path / "disks" / "doc" / "intent.log").read_bytes()
        epoch = struct.unpack_from(">Q", log, 16)[0]
        rec = log[32:32 + 60]
        assert log[92:] == bytes(len(log) - 92)
        assert rec[:4] == b"TREC" and struct.unpack_from(">IQQ", rec, 4) == (1, epoch, 0)
        page = bytes(disk._leaves.page(0))
        assert rec[24:56] == hashlib.sha256(b"\x00" + bytes(8) + page).digest()
        assert len(rec) == 60 and _crc_ok(rec, 56)
        await disk.close()

    run(go())


def doc_dirty_map(raw: bytes, n: int) -> tuple[int, int, set[int], int]:
    """Section 2.7, any version: (version, since, blocks, flags) of a map for N = n blocks."""
    assert raw[:8] == b"TVBDBHND" and _crc_ok(raw, len(raw) - 4)
    version, k, since, count = struct.unpack_from(">IIQQ", raw, 8)
    assert count == n
    blocks: set[int] = set()
    flags = 0
    if version == 1:
        assert k == 0 and len(raw) == 32 + -(-n // 8) + 4
        blocks = {b for b in range(n) if raw[32 + b // 8] >> (b % 8) & 1}
        return version, since, blocks, flags
    at = 32
    if version == 3:
        (flags,) = struct.unpack_from(">I", raw, 32)
        assert flags & ~1 == 0
        at = 36
    else:
        assert version == 2
    assert len(raw) == at + 16 * k + 4
    end = -1  # the writer never lets two runs touch
    for i in range(k):
        first, length = struct.unpack_from(">QQ", raw, at + 16 * i)
        assert length >= 1 and first > end and first + length <= n
        blocks.update(range(first, first + length))
        end = first + length
    return version, since, blocks, flags


def doc_v2_map(since: int, n: int, runs: list[tuple[int, int]]) -> bytes:
    """A version-2 map (runs, no flags) written from section 2.7, as the sixth session did."""
    body = b"TVBDBHND" + struct.pack(">IIQQ", 2, len(runs), since, n)
    body += b"".join(struct.pack(">QQ", first, count) for first, count in runs)
    return body + struct.pack(">I", zlib.crc32(body))


def doc_v1_map(since: int, n: int, blocks: set[int]) -> bytes:
    """A version-1 map (a bitmap) written from section 2.7, as trustvbd wrote them before."""
    bits = bytearray(-(-n // 8))
    for b in blocks:
        bits[b // 8] |= 1 << (b % 8)
    body = b"TVBDBHND" + struct.pack(">IIQQ", 1, 0, since, n) + bytes(bits)
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize("old", [1, 2])
def test_dirty_maps_follow_the_document_and_older_versions_still_open(tmp_path: Path,
                                                                      old: int) -> None:
    """A replica that fails writes is behind: its map (version 3: runs, flags) reads as the
    document says. A version-1 map (a bitmap) or a version-2 map (runs, no flags) in its
    place opens the disk and is what the replica is resynced for."""
    from tests.crypt.test_mirror import Faulty, settle

    async def go() -> None:
        kek = load_kek(tmp_path)
        create_disk_state(tmp_path, "doc", SIZE, kek)
        mems = [RawMemory(physical_size(SIZE)) for _ in range(2)]
        links = [Faulty(m) for m in mems]

        async def reopen() -> CryptDisk:
            return await CryptDisk.open_mirrored(tmp_path, "doc", [("a", links[0]), ("b", links[1])],
                                                 kek)
        disk = await reopen()
        await disk.pwrite(0, pattern(0))
        await disk.close()  # a full commit: nothing written since it when b leaves
        disk = await reopen()
        since = disk._commits.epoch
        links[1].fail_writes = True
        for b0, n in ((5, 3), (100, 1), (299, 1)):
            await disk.pwrite(b0 * BS, b"".join(pattern(b, 1) for b in range(b0, b0 + n)))
        await disk.flush()  # a full commit: b's map, then the anchor listing it as behind
        path = tmp_path / "disks" / "doc" / "behind" / "b"
        raw = path.read_bytes()
        assert doc_dirty_map(raw, 300) == (3, since, {5, 6, 7, 100, 299}, 0)
        assert len(raw) == 40 + 3 * 16
        await disk.close()

        path.write_bytes(doc_v1_map(since, 300, {5, 6, 7, 42, 100, 299}) if old == 1 else
                         doc_v2_map(since, 300, [(5, 3), (42, 1), (100, 1), (299, 1)]))
        links[1].fail_writes = False
        writes = links[1].writes
        disk = await reopen()
        await settle(disk)
        r = disk.replicas.replicas[1]
        assert r.resync_total == 6 and r.resync_done == 6, r.status()
        assert links[1].writes - writes < 12  # those blocks, and the joining commit
        await disk.close()
        assert not path.exists()  # current again: the map is gone
        assert bytes(mems[0].raw) == bytes(mems[1].raw)

    run(go())
