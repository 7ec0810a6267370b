"""The compiled policy: what the access-control domain loads instead of XML or TOML.

Xen's hypervisor never parsed policy XML: `xensec_xml2bin` compiled it and the
hypervisor loaded the binary. Here the CLI and the launcher run the loaders and
write this form; the running domain only reads it (docs/policy.md, "Compiled
form", gives it byte by byte):

    offset  size  field
         0     8  magic b"TVBDPOL\\0"
         8     2  format version, big-endian (1)
        10     2  flags, big-endian (0; anything else is refused)
        12     4  body length N, big-endian (at most 1 MiB)
        16    32  SHA-256 of the body
        48     N  body: the policy as canonical JSON (UTF-8, sorted keys, no spaces)

The reader refuses anything but exactly that: a wrong magic, version, flag, length,
checksum, a body that is not canonical, unknown or missing fields, wrong types; then
the model's own rules (`validate`) run again, so a compiled policy means exactly
what its source meant.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from trustvbd.acm.model import (
    ConflictSet,
    Header,
    Policy,
    PolicyError,
    ResourceLabel,
    VmLabel,
    Where,
    validate,
)

MAGIC = b"TVBDPOL\0"
VERSION = 1
HEADER = struct.Struct(">8sHHI32s")  # 48 bytes
MAX_BODY = 1 << 20
SUFFIX = ".tvbdpol"

_HEADER_FIELDS = ("name", "version", "url", "reference", "date", "namespace_url", "from_policy")
_TOP_FIELDS = {"format", "header", "ste_types", "chwall_types", "conflict_sets", "vm_labels",
               "resource_labels", "bootstrap", "primary", "source"}


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(policy: Policy) -> bytes:
    """The compiled form of a loaded, validated policy (never the NULL policy)."""
    if policy.is_null:
        raise ValueError("the NULL policy has no compiled form: run the domain with --null")
    h = policy.header
    body = _canonical({
        "format": "trustvbd-policy",
        "header": {"name": h.name, "version": h.version, "url": h.url, "reference": h.reference,
                   "date": h.date, "namespace_url": h.namespace_url,
                   "from_policy": list(h.from_policy) if h.from_policy else None},
        "ste_types": list(policy.ste_types),
        "chwall_types": list(policy.chwall_types),
        "conflict_sets": [{"name": c.name, "types": list(c.types)} for c in policy.conflict_sets],
        "vm_labels": [{"name": v.name, "ste": list(v.ste), "chwall": list(v.chwall),
                       "renamed_from": v.renamed_from} for v in policy.vm_labels],
        "resource_labels": [{"name": r.name, "ste": r.ste, "renamed_from": r.renamed_from}
                            for r in policy.resource_labels],
        "bootstrap": policy.bootstrap,
        "primary": policy.primary,
        "source": policy.source,
    })
    if len(body) > MAX_BODY:
        raise ValueError(f"policy {policy.name!r} compiles to {len(body)} bytes, over the"
                         f" {MAX_BODY}-byte limit")
    return HEADER.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def digest(data: bytes) -> str:
    """The compiled policy's identity in the audit log: SHA-256 of its body, hex."""
    return data[16:48].hex()


class _Reader:
    """Typed field access that names the field on error."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, message: str) -> PolicyError:
        return PolicyError(self.file, None, f"not a valid compiled policy: {message};"
                           " compile it again with `trustvbd policy compile`")

    def obj(self, value: Any, where: str, fields: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be an object")
        if set(value) != fields:
            extra, missing = sorted(set(value) - fields), sorted(fields - set(value))
            raise self.fail(f"{where} has unknown fields {extra}" if extra
                            else f"{where} lacks fields {missing}")
        return value

    def text(self, value: Any, where: str, optional: bool = False) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{where} must be a string")
        return value

    def texts(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(f"{where} must be a list of strings")
        return tuple(self.text(v, f"{where}[{i}]") for i, v in enumerate(value))

    def items(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(f"{where} must be a list")
        return value


def decode(data: bytes, file: str) -> Policy:
    """Read a compiled policy; PolicyError (naming the file and what is wrong) on anything else."""
    r = _Reader(file)
    if len(data) < HEADER.size:
        raise r.fail(f"{len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, flags, length, checksum = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise r.fail(f"magic {magic!r} is not {MAGIC!r} (an XML or TOML policy? compile it first)")
    if version != VERSION:
        raise r.fail(f"format version {version}; this trustvbd reads version {VERSION}")
    if flags:
        raise r.fail(f"flags {flags:#06x} set; version {VERSION} defines none")
    if length > MAX_BODY or HEADER.size + length != len(data):
        raise r.fail(f"body length {length} does not match the file ({len(data) - HEADER.size}"
                     " bytes after the header)")
    body = data[HEADER.size:]
    if hashlib.sha256(body).digest() != checksum:
        raise r.fail("checksum mismatch: the file is damaged or was edited")
    try:
        top = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise r.fail(f"body is not UTF-8 JSON ({exc})") from None
    if not isinstance(top, dict) or _canonical(top) != body:
        raise r.fail("body is not canonical JSON (sorted keys, no spaces)")
    top = r.obj(top, "the body", _TOP_FIELDS)
    if top["format"] != "trustvbd-policy":
        raise r.fail('"format" must be "trustvbd-policy"')
    h = r.obj(top["header"], "header", set(_HEADER_FIELDS))
    from_policy = h["from_policy"]
    if from_policy is not None:
        pair = r.texts(from_policy, "header.from_policy")
        if len(pair) != 2:
            raise r.fail("header.from_policy must be [name, version]")
        from_policy = (pair[0], pair[1])
    optional = {k: r.text(h[k], f"header.{k}", optional=True) for k in _HEADER_FIELDS[1:-1]}
    header = Header(r.text(h["name"], "header.name"), **optional, from_policy=from_policy)
    conflicts = []
    for i, c in enumerate(r.items(top["conflict_sets"], "conflict_sets")):
        c = r.obj(c, f"conflict_sets[{i}]", {"name", "types"})
        conflicts.append(ConflictSet(r.text(c["name"], f"conflict_sets[{i}].name"),
                                     r.texts(c["types"], f"conflict_sets[{i}].types")))
    vms = []
    for i, v in enumerate(r.items(top["vm_labels"], "vm_labels")):
        v = r.obj(v, f"vm_labels[{i}]", {"name", "ste", "chwall", "renamed_from"})
        vms.append(VmLabel(r.text(v["name"], f"vm_labels[{i}].name"),
                           r.texts(v["ste"], f"vm_labels[{i}].ste"),
                           r.texts(v["chwall"], f"vm_labels[{i}].chwall"),
                           r.text(v["renamed_from"], f"vm_labels[{i}].renamed_from", True)))
    resources = []
    for i, x in enumerate(r.items(top["resource_labels"], "resource_labels")):
        x = r.obj(x, f"resource_labels[{i}]", {"name", "ste", "renamed_from"})
        resources.append(ResourceLabel(r.text(x["name"], f"resource_labels[{i}].name"),
                                       r.text(x["ste"], f"resource_labels[{i}].ste"),
                                       r.text(x["renamed_from"],
                                              f"resource_labels[{i}].renamed_from", True)))
    policy = Policy(header, r.texts(top["ste_types"], "ste_types"),
                    r.texts(top["chwall_types"], "chwall_types"), tuple(conflicts), tuple(vms),
                    tuple(resources), r.text(top["bootstrap"], "bootstrap", True),
                    r.text(top["primary"], "primary", True),
                    source=r.text(top["source"], "source"))
    return validate(policy, file, lambda *key: Where(key=".".join(map(str, key))))


def read_compiled(path: str | Path) -> Policy:
    try:
        with open(path, "rb") as f:
            data = f.read(HEADER.size + MAX_BODY + 1)  # anything longer is refused, not read
    except OSError as exc:
        raise PolicyError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
    return decode(data, str(path))
