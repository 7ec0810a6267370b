"""What goes into an audit record: who may record what, and fields made to fit.

Each domain records only its own events (may_record, by the role the access-control
domain gave its connection); a record's fields are compacted to fit MAX_RECORD
(compact_fields): block lists become counts and ranges, long strings are cut.
"""

from __future__ import annotations

from typing import Any

MAX_STRING = 4096  # longer field strings are cut (the record says by how much)
MAX_RANGES = 64  # block ranges kept when a block list is summarised

# ---------------------------------------------------------------- who records what

HYPERVISOR = "hypervisor"
CRYPT = "crypt:"  # crypt:DISK,DISK.../GUEST,GUEST...: an encryption domain's disks and guests


def crypt_role(disks: list[str], guests: list[str]) -> str:
    return f"{CRYPT}{','.join(sorted(disks))}/{','.join(sorted(guests))}"


def _role_names(role: str, part: int) -> set[str]:
    if not role.startswith(CRYPT):
        return set()
    parts = role[len(CRYPT):].split("/")
    return set(filter(None, parts[part].split(","))) if part < len(parts) else set()


def may_record(role: str | None, kind: str, fields: dict[str, Any]) -> str | None:
    """Why `role` may not add this record (None: it may). Each domain records only its own:
    the hypervisor its events; an encryption domain the integrity events of its disks and
    the events about its guests' sockets (guest-refused)."""
    if role is None:
        return ('this connection has not proven a role (send "hello" with the token the'
                " launcher gave)")
    if kind == "event" and role == HYPERVISOR:
        return None
    if kind == "integrity" and fields.get("disk") in _role_names(role, 0):
        return None
    if kind == "event" and fields.get("guest") in _role_names(role, 1):
        return None
    about = (f"disk {fields.get('disk')!r}" if kind == "integrity"
             else f"guest {fields.get('guest')!r}")
    return f"{role!r} may not record {kind} events about {about}"


# ---------------------------------------------------------------- summaries

def summarise_blocks(blocks: list[int], limit: int = MAX_RANGES) -> dict[str, Any]:
    """A block list of any length as a count and at most `limit` ranges [first, last]."""
    ranges: list[list[int]] = []
    for b in sorted(set(blocks)):
        if ranges and ranges[-1][1] == b - 1:
            ranges[-1][1] = b
        else:
            ranges.append([b, b])
    out: dict[str, Any] = {"count": len(set(blocks)), "ranges": ranges[:limit]}
    if len(ranges) > limit:
        out["ranges_not_listed"] = len(ranges) - limit
    return out


def _is_block_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value)


def compact_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields that fit a record: block lists summarised, long strings cut (and said so)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if _is_block_list(value) and len(value) > 16:
            out[key] = summarise_blocks(value)
        elif isinstance(value, str) and len(value) > MAX_STRING:
            out[key] = value[:MAX_STRING] + f"... ({len(value) - MAX_STRING} more characters)"
        else:
            out[key] = value
    return out
