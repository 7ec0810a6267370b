"""The audit log's files and records as its writer and its readers both see them.

A record's hash, the names of the files beside the log (head, keys, rotated files),
one line parsed into a well-typed record, the signed head read back, and a signature
checked. audit.py describes the format and its guarantees; docs/policy.md has the files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from trustvbd.crypt.sign import PUBLIC_KEY_SIZE
from trustvbd.crypt.sign import verify as verify_signature

GENESIS = "0" * 64
MAX_RECORD = 64 * 1024
_KEYS = {"seq", "time", "kind", "fields", "prev", "hash"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
SIGNING_CONTEXT = b"trustvbd-audit-v1\x00"


def record_hash(record: dict[str, Any]) -> str:
    body = {k: record[k] for k in ("seq", "time", "kind", "fields", "prev")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def key_path(path: Path) -> Path:
    return path.with_name(path.name + ".key")


def public_key_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def rotated_files(path: Path) -> list[Path]:
    """PATH.1, PATH.2, ... in order (oldest first)."""
    found = []
    for f in path.parent.glob(path.name + ".*"):
        suffix = f.name[len(path.name) + 1:]
        if suffix.isdigit() and not suffix.startswith("0"):
            found.append((int(suffix), f))
    return [f for _, f in sorted(found)]


def signed_message(seq: int, digest: str) -> bytes:
    return seq.to_bytes(8, "big") + bytes.fromhex(digest)


def parse_record(line: bytes) -> dict[str, Any] | None:
    """One line as a well-typed record, or None: never an exception, whatever the bytes."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        return None
    if not isinstance(rec, dict) or set(rec) != _KEYS:
        return None
    seq = rec["seq"]
    if type(seq) is not int or not 0 < seq < 1 << 63 or not isinstance(rec["kind"], str):
        return None
    if not isinstance(rec["fields"], dict) or not isinstance(rec["time"], str):
        return None
    if not all(isinstance(rec[k], str) and _HEX64.fullmatch(rec[k]) for k in ("prev", "hash")):
        return None
    return rec


def read_head(path: Path) -> tuple[int, str, str] | None:
    """(seq, hash, signature hex) of PATH.head; None if absent; seq -1 if unreadable."""
    try:
        raw = head_path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, "unreadable", "")
    try:
        head = json.loads(raw)
        seq, digest, sig = head["seq"], head["hash"], head.get("signature", "")
        if type(seq) is not int or not 0 <= seq < 1 << 63 or not isinstance(sig, str):
            raise ValueError
        if not (isinstance(digest, str) and (_HEX64.fullmatch(digest))):
            raise ValueError
        return seq, digest, sig
    except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return (-1, "unreadable", "")


def signature_ok(public_key: bytes | None, seq: int, digest: str, sig: object) -> bool:
    if public_key is None or not isinstance(sig, str) or not re.fullmatch(r"[0-9a-f]{128}", sig):
        return False
    return verify_signature(public_key, SIGNING_CONTEXT, signed_message(seq, digest), bytes.fromhex(sig))


def stored_public_key(path: Path) -> bytes | None:
    try:
        key = public_key_path(path).read_bytes()
    except OSError:
        return None
    return key if len(key) == PUBLIC_KEY_SIZE else None
