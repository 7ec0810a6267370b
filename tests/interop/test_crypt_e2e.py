"""The encryption domain end to end: what a hostile driver can and cannot do, with real clients."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import support
from tests.interop import clients
from tests.interop.proxy import RecordingProxy
from tests.support import System, disk, guest, kill_driver, payroll_config, run
from trustvbd.blocks.crypt_layer import Layout

pytestmark = pytest.mark.interop
MIB = 1 << 20
SIZE = 8 * MIB
SENTENCE = b"The payroll of Ms. Example is 123,456 a year; keep it secret. "


def config(size: int = SIZE, *more: str, **driver_at: str) -> str:
    return payroll_config(size, *more, **driver_at)


def backing(root: Path) -> Path:
    return root / "backing" / "a" / "payroll.img"


def restart_with_hr_holding_payroll(s: System) -> tuple[Path, bytes]:
    """Stop `s`, copy disk payroll's backing file (drv-a) over disk hr's on drv-b, start
    again: (hr's file, its bytes as copied), to check that nothing writes over them."""
    s.stop()
    hr_file = s.root / "backing" / "b" / "hr.img"
    shutil.copyfile(backing(s.root), hr_file)
    before = hr_file.read_bytes()
    s.start()
    return hr_file, before


def layout(size: int = SIZE) -> Layout:
    return Layout.for_size(size)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def read_ok(uri: str, offset: int, length: int, pattern: int) -> bool:
    out = run(["qemu-io", "-f", "raw", uri, "-c", f"read -P {pattern} {offset} {length}"], check=False)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout and "error" not in out.stderr.lower()


def write_pattern(uri: str, offset: int, length: int, pattern: int) -> None:
    run(["qemu-io", "-f", "raw", uri, "-c", f"write -P {pattern} {offset} {length}", "-c", "flush"])


def status(s: System) -> dict:  # type: ignore[type-arg]
    return json.loads(s.cli("status", "-c", str(s.config), "--json").stdout)  # type: ignore[no-any-return]


# -- 1. confidentiality ------------------------------------------------------------------
@contextlib.contextmanager
def recorded_peer_driver(root: Path) -> Iterator[tuple[Path, RecordingProxy, str]]:
    """nbdkit as the driver, behind a proxy that records every byte sent to it."""
    img = root / "peer.img"
    img.touch()
    os.truncate(img, layout().physical_size)
    run(["nbdkit", "-U", str(root / "nk.sock"), "-P", str(root / "nk.pid"), "file", str(img)])
    proxy = RecordingProxy(root / "px.sock", root / "nk.sock")
    try:
        yield img, proxy, f"nbd+unix:///?socket={root / 'px.sock'}"
    finally:
        proxy.close()
        os.kill(int((root / "nk.pid").read_text()), signal.SIGTERM)


def test_driver_sees_no_plaintext_no_name_no_key(short_tmp: Path) -> None:
    with recorded_peer_driver(short_tmp) as (img, proxy, driver):
        s = System(short_tmp, config(uri=driver)).start()
        src = short_tmp / "secret.txt"
        src.write_bytes((SENTENCE * (SIZE // len(SENTENCE) + 1))[:SIZE])
        run(["nbdcopy", str(src), s.uri("vm1", "payroll")])
        out = short_tmp / "back.txt"
        run(["nbdcopy", s.uri("vm1", "payroll"), str(out)])
        assert out.read_bytes() == src.read_bytes()
        s.stop()
        stored = img.read_bytes()
        sent = bytes(proxy.to_driver)
        assert len(sent) > SIZE  # the data really went through the proxy
        secrets = [SENTENCE[:16], SENTENCE[20:36], b"payroll", b"PayrollData"]
        for f in (short_tmp / "state").rglob("*"):
            if f.is_file() and f.suffix == ".key":
                secrets.append(f.read_bytes()[:16])
        for needle in secrets:
            assert needle not in stored, f"{needle!r} found in the driver's file"
            assert needle not in sent, f"{needle!r} sent to the driver"


# -- 2. integrity ------------------------------------------------------------------------
@pytest.fixture
def written(short_tmp: Path) -> System:
    s = System(short_tmp, config()).start()
    uri = s.uri("vm1", "payroll")
    for i in range(8):
        write_pattern(uri, i * MIB, MIB, 0x10 + i)
    s.stop()
    return s


def test_flipped_data_byte_fails_only_that_block(written: System) -> None:
    lay = layout()
    block = (3 * MIB) // 4096 + 5
    flip(backing(written.root), lay.data_offset(block) + 100)
    written.start()
    uri = written.uri("vm1", "payroll")
    out = run(["qemu-io", "-f", "raw", uri, "-c", f"read {block * 4096} 4096"], check=False)
    assert "Input/output error" in out.stdout + out.stderr
    # A big read over it (decrypted in place in a pooled buffer) is refused whole; big
    # reads after it, which may reuse that buffer, return only their own data.
    out = run(["qemu-io", "-f", "raw", uri, "-c", f"read {3 * MIB} {256 * 1024}"], check=False)
    assert "Input/output error" in out.stdout + out.stderr
    assert read_ok(uri, 3 * MIB, 5 * 4096, 0x13)  # the neighbours
    assert read_ok(uri, (block + 1) * 4096, 4096, 0x13)
    assert read_ok(uri, 0, MIB, 0x10)
    assert read_ok(uri, 4 * MIB, 256 * 1024, 0x14)
    assert read_ok(uri, 3 * MIB + 256 * 1024, 256 * 1024, 0x13)
    st = status(written)
    assert st["disks"][0]["integrity_events"] >= 1
    written.stop()


def test_flipped_leaf_table_byte_fails_only_covered_blocks(written: System) -> None:
    lay = layout()
    block = 6 * MIB // 4096
    flip(backing(written.root), lay.leaf_offset(block) + 3)
    written.start()
    uri = written.uri("vm1", "payroll")
    out = run(["qemu-io", "-f", "raw", uri, "-c", f"read {block * 4096} 4096"], check=False)
    assert "Input/output error" in out.stdout + out.stderr
    covered = lay.leaf_page_blocks(block)
    first, last = covered.start * 4096, covered.stop * 4096
    for i in range(8):
        if (i + 1) * MIB <= first or i * MIB >= last:
            assert read_ok(uri, i * MIB, MIB, 0x10 + i), f"MiB {i} should still read"
    written.stop()


@pytest.mark.parametrize("slot", [0, 1])
def test_flipped_superblock_byte_is_detected_and_data_still_served(written: System, slot: int) -> None:
    flip(backing(written.root), slot * 4096 + 40)
    written.start()
    uri = written.uri("vm1", "payroll")
    for i in range(8):
        assert read_ok(uri, i * MIB, MIB, 0x10 + i)
    written.stop()


def test_swapped_blocks_fail(written: System) -> None:
    lay = layout()
    path = backing(written.root)
    a, b = 10, 300
    with open(path, "r+b") as f:
        f.seek(lay.data_offset(a))
        da = f.read(4096)
        f.seek(lay.data_offset(b))
        db = f.read(4096)
        f.seek(lay.data_offset(a))
        f.write(db)
        f.seek(lay.data_offset(b))
        f.write(da)
    written.start()
    uri = written.uri("vm1", "payroll")
    for blk in (a, b):
        out = run(["qemu-io", "-f", "raw", uri, "-c", f"read {blk * 4096} 4096"], check=False)
        assert "Input/output error" in out.stdout + out.stderr
    assert read_ok(uri, 11 * 4096, 4096, 0x10)
    written.stop()


def test_block_spliced_from_another_disk_fails(short_tmp: Path) -> None:
    text = config(SIZE, disk("other", "O", ["drv-a"], size=8388608))
    s = System(short_tmp, text).start()
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x21)
    write_pattern(s.uri("vm1", "other"), 0, MIB, 0x22)
    s.stop()
    lay = layout()
    other = short_tmp / "backing" / "a" / "other.img"
    with open(other, "rb") as f:
        f.seek(lay.data_offset(7))
        block = f.read(4096)
    with open(backing(short_tmp), "r+b") as f:
        f.seek(lay.data_offset(7))
        f.write(block)
    s.start()
    out = run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", f"read {7 * 4096} 4096"], check=False)
    assert "Input/output error" in out.stdout + out.stderr
    assert read_ok(s.uri("vm1", "payroll"), 8 * 4096, 4096, 0x21)  # its neighbour is untouched
    s.stop()


# -- 3. freshness ------------------------------------------------------------------------
def test_rolled_back_replica_is_refused_with_epochs(short_tmp: Path) -> None:
    s = System(short_tmp, config()).start()
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x31)
    s.stop()
    saved = short_tmp / "saved.img"
    shutil.copyfile(backing(short_tmp), saved)
    s.start()
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x32)
    s.stop()
    shutil.copyfile(saved, backing(short_tmp))
    (short_tmp / "trustvbd.toml").write_text(s.config_text)
    out = run([sys_exe(), "-m", "trustvbd.cli", "up", "-c", str(short_tmp / "trustvbd.toml")],
              check=False, timeout=60)
    assert out.returncode == 1
    err = out.stderr
    assert "stale" in err.lower() and "drv-a" in err
    assert "epoch" in err


def test_replayed_old_block_is_detected(short_tmp: Path) -> None:
    s = System(short_tmp, config()).start()
    write_pattern(s.uri("vm1", "payroll"), 0, 64 * 1024, 0x41)
    s.stop()
    lay = layout()
    with open(backing(short_tmp), "rb") as f:
        f.seek(lay.data_offset(3))
        old_data = f.read(4096)
        f.seek(lay.leaf_offset(3))
        old_leaf = f.read(32)
    s.start()
    write_pattern(s.uri("vm1", "payroll"), 0, 64 * 1024, 0x42)
    s.stop()
    with open(backing(short_tmp), "r+b") as f:
        f.seek(lay.data_offset(3))
        f.write(old_data)
        f.seek(lay.leaf_offset(3))
        f.write(old_leaf)
    s.start()
    uri = s.uri("vm1", "payroll")
    out = run(["qemu-io", "-f", "raw", uri, "-c", f"read -P 0x41 {3 * 4096} 4096"], check=False)
    assert "Input/output error" in out.stdout + out.stderr  # never the old bytes
    s.stop()


# -- 4. never-written blocks -------------------------------------------------------------
def test_never_written_reads_zero_and_cannot_be_forged(short_tmp: Path) -> None:
    s = System(short_tmp, config()).start()
    uri = s.uri("vm1", "payroll")
    assert read_ok(uri, 0, SIZE, 0)
    write_pattern(uri, 2 * MIB, 8192, 0x51)
    s.stop()
    lay = layout()
    with open(backing(short_tmp), "r+b") as f:  # the driver "un-writes" the block
        f.seek(lay.data_offset(2 * MIB // 4096))
        f.write(bytes(4096))
        f.seek(lay.leaf_offset(2 * MIB // 4096))
        f.write(bytes(32))
    s.start()
    out = run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", f"read -P 0 {2 * MIB} 4096"], check=False)
    assert "Input/output error" in out.stdout + out.stderr
    s.stop()


# -- 5. crash consistency ----------------------------------------------------------------
class Model:
    """What each block may read as after a crash."""

    def __init__(self) -> None:
        self.durable: dict[int, bytes] = {}
        self.since: dict[int, list[bytes]] = {}

    def allowed(self, block: int) -> list[bytes]:
        return [self.durable.get(block, bytes(4096)), *self.since.get(block, [])]


def stream(uri: str, model: Model, rng: random.Random, nblocks: int, stop: threading.Event,
           connected: threading.Event) -> None:
    nbd = clients.libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    connected.set()
    try:
        while not stop.is_set():
            op = rng.random()
            if op < 0.1:
                h.flush()
                for b, contents in model.since.items():
                    if contents:
                        model.durable[b] = contents[-1]
                model.since.clear()
                continue
            block = rng.randrange(nblocks)
            count = rng.choice([1, 1, 2, 8])
            count = min(count, nblocks - block)
            data = rng.randbytes(4096 * count)
            fua = op > 0.9
            for i in range(count):
                model.since.setdefault(block + i, []).append(data[i * 4096:(i + 1) * 4096])
            h.pwrite(data, block * 4096, nbd.CMD_FLAG_FUA if fua else 0)
            if fua:
                for i in range(count):
                    model.durable[block + i] = data[i * 4096:(i + 1) * 4096]
                    model.since[block + i] = []
    except Exception:
        pass  # the crash we caused
    finally:
        try:
            h.shutdown()
        except Exception:
            pass


def check_model(uri: str, model: Model, nblocks: int) -> None:
    nbd = clients.libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for b in range(nblocks):
            got = h.pread(4096, b * 4096)  # raises nbd.Error on an integrity error
            assert got in model.allowed(b), f"block {b} reads as neither its durable nor a later write"
    finally:
        h.shutdown()


def crash_mid_stream(s: System, kind: str, model: Model, rng: random.Random, nblocks: int,
                     then: float = 0.0) -> None:
    """Start `s`, stream writes to vm1's payroll, kill -9 the domain of `kind` mid-stream and,
    up to `then` seconds later, the launcher (its domains die with it); start `s` again."""
    s.start()
    pid = next(d["pid"] for d in status(s)["domains"] if d["kind"] == kind)
    stop, connected = threading.Event(), threading.Event()
    writer = threading.Thread(target=stream, args=(s.uri("vm1", "payroll"), model, rng, nblocks,
                                                   stop, connected))
    writer.start()
    # On a loaded machine the connect alone can outlast the sleep: kill mid-stream, not before.
    assert connected.wait(30), "the writer never connected"
    time.sleep(rng.uniform(0.05, 0.6))
    if kind == "driver":
        kill_driver(pid)  # and its worker processes
    else:
        os.kill(pid, signal.SIGKILL)
    if then:
        time.sleep(rng.uniform(0.0, then))
    assert s.proc is not None
    s.proc.kill()
    s.proc.wait()
    stop.set()
    writer.join(30)
    s.proc = None
    time.sleep(0.1)
    s.start()


def now_durable(uri: str, model: Model, nblocks: int) -> None:
    """What reads back after a recovery is the durable state now (the recovery committed it)."""
    nbd = clients.libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    for b in range(nblocks):
        model.durable[b] = h.pread(4096, b * 4096)
    h.shutdown()
    model.since.clear()


def sys_exe() -> str:
    import sys

    return sys.executable


ROUNDS = int(os.environ.get("TRUSTVBD_CRASH_ROUNDS", "6"))


@pytest.mark.parametrize("victim", ["crypt", "driver"])
def test_kill_9_during_writes_many_rounds(short_tmp: Path, victim: str) -> None:
    nblocks = 256
    s = System(short_tmp, config(size=nblocks * 4096))
    model = Model()
    rng = random.Random(f"crash-{victim}")
    for _ in range(ROUNDS):
        # A killed driver restarts and the writes go on a while; then all crash.
        crash_mid_stream(s, victim, model, rng, nblocks, then=0.3 if victim == "driver" else 0.0)
        check_model(s.uri("vm1", "payroll"), model, nblocks)
        now_durable(s.uri("vm1", "payroll"), model, nblocks)
        s.stop()


def test_no_data_journal_metadata_writes_are_small(short_tmp: Path) -> None:
    """Bytes sent to the driver for a 4 MiB write + flush: data once, plus small metadata."""
    with recorded_peer_driver(short_tmp) as (_, proxy, driver):
        s = System(short_tmp, config(uri=driver)).start()
        before = len(proxy.to_driver)
        run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll"), "-c", "write -P 0x61 0 4M", "-c", "flush"])
        sent = len(proxy.to_driver) - before
        assert 4 * MIB <= sent < 4 * MIB * 1.05, f"{sent} bytes sent for 4 MiB of data"
        s.stop()



def test_integrity_events_reach_the_audit_log(written: System) -> None:
    flip(backing(written.root), layout().data_offset(9) + 7)
    written.start()

    def acm_pid() -> int | None:
        status = json.loads(written.cli("status", "-c", str(written.config), "--json").stdout)
        return next((d["pid"] for d in status["domains"] if d["kind"] == "acm"
                     and d["state"] == "running"), None)

    # The access-control domain dies and is restarted: each domain proves its role again,
    # with a roles secret the restarted domain got through a fresh pipe.
    first = acm_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while acm_pid() in (None, first):
        assert time.monotonic() < deadline, "the access-control domain was not restarted"
        time.sleep(0.2)
    run(["qemu-io", "-f", "raw", written.uri("vm1", "payroll"), "-c", f"read {9 * 4096} 4096"], check=False)
    written.stop()
    out = written.cli("audit", "-c", str(written.config), "--json").stdout
    records = [json.loads(line) for line in out.splitlines()]
    integrity = [r for r in records if r["kind"] == "integrity"]
    assert integrity and "payroll" in json.dumps(integrity[0])
    # Recorded by the encryption domain itself, under the role the launcher gave it.
    assert integrity[0]["fields"]["source"].startswith("crypt:")
    assert not [r for r in records if r["fields"].get("event") in ("record-refused", "role-refused")]
    assert written.cli("audit", "-c", str(written.config), "--verify").returncode == 0


def test_replica_holding_foreign_data_is_refused_not_overwritten(short_tmp: Path) -> None:
    img = short_tmp / "foreign.img"
    foreign = os.urandom(1 << 20) * (layout().physical_size // (1 << 20) + 1)
    img.write_bytes(foreign[:layout().physical_size])
    before = img.read_bytes()
    run(["nbdkit", "-U", str(short_tmp / "nk.sock"), "-P", str(short_tmp / "nk.pid"), "file", str(img)])
    try:
        (short_tmp / "c.toml").write_text(config(uri=f"nbd+unix:///?socket={short_tmp / 'nk.sock'}"))
        out = run([sys_exe(), "-m", "trustvbd.cli", "up", "-c", str(short_tmp / "c.toml")], check=False, timeout=60)
        assert out.returncode == 1
        assert "drv-a" in out.stderr and "not" in out.stderr.lower()
        assert img.read_bytes() == before
    finally:
        os.kill(int((short_tmp / "nk.pid").read_text()), signal.SIGTERM)


def test_a_replica_holding_another_disk_leaves_that_disk_unserved_and_the_others_served(
        short_tmp: Path) -> None:
    """Disk hr's only replica holds disk payroll (its backing file copied over): `up` used to
    refuse to start at all, saying only "holds another trustvbd disk (disk id ...)". Now it
    starts, serves payroll, lists hr as not served, and says which disk hr's driver holds
    and what to do, in its log, in status and to a guest asking for hr; hr's file is not
    written."""
    text = config(SIZE, support.driver("drv-b", "StorageB", dir="backing/b"),
                  disk("hr", "PayrollData", ["drv-b"], size=SIZE))
    s = System(short_tmp, text).start()
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x5a)
    hr_file, before = restart_with_hr_holding_payroll(s)
    assert "guest vm1 disk hr NOT SERVED (`trustvbd status` says why)" in s.lines, s.lines
    assert read_ok(s.uri("vm1", "payroll"), 0, MIB, 0x5a)
    hr = next(d for d in status(s)["disks"] if d["name"] == "hr")
    why = ("replica 'drv-b' of disk 'hr' holds another trustvbd disk (disk id ")
    assert hr["state"].startswith(f"failed: {why}"), hr
    assert "give this disk its own backing file" in hr["state"]
    assert hr["state"].endswith("; the disk it holds is 'payroll' of this system"), hr
    out = run(["qemu-io", "-f", "raw", s.uri("vm1", "payroll").replace("///payroll", "///hr"),
               "-c", "read 0 4k"], check=False)
    assert out.returncode != 0 and "the disk it holds is 'payroll'" in out.stdout + out.stderr
    err = s.stop()
    assert "disk 'hr' is not served (the other disks are): " + why in err, err
    assert hr_file.read_bytes() == before


def test_a_refused_replica_in_a_mirror_names_the_disk_it_holds_in_status_and_log(
        short_tmp: Path) -> None:
    """Disk hr mirrored on drv-a and drv-b, drv-b's file replaced by payroll's: hr is served
    from drv-a and drv-b is refused. The refusal said only "holds another trustvbd disk (disk
    id ...)" and `up` logged nothing at all; a disk with one replica said which disk of this
    system it holds. Now the mirror's refusal says so too, in status and in the log, and
    the file is not written."""
    text = config(SIZE, support.driver("drv-b", "StorageA", dir="backing/b"),
                  disk("hr", "PayrollData", ["drv-a", "drv-b"], size=SIZE))
    s = System(short_tmp, text).start()
    write_pattern(s.uri("vm1", "payroll"), 0, MIB, 0x5a)
    write_pattern(s.uri("vm1", "hr"), 0, MIB, 0x6b)
    hr_file, before = restart_with_hr_holding_payroll(s)
    assert read_ok(s.uri("vm1", "hr"), 0, MIB, 0x6b)
    hr = next(d for d in status(s)["disks"] if d["name"] == "hr")
    refused = next(r for r in hr["replicas"] if r["name"] == "drv-b")
    assert refused["state"] == "failed", hr
    assert refused["last_error"].startswith(
        "replica 'drv-b' of disk 'hr' holds another trustvbd disk (disk id "), refused
    assert refused["last_error"].endswith("; the disk it holds is 'payroll' of this system")
    err = s.stop()
    assert ("disk hr: replica drv-b refused: replica 'drv-b' of disk 'hr' holds another"
            " trustvbd disk") in err, err
    assert "the disk it holds is 'payroll' of this system" in err, err
    assert hr_file.read_bytes() == before


def test_driver_injecting_eio_never_yields_wrong_bytes(short_tmp: Path) -> None:
    """nbdkit's error filter as a faulty driver: requests fail, but nothing reads wrong, and
    once the faults stop every block reads as one of the values written to it."""
    img, inject = short_tmp / "peer.img", short_tmp / "inject"
    img.touch()
    os.truncate(img, layout().physical_size)
    run(["nbdkit", "-U", str(short_tmp / "nk.sock"), "-P", str(short_tmp / "nk.pid"), "file", str(img),
         "--filter=error", "error-rate=30%", "error=EIO", f"error-file={inject}"])
    try:
        s = System(short_tmp, config(uri=f"nbd+unix:///?socket={short_tmp / 'nk.sock'}")).start()
        nbd = clients.libnbd()
        h = nbd.NBD()
        h.connect_uri(s.uri("vm1", "payroll"))
        blocks = 32
        allowed = {b: {bytes([0xA0]) * 4096} for b in range(blocks)}
        h.pwrite(bytes([0xA0]) * 4096 * blocks, 0)
        h.flush()
        rng = random.Random(7)
        inject.touch()
        failures = 0
        for i in range(150):
            b = rng.randrange(blocks)
            if rng.random() < 0.5:
                data = bytes([i % 250 + 1]) * 4096
                allowed[b].add(data)
                try:
                    h.pwrite(data, b * 4096)
                except nbd.Error:
                    failures += 1
            else:
                try:
                    got = h.pread(4096, b * 4096)
                except nbd.Error:
                    failures += 1
                    continue
                assert bytes(got) in allowed[b], f"block {b} read as bytes never written to it"
        inject.unlink()
        assert failures > 0  # the filter really injected errors
        # A write answered before the driver failed it (write-behind) is said by this FLUSH,
        # once; its blocks read as EIO until then.
        with contextlib.suppress(nbd.Error):
            h.flush()
        for b in range(blocks):
            assert bytes(h.pread(4096, b * 4096)) in allowed[b]
        h.flush()
        h.shutdown()
        s.stop()
    finally:
        os.kill(int((short_tmp / "nk.pid").read_text()), signal.SIGTERM)


# -- AEAD threads --------------------------------------------------------------------------
def test_big_copies_are_sealed_and_opened_on_aead_threads(short_tmp: Path) -> None:
    """TRUSTVBD_AEAD_THREADS reaches the encryption domain; copies through its threads verify."""
    s = System(short_tmp, config(), env={"TRUSTVBD_AEAD_THREADS": "1"}).start()
    uri = s.uri("vm1", "payroll")
    assert status(s)["aead_threads"] == 1
    assert "1 thread(s)" in s.cli("status", "-c", str(s.config)).stdout
    src, back = short_tmp / "src.img", short_tmp / "back.img"
    for i in range(2):
        data = random.Random(i).randbytes(SIZE)
        src.write_bytes(data)
        run(["nbdcopy", "--flush", str(src), uri])
        run(["nbdcopy", uri, str(back)])
        assert back.read_bytes() == data, f"round {i}"
    err = s.stop()
    assert "Traceback" not in err, err


def mirrored_config(copies: int, size: int) -> str:
    names = [f"drv-{i}" for i in range(copies)]
    return support.config(*(support.driver(name, "StorageA", dir=f"backing/{i}")
                            for i, name in enumerate(names)),
                          disk("payroll", "PayrollData", names, size=size), guest("vm1", "Payroll"))


@pytest.mark.parametrize("copies", [2, 3])
def test_kill_9_of_the_encryption_domain_with_mirrors(short_tmp: Path, copies: int) -> None:
    """kill -9 of the encryption domain mid-stream (so mid-write or mid-commit, reaching only
    some replicas): after a restart every acknowledged write reads back, from every replica."""
    nblocks = 256
    s = System(short_tmp, mirrored_config(copies, nblocks * 4096))
    model = Model()
    rng = random.Random(f"mirror-crash-{copies}")
    for _ in range(max(2, ROUNDS // 2)):
        crash_mid_stream(s, "crypt", model, rng, nblocks)
        for _ in range(copies):  # reads go to the replicas in turn: each is checked
            check_model(s.uri("vm1", "payroll"), model, nblocks)
        now_durable(s.uri("vm1", "payroll"), model, nblocks)
        assert status(s)["integrity_events"] == [], "a replica was caught lying after a crash"
        s.stop()
