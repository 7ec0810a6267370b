"""The native block codec (via crypt.aead) against the independent reader of docs/format.md.

Random runs of blocks (random keys, disk ids, key ids, block numbers, versions)
sealed natively are opened by the document's recipe with `cryptography`'s AESGCM
and the hand-written HKDF of test_format_doc; blocks sealed by that recipe are
opened natively. Then the refusals: tampering, wrong key, disk, block or version.
Last, a random workload through a whole disk, read back by the document's reader.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.crypt.helpers import RawMemory, open_disk, run
from tests.crypt.test_format_doc import _unwrap, doc_block_key, doc_leaf, doc_read_block
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import Layout, create_disk_state, load_kek, physical_size
from trustvbd.crypt.aead import BlockCipher as BlockCodec

BS, LEAF = 4096, 32
POISON = 2**64 - 1


def doc_seal(key: bytes, disk_id: bytes, key_id: int, block: int, version: int, plain: bytes) -> tuple[bytes, bytes]:
    """(ciphertext, leaf) of one block, from docs/format.md section 1.1-1.2 alone."""
    nonce = version.to_bytes(8, "big") + bytes(4)
    aad = disk_id + block.to_bytes(8, "big") + version.to_bytes(8, "big")
    sealed = AESGCM(doc_block_key(key, disk_id, key_id)).encrypt(nonce, plain, aad)
    return sealed[:-16], struct.pack(">Q16sQ", version, sealed[-16:], key_id)


def doc_open(key: bytes, disk_id: bytes, block: int, ct: bytes, leaf: bytes) -> bytes:
    version, tag, key_id = struct.unpack(">Q16sQ", leaf)
    if version == 0:
        return bytes(BS)
    nonce = version.to_bytes(8, "big") + bytes(4)
    aad = disk_id + block.to_bytes(8, "big") + version.to_bytes(8, "big")
    return AESGCM(doc_block_key(key, disk_id, key_id)).decrypt(nonce, ct + tag, aad)


@pytest.mark.parametrize("seed", range(6))
def test_native_and_document_agree_both_ways(seed: int) -> None:
    rng = random.Random(seed)
    key, disk_id = rng.randbytes(32), rng.randbytes(16)
    key_id = rng.choice([0, 1, rng.getrandbits(64) or 1, 2**64 - 1])
    n = rng.choice([1, 2, 7, 64, 65])
    b0 = rng.choice([0, rng.getrandbits(40), 2**64 - 1 - n])
    v0 = rng.choice([1, rng.getrandbits(48), POISON - n])
    plain = rng.randbytes(n * BS)
    codec = BlockCodec(key, disk_id, key_id)

    ct, leaves = codec.seal(b0, v0, plain)
    assert len(ct) == n * BS and len(leaves) == n * LEAF
    for i in range(n):
        leaf = leaves[i * LEAF:(i + 1) * LEAF]
        want_ct, want_leaf = doc_seal(key, disk_id, key_id, b0 + i, v0 + i, plain[i * BS:(i + 1) * BS])
        assert (ct[i * BS:(i + 1) * BS], leaf) == (want_ct, want_leaf)
        assert doc_open(key, disk_id, b0 + i, ct[i * BS:(i + 1) * BS], leaf) == plain[i * BS:(i + 1) * BS]

    # The other way, with blocks of mixed key ids (older opens) and unwritten ones.
    doc_ct, doc_leaves = bytearray(), bytearray()
    for i in range(n):
        kid = rng.choice([0, key_id, rng.getrandbits(64)])
        if rng.random() < 0.2:
            doc_ct += rng.randbytes(BS)
            doc_leaves += bytes(LEAF)  # never written: reads as zeros whatever the replica holds
            continue
        c, leaf = doc_seal(key, disk_id, kid, b0 + i, rng.randrange(1, POISON), plain[i * BS:(i + 1) * BS])
        doc_ct += c
        doc_leaves += leaf
    got, bad = codec.open(b0, doc_ct, doc_leaves)
    assert bad == []
    for i in range(n):
        want = bytes(BS) if doc_leaves[i * LEAF:i * LEAF + 8] == bytes(8) else plain[i * BS:(i + 1) * BS]
        assert got[i * BS:(i + 1) * BS] == want


def test_every_kind_of_tampering_is_refused_block_by_block() -> None:
    key, disk_id, n = bytes(range(32)), bytes(range(16)), 8
    codec = BlockCodec(key, disk_id, 77)
    plain = random.Random(1).randbytes(n * BS)
    sealed, sealed_leaves = codec.seal(100, 5, plain)
    ct, leaves = bytearray(sealed), bytearray(sealed_leaves)
    ct[1 * BS + 99] ^= 1  # ciphertext bit
    leaves[2 * LEAF + 8] ^= 1  # tag
    leaves[3 * LEAF + 7] ^= 1  # version: another nonce and AAD
    leaves[4 * LEAF + 31] ^= 1  # key id: another key
    leaves[5 * LEAF:5 * LEAF + 8] = POISON.to_bytes(8, "big")  # a leaf lost
    ct[6 * BS:7 * BS], ct[7 * BS:8 * BS] = ct[7 * BS:8 * BS], ct[6 * BS:7 * BS]  # swapped blocks
    got, bad = codec.open(100, memoryview(ct), memoryview(leaves))
    assert bad == [1, 2, 3, 4, 5, 6, 7]
    assert got[:BS] == plain[:BS]
    assert got[BS:] == bytes((n - 1) * BS)  # failures read as zeros, never partial plaintext
    for wrong in (BlockCodec(bytes(32), disk_id, 77), BlockCodec(key, bytes(16), 77)):
        assert wrong.open(100, ct[:BS], leaves[:LEAF])[1] == [0]  # another key or disk
    assert codec.open(101, ct[:BS], leaves[:LEAF])[1] == [0]  # moved to another block


def test_opening_in_place_agrees_with_open_and_leaves_failed_blocks_as_zeros() -> None:
    key, disk_id, n = bytes(range(32)), bytes(range(16)), 6
    codec = BlockCodec(key, disk_id, 9)
    plain = random.Random(2).randbytes(n * BS)
    ct, leaves = codec.seal(40, 3, plain)
    tampered = bytearray(ct)
    tampered[2 * BS + 5] ^= 0x40  # block 2's ciphertext
    bad_leaves = bytearray(leaves)
    bad_leaves[4 * LEAF + 20] ^= 1  # block 4's tag
    bad_leaves[5 * LEAF:5 * LEAF + 8] = bytes(8)  # block 5 never written: zeros, not a failure
    want, want_bad = codec.open(40, tampered, bad_leaves)
    data = bytearray(tampered)
    assert codec.open_in_place(40, data, bad_leaves) == want_bad == [2, 4]
    assert data == want
    assert data[:2 * BS] + data[3 * BS:4 * BS] == plain[:2 * BS] + plain[3 * BS:4 * BS]
    # Failed blocks hold zeros, not their ciphertext nor a partial decryption.
    assert data[2 * BS:3 * BS] + data[4 * BS:] == bytes(3 * BS)
    # In a window of a bigger buffer: only the window changes.
    big = bytearray(b"<" * BS) + bytearray(ct) + bytearray(b">" * BS)
    assert codec.open_in_place(40, memoryview(big)[BS:-BS], leaves) == []
    assert big == b"<" * BS + plain + b">" * BS
    # The leaves may even be read from the buffer being opened (they are copied first).
    both = bytearray(ct[:BS]) + bytearray(leaves[:LEAF])
    assert codec.open_in_place(40, memoryview(both)[:BS], memoryview(both)[BS:]) == []
    assert both[:BS] == plain[:BS]


def test_opening_in_place_refuses_buffers_it_may_not_write_and_leaves_them_untouched() -> None:
    codec = BlockCodec(bytes(32), bytes(16), 1)
    ct, leaves = codec.seal(0, 1, bytes(2 * BS))
    with pytest.raises(ValueError, match="read-only"):
        codec.open_in_place(0, ct, leaves)  # type: ignore[arg-type] # bytes: what a caller might try
    scattered = bytearray(4 * BS)
    with pytest.raises(ValueError, match="not contiguous"):
        codec.open_in_place(0, memoryview(scattered)[::2], leaves)
    odd = bytearray(ct) + b"x"
    with pytest.raises(ValueError, match="whole number"):
        codec.open_in_place(0, odd, leaves)
    assert odd == ct + b"x"
    short = bytearray(ct)
    with pytest.raises(ValueError, match="leaves"):
        codec.open_in_place(0, short, leaves[:LEAF])
    assert short == ct


def test_a_seal_copies_its_plaintext_into_a_new_object_of_its_own() -> None:
    """The plaintext is copied into a new bytes object and sealed there (no zero fill
    first; a scattered buffer is gathered): the same ciphertext from any kind of buffer,
    the caller's buffer unchanged, a new object each time."""
    codec = BlockCodec(bytes(range(32)), bytes(16), 1)
    plain = bytearray(random.Random(7).randbytes(3 * BS))
    kept = bytes(plain)
    want = codec.seal(9, 4, kept)
    scattered = bytearray(6 * BS)
    scattered[::2] = plain
    for kind in (plain, memoryview(plain), memoryview(scattered)[::2]):
        ct, leaves = codec.seal(9, 4, kind)
        assert (ct, leaves) == want and ct is not want[0]
        assert codec.open(9, ct, leaves) == (kept, [])
    assert plain == kept
    assert codec.seal(0, 1, b"") == (b"", b"")


def test_bad_requests_get_a_clear_error() -> None:
    codec = BlockCodec(bytes(32), bytes(16), 1)
    with pytest.raises(ValueError, match="whole number of 4096-byte blocks"):
        codec.seal(0, 1, bytes(100))
    with pytest.raises(ValueError, match="outside"):
        codec.seal(0, 0, bytes(BS))
    with pytest.raises(ValueError, match="outside"):
        codec.seal(0, POISON, bytes(BS))
    with pytest.raises(ValueError, match="need 64 bytes of leaves"):
        codec.open(0, bytes(2 * BS), bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        BlockCodec(bytes(31), bytes(16), 0)
    with pytest.raises(OverflowError):
        codec.seal(0, -1, bytes(BS))


@pytest.mark.parametrize("threads", [0, 1])
def test_a_random_workload_reads_back_through_the_document(tmp_path: Path, threads: int) -> None:
    """Random writes, zeroes and trims through a CryptDisk (inline, or big requests on an AEAD
    thread), then every block read from the replica bytes by docs/format.md's reader."""
    rng = random.Random(threads)
    size = 300 * BS
    model = bytearray(size)

    async def workload() -> RawMemory:
        kek = load_kek(tmp_path, passphrase="differential")
        create_disk_state(tmp_path, "diff", size, kek)
        replica = RawMemory(physical_size(size))
        pool = AeadPool(threads)
        try:
            for _round in range(2):  # two opens: two key ids among the leaves
                disk = await open_disk(tmp_path, replica, kek, "diff", aead=pool)
                for _ in range(40 if _round == 0 else 6):
                    n = rng.choice([1, 3, 32, 40, 100])
                    b = rng.randrange(0, 300 - n + 1)
                    if rng.random() < 0.15:
                        await disk.trim(b * BS, n * BS)
                        model[b * BS:(b + n) * BS] = bytes(n * BS)
                        continue
                    data = rng.randbytes(n * BS)
                    await disk.pwrite(b * BS, data)
                    model[b * BS:(b + n) * BS] = data
                assert bytes(await disk.pread(0, size)) == model
                await disk.flush()
                await disk.close()
            assert (pool.jobs_offloaded > 0) == bool(threads)
        finally:
            await pool.close()
        return replica

    raw = bytes(run(workload()).raw)
    disk_id, data_key = _unwrap((tmp_path / "disks" / "diff" / "keys").read_bytes(), None, "differential")
    lay = Layout(size)
    key_ids = set()
    for b in range(300):
        key_ids.add(doc_leaf(raw, b)[2])
        got = doc_read_block(raw, lay.data_start, b, data_key, disk_id, POISON)
        assert got == model[b * BS:(b + 1) * BS], f"block {b}"
    assert len(key_ids - {0}) == 2  # written under both opens' keys
