"""Per-node permissions, as Xen's xenstored has them.

A node's permission list is a sequence of entries `<letter><domid>`: `n` none, `r` read,
`w` write, `b` both. The first entry names the node's owner, and its letter is what
every domain not listed afterwards may do. The owner, a privileged caller (domain 0),
and a domain that SET_TARGET made the owner's controller may do everything, including
changing the permissions; other listed domains get their entry's rights.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from trustvbd.xenstore.wire import XsError

MAX_DOMID = 0xFFFF


class Access(IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = 3
    OWNER = 4
    ALL = 7


_LETTERS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_NAMES = {v: k for k, v in _LETTERS.items()}


@dataclass(frozen=True)
class Acl:
    entries: tuple[tuple[int, Access], ...]  # (domid, access); the first is the owner

    @property
    def owner(self) -> int:
        return self.entries[0][0]

    @classmethod
    def parse(cls, items: list[bytes]) -> Acl:
        entries = []
        for raw in items:
            text = raw.decode("ascii", "replace")
            letter, digits = text[:1], text[1:]
            if letter not in _LETTERS or not digits.isdigit() or int(digits) > MAX_DOMID:
                raise XsError("EINVAL", f"permission {text[:16]!r} is not n|r|w|b followed by a domain id")
            entries.append((int(digits), _LETTERS[letter]))
        if not entries:
            raise XsError("EINVAL", "a permission list needs at least the owner's entry")
        return cls(tuple(entries))

    def format(self) -> list[str]:
        return [f"{_NAMES[access]}{domid}" for domid, access in self.entries]

    def owned_by(self, domid: int) -> Acl:
        """The same list with another owner (what a domain gets for nodes it creates)."""
        rest = tuple(e for e in self.entries[1:] if e[0] != domid)
        return Acl(((domid, self.entries[0][1]), *rest))


@dataclass(frozen=True)
class Caller:
    domid: int
    privileged: bool = False
    target: int | None = None  # SET_TARGET: acts as if it owned this domain's nodes

    def access(self, acl: Acl) -> Access:
        if self.privileged:
            return Access.ALL
        owner = acl.owner
        if owner == self.domid or (self.target is not None and owner == self.target):
            return Access.ALL
        for domid, access in acl.entries[1:]:
            if domid == self.domid:
                return access
        for domid, access in acl.entries[1:]:  # the target's grants are inherited
            if self.target is not None and domid == self.target:
                return access
        return acl.entries[0][1]
