"""`trustvbd verify` with memory bounded independently of the disk's size (#12.2): the leaf
table streams by, its zero extents unread, the tree folded as it goes, the (key id, version)
pairs spilled to files past a bound. Before, verify read the whole table (8 GiB per TiB)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crypt.helpers import BS, RawMemory, new_state, open_disk, pattern, run
from tests.support import TRUSTVBD
from trustvbd.blocks import crypt_verify
from trustvbd.blocks.crypt_verify import LIST_MAX, verify_replica
from trustvbd.blocks.disk_state import DiskState
from trustvbd.blocks.file import FileBackend
from trustvbd.crypt.superblock import LEAVES_PER_PAGE, Layout
from trustvbd.crypt.tree import EMPTY, HashTree, TreeBuilder

TIB = 1 << 40


def test_the_streamed_tree_equals_the_whole_tree_for_every_shape() -> None:
    rng = random.Random(5)
    for n in [*range(1, 70), 127, 128, 129, 1000]:
        hashes = [rng.randbytes(32) if rng.random() < 0.5 else EMPTY[0] for _ in range(n)]
        whole = HashTree(b"".join(hashes))
        for keep in range(len(whole.levels)):
            built = TreeBuilder(n, keep, keep_max=n)
            i = 0
            while i < n:  # runs of empty pages go in whole, as verify gives a sparse table's
                j = i
                while j < n and hashes[j] == EMPTY[0]:
                    j += 1
                if j > i:
                    built.add_empty(j - i)
                    i = j
                else:
                    built.add(hashes[i])
                    i += 1
            assert built.finish() == whole.root, (n, keep)
            assert built.kept is not None and b"".join(built.kept) == bytes(whole.levels[keep])
    with pytest.raises(ValueError, match="3 leaves, 2 were given"):
        short = TreeBuilder(3, 0)
        short.add_empty(2)
        short.finish()


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs: ext4 files stop at 16 TiB, the replica of a 16 TiB disk is larger."""
    path = Path(tempfile.mkdtemp(prefix="tvv", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# Started from a small process: a child's peak RSS (ru_maxrss) counts its parent's size at
# the fork, and the test runner's can be hundreds of MiB.
_MEASURED = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _verify_cli(pub: Path, replica: Path) -> tuple[int, dict[str, object], int]:
    """`trustvbd verify --json`: (exit status, report, peak resident memory in bytes)."""
    done = subprocess.run([sys.executable, "-c", _MEASURED, *TRUSTVBD, "verify", "--public-key",
                           str(pub), "--replica", str(replica), "--json"],
                          capture_output=True, text=True, timeout=300)
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return done.returncode, json.loads(done.stdout), peak_kib << 10


def test_verify_of_a_16_tib_sparse_replica_runs_in_bounded_memory(tmp_path: Path, shm: Path) -> None:
    size = 16 * TIB
    lay = Layout(size)
    image = shm / "r.img"
    last = lay.blocks - 1
    written = [0, 1, 5000, lay.blocks // 2, last]

    async def make() -> None:
        kek = new_state(tmp_path, size=size)
        disk = await open_disk(tmp_path, FileBackend(str(image), lay.physical_size), kek)
        for b in written:
            await disk.pwrite(b * BS, pattern(b))
        await disk.flush()
        await disk.close()

    run(make())
    pub = tmp_path / "disks" / "vm1" / "disk.pub"
    code, report, peak = _verify_cli(pub, image)
    assert code == 0 and report["ok"] is True, report
    assert report["written_blocks"] == len(written) and report["logical_size"] == size
    # The whole-table design read 128 GiB of leaves into memory for this disk.
    assert peak < 96 << 20, f"verify peaked at {peak >> 20} MiB"

    # A leaf of the last block tampered with: its group of pages under the signed top level
    # is named, with every block it covers counted, and the lists stay bounded.
    with open(image, "r+b") as f:
        f.seek(lay.leaf_offset(last) + 12)
        byte = f.read(1)[0]
        f.seek(lay.leaf_offset(last) + 12)
        f.write(bytes([byte ^ 0x20]))
    code, report, peak = _verify_cli(pub, image)
    assert code == 1 and report["ok"] is False
    sb_group = lay.leaf_pages // 64  # the signed top level has 64 nodes at this size
    assert report["bad_page_count"] == sb_group and last // LEAVES_PER_PAGE in range(
        lay.leaf_pages - sb_group, lay.leaf_pages)
    assert report["bad_block_count"] == lay.blocks - (lay.leaf_pages - sb_group) * LEAVES_PER_PAGE
    assert len(report["bad_pages"]) == len(report["bad_blocks"]) == LIST_MAX  # type: ignore[arg-type]
    assert report["bad_blocks"][0] == (lay.leaf_pages - sb_group) * LEAVES_PER_PAGE  # type: ignore[index]
    assert peak < 96 << 20, f"verify peaked at {peak >> 20} MiB"


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
def test_a_key_id_and_version_used_twice_names_both_blocks(tmp_path: Path, spill: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Past NONCE_MEMORY pairs they go to files by hash; a repeat is found all the same."""
    if spill:
        monkeypatch.setattr(crypt_verify, "NONCE_MEMORY", 16)
        monkeypatch.setattr(crypt_verify, "SPILL_WAYS", 4)
    size = 4 << 20
    lay = Layout(size)
    replica = RawMemory(lay.physical_size)

    async def go() -> None:
        kek = new_state(tmp_path, size=size)
        disk = await open_disk(tmp_path, replica, kek)
        await disk.pwrite(0, b"".join(pattern(b) for b in range(300)))
        await disk.flush()
        await disk.close()
        public = DiskState(tmp_path, "vm1").public_key()
        report = await verify_replica(replica, public)
        assert report.ok and report.written_blocks == 300, str(report)
        # Block 250 given block 7's leaf: the same nonce twice (and a page off the tree).
        at, src = lay.leaf_offset(250), lay.leaf_offset(7)
        replica.raw[at:at + 32] = replica.raw[src:src + 32]
        report = await verify_replica(replica, public)
        assert not report.ok and report.bad_pages == [1]
        assert any("2 malformed leaves, e.g. blocks [7, 250]" in p for p in report.problems), \
            report.problems
        assert 7 in report.bad_blocks and report.bad_block_count == 128 + 1
        # The same leaf a third time: three blocks, each counted once.
        at = lay.leaf_offset(3)
        replica.raw[at:at + 32] = replica.raw[src:src + 32]
        report = await verify_replica(replica, public)
        assert any("3 malformed leaves, e.g. blocks [3, 7, 250]" in p for p in report.problems)

    run(go())
