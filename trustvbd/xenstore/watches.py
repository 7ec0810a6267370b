"""Watches: which registered watch a change fires, and with which event path.

A watch on W fires for a change at P when P is a child of W (the spec's sense: W
itself, or below it). When P is removed recursively, watches below P fire too,
with their own path as the event path. Special watches ("@introduceDomain",
"@releaseDomain") match only their own special events. A watch set with a
relative path gets relative event paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustvbd.xenstore import paths
from trustvbd.xenstore.perms import Caller
from trustvbd.xenstore.quotas import Quotas
from trustvbd.xenstore.tree import Change
from trustvbd.xenstore.wire import XsError


@dataclass(frozen=True)
class Watch:
    path: str
    token: bytes
    base: str = ""  # the prefix stripped from event paths of a relative watch

    def event_path(self, change: Change) -> str | None:
        """The path to report for this change, or None if the watch does not fire."""
        special_change, special_watch = change.path.startswith("@"), self.path.startswith("@")
        if special_change or special_watch:
            found = change.path if special_change and change.path == self.path else None
        elif paths.is_child(change.path, self.path):
            found = change.path
        elif change.removed and paths.is_child(self.path, change.path):
            found = self.path
        else:
            return None
        if found is not None and self.base and found.startswith(self.base):
            return found[len(self.base):]
        return found


class WatchList:
    """One connection's watches, in registration order."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.watches: list[Watch] = []

    def add(self, caller: Caller, watch: Watch) -> None:
        if any(w.path == watch.path and w.token == watch.token for w in self.watches):
            raise XsError("EEXIST", f"watch on {watch.path} with this token already set")
        self.quotas.check_watches(caller, len(self.watches) + 1)
        self.watches.append(watch)

    def remove(self, path: str, token: bytes) -> None:
        for i, w in enumerate(self.watches):
            if w.path == path and w.token == token:
                del self.watches[i]
                return
        raise XsError("ENOENT", f"no watch on {path} with this token")

    def clear(self) -> None:
        self.watches.clear()

    def fired(self, change: Change) -> list[tuple[str, bytes]]:
        out = []
        for w in self.watches:
            epath = w.event_path(change)
            if epath is not None:
                out.append((epath, w.token))
        return out
