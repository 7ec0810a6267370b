"""The tree of nodes, with Xen's permission rules, generation counts and node quotas.

Nodes are immutable; every change puts a new node with a fresh generation number
from a counter shared by the live tree and its transaction snapshots, so "has this
node changed since?" is one comparison. A snapshot (`copy()`) records the
generation of every node it touches (`accessed`) and which paths it changed: the
transaction layer uses both to detect conflicts and to commit.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace

from trustvbd.xenstore import paths
from trustvbd.xenstore.perms import Access, Acl, Caller
from trustvbd.xenstore.quotas import Quotas
from trustvbd.xenstore.wire import XsError

ROOT_ACL = Acl(((0, Access.NONE),))


@dataclass(frozen=True)
class Node:
    value: bytes
    acl: Acl
    children: tuple[str, ...]
    gen: int


@dataclass(frozen=True)
class Change:
    """What watches see: a path that changed, the permissions it had, and whether it went."""

    path: str
    acl: Acl | None  # None for the special "@..." events
    removed: bool = False


class Tree:
    def __init__(self, quotas: Quotas | None = None, gens: itertools.count[int] | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.gens = gens or itertools.count(1)
        self.nodes: dict[str, Node] = {"/": Node(b"", ROOT_ACL, (), next(self.gens))}
        self.owned: Counter[int] = Counter({0: 1})
        self.accessed: dict[str, int | None] | None = None  # set in snapshots only
        self.changed: set[str] = set()
        self.dirty: set[str] = set()  # live tree: paths changed since the last save
        self.events: list[Change] = []

    def copy(self) -> Tree:
        snap = Tree(self.quotas, self.gens)
        snap.nodes, snap.owned = dict(self.nodes), Counter(self.owned)
        snap.accessed = {}
        return snap

    # -- raw access (records what a snapshot touched) -----------------------------
    def _get(self, path: str) -> Node | None:
        node = self.nodes.get(path)
        if self.accessed is not None and path not in self.accessed:
            self.accessed[path] = node.gen if node else None
        return node

    def _put(self, path: str, node: Node) -> None:
        old = self._get(path)
        if old is not None:
            self.owned[old.acl.owner] -= 1
        self.owned[node.acl.owner] += 1
        self.nodes[path] = replace(node, gen=next(self.gens))
        self.changed.add(path)
        if self.accessed is None:
            self.dirty.add(path)

    def _drop(self, path: str) -> Node:
        node = self._get(path)
        assert node is not None
        self.owned[node.acl.owner] -= 1
        del self.nodes[path]
        self.changed.add(path)
        if self.accessed is None:
            self.dirty.add(path)
        return node

    def gen(self, path: str) -> int | None:
        node = self.nodes.get(path)
        return node.gen if node else None

    # -- permission checks --------------------------------------------------------------
    def _nearest(self, path: str) -> tuple[str, Node]:
        """The deepest existing ancestor of a missing path."""
        for candidate in reversed(paths.ancestors(path)):
            node = self._get(candidate)
            if node is not None:
                return candidate, node
        raise AssertionError("the root always exists")

    def lookup(self, caller: Caller, path: str, need: Access) -> Node:
        node = self._get(path)
        if node is None:
            # Xen answers EACCES rather than ENOENT where the caller may not even look.
            _, above = self._nearest(path)
            if not caller.access(above.acl) & Access.READ:
                raise XsError("EACCES", f"{path}: not readable")
            raise XsError("ENOENT", path)
        if (caller.access(node.acl) & need) != need:
            raise XsError("EACCES", f"{path}: needs {need!r}")
        return node

    # -- operations -------------------------------------------------------------------
    def read(self, caller: Caller, path: str) -> bytes:
        return self.lookup(caller, path, Access.READ).value

    def directory(self, caller: Caller, path: str) -> tuple[str, ...]:
        return self.lookup(caller, path, Access.READ).children

    def get_perms(self, caller: Caller, path: str) -> Acl:
        return self.lookup(caller, path, Access.READ).acl

    def check_writable(self, caller: Caller, path: str) -> None:
        """EACCES (or ENOENT) unless `write(caller, path, ...)` would pass its permission check."""
        if self._get(path) is not None:
            self.lookup(caller, path, Access.WRITE)
            return
        top, above = self._nearest(path)
        if not caller.access(above.acl) & Access.WRITE:
            raise XsError("EACCES", f"{top}: not writable, so {path} cannot be created")

    def write(self, caller: Caller, path: str, value: bytes) -> None:
        self.quotas.check_value(caller, len(value))
        node = self._get(path)
        if node is None:
            self._create(caller, path, value)
        else:
            self.lookup(caller, path, Access.WRITE)
            self._put(path, replace(node, value=value))
        self.events.append(Change(path, self.nodes[path].acl))

    def mkdir(self, caller: Caller, path: str) -> None:
        if self._get(path) is not None:
            self.lookup(caller, path, Access.WRITE)
            return
        self._create(caller, path, b"")
        self.events.append(Change(path, self.nodes[path].acl))

    def _create(self, caller: Caller, path: str, value: bytes) -> None:
        self.check_writable(caller, path)
        top, above = self._nearest(path)
        missing = path[len(top):].lstrip("/").split("/")
        acl = above.acl if caller.privileged else above.acl.owned_by(caller.domid)
        self.quotas.check_nodes(caller, self.owned[acl.owner] + len(missing))
        self._put(top, replace(above, children=(*above.children, missing[0])))
        current = top
        for i, name in enumerate(missing):
            current = paths.join(current, name)
            last = i == len(missing) - 1
            children = () if last else (missing[i + 1],)
            self._put(current, Node(value if last else b"", acl, children, 0))

    def rm(self, caller: Caller, path: str) -> None:
        if path == "/":
            raise XsError("EINVAL", "the root cannot be removed")
        node = self._get(path)
        if node is None:
            parent = self._get(paths.parent(path))
            if parent is None:  # the spec: an error only if the parent is missing too
                self.lookup(caller, paths.parent(path), Access.READ)
            return
        self.lookup(caller, path, Access.WRITE)
        stack = [path]
        while stack:
            current = stack.pop()
            gone = self._drop(current)
            stack.extend(paths.join(current, c) for c in gone.children)
        parent_path = paths.parent(path)
        parent = self._get(parent_path)
        assert parent is not None
        name = paths.leaf(path)
        self._put(parent_path, replace(parent, children=tuple(c for c in parent.children if c != name)))
        self.events.append(Change(path, node.acl, removed=True))

    def set_perms(self, caller: Caller, path: str, acl: Acl) -> None:
        node = self.lookup(caller, path, Access.OWNER)
        if not caller.privileged and acl.owner != node.acl.owner:
            raise XsError("EACCES", f"{path}: only domain 0 may give a node another owner")
        self._put(path, replace(node, acl=acl))
        self.events.append(Change(path, acl))

    # -- transactions --------------------------------------------------------------------
    def conflicts_with(self, snapshot: Tree) -> bool:
        """Did anything the snapshot read or wrote change here since it was taken?"""
        assert snapshot.accessed is not None
        return any(self.gen(p) != g for p, g in snapshot.accessed.items())

    def apply(self, snapshot: Tree) -> None:
        self.dirty.update(snapshot.changed)
        for path in snapshot.changed:
            old, new = self.nodes.pop(path, None), snapshot.nodes.get(path)
            if old is not None:
                self.owned[old.acl.owner] -= 1
            if new is not None:
                self.owned[new.acl.owner] += 1
                self.nodes[path] = new  # its generation is already fresh and unique
