"""Write the seed inputs of every fuzz target into tests/fuzz/corpus/TARGET/seed-*.

Run by hand after a format changes (`python -m tests.fuzz.seeds`); the output is
committed. Seeds are well-formed inputs, so the fuzzer starts past the magic
numbers and length fields. Regression inputs (`regress-*`) are added by hand,
one per bug found, and never regenerated.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from tests.fuzz.targets import CORPUS, DISK_ID, KEY_FILE_KEK, SIGNER
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.audit_format import head_path
from trustvbd.blocks import anchor_file, tree_file
from trustvbd.blocks.disk_state import Anchor
from trustvbd.crypt import keys as keys_mod
from trustvbd.crypt import superblock as sb
from trustvbd.crypt.sign import fingerprint
from trustvbd.crypt.tree import HashTree, page_hash
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.core import ProtocolCore, Role

ROOT = Path(__file__).resolve().parents[2]


def _superblocks() -> dict[str, bytes]:
    hashes = b"".join(page_hash(i, bytes(4096)) for i in range(3))
    tree = HashTree(hashes)
    depth, top = tree.top()
    fp = fingerprint(SIGNER.public_key)
    good = sb.encode(sb.Superblock(DISK_ID, 3 * 128 * 4096, 7, 1 << 20, tree.root, fp, depth, top),
                     SIGNER)
    return {"valid-slot1": b"\x03" + good, "blank": b"\x00" + bytes(sb.SLOT_SIZE)}


def _anchor() -> dict[str, bytes]:
    v1 = Anchor(DISK_ID, 1 << 20, 3, 1 << 20, bytes(range(32))).encode()
    members = ((bytes(range(16)), 1), (bytes(16), 2))
    two = bytearray(anchor_file.new_file((DISK_ID, 1 << 20, 3, 1 << 20, bytes(range(32)), None)))
    two[:512] = anchor_file.encode_slot(DISK_ID, 1 << 20, 4, 1 << 20, bytes(32), members, seq=2)
    return {"valid": b"\x00" + v1, "two-slots-members": b"\x00" + bytes(two)}


def _intent_log() -> dict[str, bytes]:
    head = struct.pack(">8sIIQI", b"TVBDINTL", 2, 0, 5, 0)
    out = head + struct.pack(">I", zlib.crc32(head))
    for first, n in ((3, 1), (10, 2)):
        rec = struct.pack(">4sIQ", b"IREC", n, first) + bytes(32 * n) + b"\x11" * 32 * n
        out += rec + struct.pack(">I", zlib.crc32(rec))
    rec = struct.pack(">4sIQ", b"TREC", 2, 5) + bytes(8) + b"\x22" * 32 + bytes(7) + b"\x01" + b"\x33" * 32
    out += rec + struct.pack(">I", zlib.crc32(rec))
    return {"two-records": b"\x00" + out}


def _tree() -> dict[str, bytes]:
    """Five leaf pages, page 1 written: a clean file whose root is the anchor's."""
    pages = 5
    path = Path(tempfile.mkdtemp()) / "tree"
    tree_file.create(path, pages)
    t = tree_file.TreeFile(path, "seed", pages, tree_file.EMPTY[3])
    t.update({1: bytes(range(32))})
    t.mark_clean(4)
    t.close()
    raw = path.read_bytes()
    shutil.rmtree(path.parent)
    return {"five-pages": bytes([0, pages]) + raw}


def _keys() -> dict[str, bytes]:
    secrets = keys_mod.DiskSecrets(DISK_ID, bytes(32), bytes(range(32)), SIGNER.public_key)
    return {"key-file": b"\x00" + keys_mod.seal_keys(secrets, KEY_FILE_KEK)}


def _audit() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "audit.log"
        log = AuditLog(path)
        log.append("decision", subject="vm1", object="disk1", allowed=True)
        log.append("integrity", disk="d1", blocks="3-5")
        log.close()
        head = head_path(path).read_bytes()
        body = path.read_bytes()
    return {"three-records": len(head).to_bytes(2, "big") + head + body}


def _policies() -> tuple[dict[str, bytes], dict[str, bytes]]:
    xml_dir = ROOT.parent / "shared" / "xen-acm-policies"
    xml = {}
    for f in sorted(xml_dir.glob("*.xml"))[:2]:
        xml[f.stem] = f.read_bytes()
    toml = {"example": (ROOT / "examples" / "policy.toml").read_bytes()}
    return xml, toml


def _client_transcript(structured: bool) -> bytes:
    c, s = ProtocolCore(Role.CLIENT), ProtocolCore(Role.SERVER)
    out = [b"\x04"]  # _chunks: 64-byte pieces

    def client(msg: m.Event) -> None:
        raw = c.send(msg)
        s.receive_data(raw)
        out.append(raw)

    c.receive_data(s.send(m.Greeting(3)))
    client(m.ClientFlags(3))
    if structured:
        client(m.Option(p.Opt.STRUCTURED_REPLY))
        c.receive_data(s.send(m.OptionReply(p.Opt.STRUCTURED_REPLY, p.Rep.ACK)))
    client(m.Option(p.Opt.LIST))
    c.receive_data(s.send(m.OptionReply(p.Opt.LIST, p.Rep.ACK)))
    client(m.Option(p.Opt.GO, m.encode_go("disk", [p.Info.BLOCK_SIZE, p.Info.NAME])))
    return b"".join(out) + b"".join(_requests())


def _requests() -> list[bytes]:
    return [b"".join(m.encode_parts(req)) for req in (
        m.Request(p.Cmd.WRITE, 1, 0, 4096, 0, b"\x5a" * 4096),
        m.Request(p.Cmd.READ, 2, 0, 4096),
        m.Request(p.Cmd.FLUSH, 3),
        m.Request(p.Cmd.TRIM, 4, 4096, 4096),
        m.Request(p.Cmd.DISC, 5))]


def _server_transcript(structured: bool) -> bytes:
    s = ProtocolCore(Role.SERVER)
    out = [b"\x04" if structured else b"\x84", s.send(m.Greeting(3))]
    s.receive_data(m.encode_parts(m.ClientFlags(3))[0])
    if structured:
        s.receive_data(b"".join(m.encode_parts(m.Option(p.Opt.STRUCTURED_REPLY))))
        out.append(s.send(m.OptionReply(p.Opt.STRUCTURED_REPLY, p.Rep.ACK)))
    s.receive_data(b"".join(m.encode_parts(
        m.Option(p.Opt.GO, m.encode_go("disk", [p.Info.BLOCK_SIZE])))))
    out.append(s.send(m.OptionReply(p.Opt.GO, p.Rep.INFO, m.info_block_size(512, 4096, 1 << 25))))
    out.append(s.send(m.OptionReply(p.Opt.GO, p.Rep.INFO, m.info_export(65536, 0x1FF))))
    out.append(s.send(m.OptionReply(p.Opt.GO, p.Rep.ACK)))
    handshake = b"".join(out[1:])
    out[1:] = [len(handshake).to_bytes(2, "big"), handshake]
    if structured:
        out.append(b"".join(m.encode_parts(m.OffsetData(1, 0, b"\x01" * 2048, done=False))))
        out.append(b"".join(m.encode_parts(m.OffsetHole(1, 2048, 2048))))
        out.append(b"".join(m.encode_parts(m.ErrorChunk(2, p.NbdErr.ENOSPC, "full", None))))
        out.append(b"".join(m.encode_parts(m.OffsetData(3, 8192, b"\x03" * 4096))))
        out.append(b"".join(m.encode_parts(m.ErrorChunk(4, p.NbdErr.EIO, "flush failed", None))))
        out.append(b"".join(m.encode_parts(m.OffsetData(5, 512, b"\x05" * 512))))
    else:
        out.append(b"".join(m.encode_parts(m.SimpleReply(1, 0, b"\x01" * 4096))))
        out.append(b"".join(m.encode_parts(m.SimpleReply(2))))
        out.append(b"".join(m.encode_parts(m.SimpleReply(3, 5))))
        out.append(b"".join(m.encode_parts(m.SimpleReply(4))))
        out.append(b"".join(m.encode_parts(m.SimpleReply(5, 0, b"\x05" * 512))))
    return b"".join(out)


def seeds() -> dict[str, dict[str, bytes]]:
    xml, toml = _policies()
    return {
        "superblock": _superblocks(), "anchor": _anchor(), "intent_log": _intent_log(),
        "tree": _tree(), "keys": _keys(), "audit_log": _audit(),
        "xml_policy": xml, "toml_policy": toml,
        "nbd_server": {"structured": _client_transcript(True),
                       "simple": _client_transcript(False)},
        "nbd_client": {"structured": _server_transcript(True),
                       "simple": _server_transcript(False)},
    }


def main() -> None:
    for target, inputs in seeds().items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in inputs.items():
            (d / f"seed-{name}").write_bytes(data)
    print(json.dumps({t: len(v) for t, v in seeds().items()}))
    shutil.rmtree(CORPUS / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
