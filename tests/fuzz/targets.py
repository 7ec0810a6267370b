"""Fuzz targets: each feeds one parser or protocol core arbitrary bytes.

A target returns normally or raises one of the exceptions its parser documents
(`Target.expected`); anything else is a crash. The same targets run under
atheris (`make fuzz`, tests/fuzz/run.py) and under hypothesis with the saved
corpus as explicit examples (tests/fuzz/test_fuzz.py, in `make test`).

Checksums and signatures would stop a byte-level fuzzer at the first check, so
where a format has one, the first input byte's low bit asks the target to fix
it up (re-sign with a fixed test key, recompute CRC-32s) before parsing: both
the "checksum wrong" and the "checksum right, content hostile" paths get fuzzed.
"""

from __future__ import annotations

import atexit
import shutil
import struct
import tempfile
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.durability.powercut import NO_SYNC
from trustvbd._native import NbdClientEngine
from trustvbd.acm import audit, audit_format, audit_read
from trustvbd.acm.model import PolicyError
from trustvbd.acm.toml_loader import load_toml
from trustvbd.acm.xml_loader import policy_from_xml
from trustvbd.blockdev import BlockError, Buffer
from trustvbd.blocks import anchor_file, tree_file
from trustvbd.blocks.disk_state import Anchor, DiskState, TrustedStateError
from trustvbd.blocks.file import MemoryBackend
from trustvbd.blocks.intent_log import IntentLog
from trustvbd.crypt import keys as keys_mod
from trustvbd.crypt import superblock as sb
from trustvbd.crypt.sign import Signer
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.client_handshake import Handshake, handshake
from trustvbd.nbd.core import ProtocolCore, Role
from trustvbd.nbd.exports import Export, PeerInfo, StaticExports
from trustvbd.nbd.server_handshake import GREETING_FLAGS, HandshakeEnded, Negotiated, negotiate

# A fixed test identity so fuzzed superblocks can be re-signed and verified.
SIGNER = Signer(bytes(range(32)))
DISK_ID = bytes(range(100, 116))
KEY_FILE_KEK = keys_mod.Kek(keys_mod.KEK_FILE, bytes(32), "fuzz key file")
PASSPHRASE_KEK = keys_mod.Kek.from_passphrase("fuzz")
EXPORT_SIZE = 64 * 1024

_scratch: Path | None = None


def scratch() -> Path:
    """A private directory for targets that parse files (one per process)."""
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix="tvbd-fuzz-"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _fix(data: bytes) -> tuple[bool, bytes]:
    """(whether to fix up checksums, the rest of the input)."""
    return bool(data[:1] and data[0] & 1), data[1:]


def _with_crc(raw: bytes | bytearray, at: int) -> bytes:
    """`raw` with the CRC-32 of bytes [0, at) stored big-endian at `at`."""
    out = bytearray(raw)
    if len(out) >= at + 4:
        struct.pack_into(">I", out, at, zlib.crc32(out[:at]))
    return bytes(out)


# ---------------------------------------------------------------- trusted-state parsers

def fuzz_superblock(data: bytes) -> None:
    flag, raw = data[:1], data[1:]
    bits = flag[0] if flag else 0
    slot = bytearray(raw[:sb.SLOT_SIZE].ljust(sb.SLOT_SIZE, b"\0"))
    if bits & 1:  # re-sign so the checks after the signature are reached
        slot[sb._SIG_OFFSET:sb._END] = SIGNER.sign(sb._CONTEXT, slot[:sb._SIG_OFFSET])
    result = sb.parse(bytes(slot), (bits >> 1) & 1, SIGNER.public_key,
                      None if bits & 4 else DISK_ID)
    assert isinstance(result.kind, sb.SlotKind)


def _fix_anchor_slot(slot: bytes) -> bytes:
    end = 76  # the fixed record (versions 2 and 3) ...
    if slot[12:16] == b"\0\0\0\x03" and len(slot) >= 80:  # ... then the replica list
        end += 4 + 17 * min(int.from_bytes(slot[76:80], "big"), 8)
    return _with_crc(slot, end)


def fuzz_anchor(data: bytes) -> None:
    """The anchor file in any form: one 92-byte record (version 1), or two 512-byte slots."""
    fix, raw = _fix(data)
    if fix and len(raw) == 2 * anchor_file.SLOT:
        raw = _fix_anchor_slot(raw[:512]) + _fix_anchor_slot(raw[512:])
    elif fix:
        raw = _with_crc(raw, len(raw) - 4) if len(raw) >= 4 else raw
    state = DiskState(scratch(), "fuzz")
    state.dir.mkdir(parents=True, exist_ok=True)
    state.anchor_path.write_bytes(raw)
    anchor = state.read_anchor()
    assert isinstance(anchor, Anchor) and len(anchor.root) == 32


def _fix_intent_log(raw: bytes) -> bytes:
    out = bytearray(_with_crc(raw, 28))
    off = 32
    while off + 16 <= len(out):
        (count,) = struct.unpack_from(">I", out, off + 4)
        end = off + 16 + (40 if out[off:off + 4] == b"TREC" else 64) * count + 4
        if end > len(out):
            break
        struct.pack_into(">I", out, end - 4, zlib.crc32(out[off:end - 4]))
        off = end
    return bytes(out)


def fuzz_intent_log(data: bytes) -> None:
    fix, raw = _fix(data)
    if fix:
        raw = _fix_intent_log(raw)
    path = scratch() / "intent.log"
    path.write_bytes(raw)
    log = IntentLog(path)
    try:
        got = log.read()
    finally:
        log.close()
    for rec in got.records:
        assert len(rec.old) == len(rec.new) and len(rec.old) % 32 == 0
    for tree in got.trees:
        assert all(len(h) == 32 for h in tree.hashes.values())


def fuzz_tree(data: bytes) -> None:
    """A tree file of byte 1 pages: only TreeFileError, whatever the nodes or header say."""
    fix, raw = _fix(data)
    pages = max(1, raw[0]) if raw else 1
    body = raw[1:]
    if fix:  # the right length and a header CRC: get to the nodes
        size = tree_file.file_size(pages)
        body = _with_crc((body + bytes(size))[:size], 64)
    path = scratch() / "tree"
    path.write_bytes(body)
    root = body[32:64] if len(body) >= 64 else bytes(32)
    try:
        tree = tree_file.TreeFile(path, "fuzz", pages, root)
    except tree_file.TreeFileError:
        return
    try:
        for step in (tree.header, lambda: [tree.leaf(p) for p in range(pages)],
                     lambda: tree.redo({pages - 1: bytes(range(32))}), tree.nonempty_pages):
            try:
                step()
            except tree_file.TreeFileError:
                pass
    finally:
        tree.close()


def fuzz_keys(data: bytes) -> None:
    fix, raw = _fix(data)
    if fix:
        raw = _with_crc(raw, keys_mod.KEYS_FILE_SIZE - 4)
    kind, log_n, r = (struct.unpack_from(">I", raw, off)[0] if len(raw) >= off + 4 else 0
                      for off in (12, 48, 52))
    cost = 128 * r << min(log_n, 64)
    # Run scrypt for real unless the file asks for a legal but slow one (over 16 MiB):
    # nonsense parameters must be refused before scrypt sees them.
    slow = log_n <= 20 and cost > 16 << 20  # 20: the largest log2 N docs/format.md allows
    if kind == keys_mod.KEK_PASSPHRASE and not slow:
        keys_mod.open_keys(raw, PASSPHRASE_KEK, "fuzzed keys")
    disk_id, public_key, kind = keys_mod.read_public(raw, "fuzzed keys")
    assert len(disk_id) == 16 and len(public_key) == 32
    if kind == keys_mod.KEK_FILE:
        keys_mod.open_keys(raw, KEY_FILE_KEK, "fuzzed keys")


def fuzz_audit_log(data: bytes) -> None:
    """The log and its head file, both attacker-written: verify, then open to append."""
    head_len = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
    head, log = data[2:2 + head_len], data[2 + head_len:]
    d = scratch() / "audit"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    path = d / "audit.log"
    path.write_bytes(log)
    if head:
        audit_format.head_path(path).write_bytes(head)
    problems = audit_read.verify(path)
    assert all(isinstance(x, str) for x in problems)
    writer = audit.AuditLog(path, ops=NO_SYNC)
    writer.close()


def fuzz_xml_policy(data: bytes) -> None:
    policy_from_xml(data, "fuzz.xml")


def fuzz_toml_policy(data: bytes) -> None:
    path = scratch() / "policy.toml"
    path.write_bytes(data)
    load_toml(path)


# ---------------------------------------------------------------- NBD cores

class _Suspend:
    def __await__(self) -> Generator[None, None, None]:
        yield None


class _Inbox:
    """Events for a coroutine stepped by hand: an empty inbox suspends it."""

    def __init__(self) -> None:
        self.events: deque[m.Event] = deque()

    async def next_event(self) -> m.Event:
        while not self.events:
            await _Suspend()
        return self.events.popleft()


def _step(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run `coro` until it waits for an event: (finished, result)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, None


def _chunks(data: bytes) -> Iterator[bytes]:
    """Cut the peer's bytes as a network would, at places the first byte decides."""
    if not data:
        return
    seed, rest = data[0], data[1:]
    sizes = (1, 3, 7, 16, 64, 512, 4096, 1 << 20)
    i = 0
    while i < len(rest):
        n = sizes[seed % len(sizes)]
        seed = (seed * 73 + 41) & 0xFF
        yield rest[i:i + n]
        i += n


def fuzz_nbd_server(data: bytes) -> None:
    """A hostile client against the server core, its option haggling and its native
    transmission phase (parse, checks, reply framing)."""
    core = ProtocolCore(Role.SERVER)
    core.send(m.Greeting(GREETING_FLAGS))
    backend = MemoryBackend(EXPORT_SIZE)
    provider = StaticExports([Export("disk", backend, "fuzz disk")])
    inbox = _Inbox()
    coro = negotiate(core, inbox.next_event, lambda _b: None, provider, PeerInfo("fuzz", "memory"))
    negotiated: Negotiated | None = None
    try:
        for chunk in _chunks(data):
            core.receive_data(chunk)
            while negotiated is None and (ev := core.next_event()) is not None:
                inbox.events.append(ev)
                _, negotiated = _step(coro)
            replies = []
            while core.requests:
                typ, _flags, cookie, offset, length, payload, refusal, piece = core.requests.popleft()
                if typ == p.Cmd.DISC:
                    return
                if piece is False:
                    continue  # a piece of a long WRITE: one reply after the last
                replies.append(_serve(backend, typ, cookie, offset, length, payload, refusal,
                                      piece))
            if replies:
                b"".join(bytes(part) for part in core.server_session().frame(replies))
        core.receive_eof()
        while core.next_event() is not None:
            pass
    finally:
        coro.close()


def _serve(backend: MemoryBackend, typ: int, cookie: int, offset: int, length: int,
           payload: Buffer | None, refusal: tuple[int, str] | None,
           piece: bool | None) -> tuple[int, int, str, int, Buffer | None]:
    """One request against the memory backend, as the reply tuple the server frames."""
    assert piece is None or typ == p.Cmd.WRITE  # only the last piece of a long WRITE here
    if refusal is not None:
        return cookie, refusal[0], refusal[1], 0, None
    assert offset + length <= EXPORT_SIZE, "a request past the export passed the checks"
    if typ == p.Cmd.READ:
        return cookie, 0, "", offset, bytes(backend._data[offset:offset + length])
    if typ == p.Cmd.WRITE:
        assert payload is not None and len(payload) == length
        backend._data[offset:offset + length] = payload
    return cookie, 0, "", 0, None


def fuzz_nbd_client(data: bytes) -> None:
    """A hostile server against the client: its handshake checks (ProtocolCore), then
    the native transmission engine, fed the replies as a TLS stream feeds it.

    Input: flags (1 byte; bit 7 = no structured replies), the length of the
    handshake part (2 bytes), the handshake part, then the replies: a server
    cannot answer requests the client has not sent yet.
    """
    structured = not (data[:1] and data[0] & 0x80)
    split = 3 + int.from_bytes(data[1:3], "big")
    core = ProtocolCore(Role.CLIENT)
    inbox = _Inbox()

    def send(msg: m.Event) -> None:
        core.send(msg)

    coro = handshake(core, inbox.next_event, send, "disk", structured_replies=structured)
    result: Handshake | None = None
    try:
        for chunk in _chunks(data[:1] + data[3:split]):
            core.receive_data(chunk)
            while result is None and (ev := core.next_event()) is not None:
                inbox.events.append(ev)
                _, result = _step(coro)
        if result is None:
            return
    finally:
        coro.close()
    engine = NbdClientEngine(None, result.structured)
    reads = _send_requests(engine)
    answered: set[int] = set()
    for chunk in _chunks(data[:1] + data[split:]):
        done, broken, *_ = engine.feed(chunk)
        for cookie, _error, message in done:
            assert 1 <= cookie <= 5 and cookie not in answered and len(message) <= 4096
            answered.add(cookie)
        if broken is not None:
            assert engine.pending == 5 - len(answered)
            raise p.ProtocolError(broken)
    assert engine.pending == 5 - len(answered)
    assert all(len(b) == 4096 for b in reads)


def _send_requests(engine: NbdClientEngine) -> list[bytearray]:
    """What a client does once connected: reads into its own buffers, a write, a flush."""
    bufs = [bytearray(4096), bytearray(4096), bytearray(512)]
    engine.request(p.Cmd.READ, 0, 0, 4096, None, bufs[0])
    engine.request(p.Cmd.WRITE, 0, 4096, 4096, bytes(4096))
    engine.request(p.Cmd.READ, 0, 8192, 4096, None, bufs[1])
    engine.request(p.Cmd.FLUSH, 0, 0, 0)
    engine.request(p.Cmd.READ, 0, 512, 512, None, bufs[2])
    engine.take_output()
    return bufs[:2]


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    expected: tuple[type[BaseException], ...]  # the parser's documented refusals
    max_len: int  # longest input worth trying (libFuzzer -max_len)


TARGETS = {t.name: t for t in [
    Target("superblock", fuzz_superblock, (), 1 + sb.SLOT_SIZE),
    Target("anchor", fuzz_anchor, (TrustedStateError,), 1 + 2 * 512),
    Target("intent_log", fuzz_intent_log, (TrustedStateError,), 8192),
    Target("tree", fuzz_tree, (), 1 << 16),
    Target("keys", fuzz_keys, (keys_mod.KeyFileError, keys_mod.WrongKeyError), 512),
    Target("audit_log", fuzz_audit_log, (audit.AuditError,), 8192),
    Target("xml_policy", fuzz_xml_policy, (PolicyError,), 16384),
    Target("toml_policy", fuzz_toml_policy, (PolicyError,), 8192),
    Target("nbd_server", fuzz_nbd_server, (p.ProtocolError, HandshakeEnded), 16384),
    Target("nbd_client", fuzz_nbd_client, (p.ProtocolError, BlockError), 16384),
]}


def run_one(target: Target, data: bytes) -> None:
    """Run `target` on `data`; its documented refusals are fine, anything else raises."""
    try:
        target.run(data)
    except target.expected:
        pass


CORPUS = Path(__file__).parent / "corpus"


def corpus(name: str) -> list[tuple[str, bytes]]:
    """The saved inputs of one target: seeds and every regression found."""
    d = CORPUS / name
    return sorted((f.name, f.read_bytes()) for f in d.iterdir()) if d.is_dir() else []
