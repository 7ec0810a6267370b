"""XenStore path rules (docs/misc/xenstore.txt): what a valid path is, and who is whose child.

Paths are /-separated, start with /, use only ASCII alphanumerics and -/_@, have no
doubled or trailing slash (except the root "/"), and are at most ABS_PATH_MAX bytes.
A path not starting with / is relative to the caller's /local/domain/<domid>.
Watch paths may instead be special: "@" followed by a name ("@releaseDomain").
"""

from __future__ import annotations

import string

from trustvbd.xenstore.wire import ABS_PATH_MAX, REL_PATH_MAX, XsError

_ALLOWED = frozenset(string.ascii_letters + string.digits + "-/_@")
SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XsError("EINVAL", "paths are ASCII") from None


def canonical(raw: bytes, domid: int) -> str:
    """The absolute, validated form of a path a domain sent; EINVAL if it is not one."""
    path = _text(raw)
    if path.startswith("@"):
        raise XsError("EINVAL", f"{path[:64]!r}: special paths name watches, not nodes")
    if not path.startswith("/"):
        if len(path) > REL_PATH_MAX:
            raise XsError("EINVAL", f"relative path longer than {REL_PATH_MAX} bytes")
        path = f"{domain_path(domid)}/{path}" if path else ""
    check(path)
    return path


def check(path: str) -> None:
    if not path.startswith("/"):
        raise XsError("EINVAL", f"path {path[:64]!r} is not absolute")
    if len(path) > ABS_PATH_MAX:
        raise XsError("EINVAL", f"path longer than {ABS_PATH_MAX} bytes")
    if path != "/" and (path.endswith("/") or "//" in path):
        raise XsError("EINVAL", f"path {path[:64]!r} has an empty component")
    if not set(path) <= _ALLOWED:
        raise XsError("EINVAL", f"path {path[:64]!r} has a character outside [A-Za-z0-9-/_@]")


def canonical_watch(raw: bytes, domid: int) -> tuple[str, str]:
    """(absolute path, base to strip from event paths: "" unless the watch was relative)."""
    text = _text(raw)
    if text.startswith("@"):
        if not set(text) <= _ALLOWED or len(text) > ABS_PATH_MAX or "/" in text:
            raise XsError("EINVAL", f"special watch {text[:64]!r} is malformed")
        return text, ""
    path = canonical(raw, domid)
    base = "" if text.startswith("/") else domain_path(domid) + "/"
    return path, base


def parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def leaf(path: str) -> str:
    return path.rsplit("/", 1)[1]


def join(path: str, name: str) -> str:
    return f"/{name}" if path == "/" else f"{path}/{name}"


def is_child(child: str, parent_path: str) -> bool:
    """The spec's sense: a path is its own child; everything is a child of "/"."""
    return child == parent_path or parent_path == "/" or child.startswith(parent_path + "/")


def ancestors(path: str) -> list[str]:
    """"/", then each ancestor down to (not including) path itself."""
    out, current = [], path
    while current != "/":
        current = parent(current)
        out.append(current)
    return out[::-1]
