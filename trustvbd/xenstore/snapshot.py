"""The store's state on disk, so a restarted store domain goes on with the same tree.

Two parts, no I/O here (domains/store.py reads and writes the files):

- a **base**, the whole state at one moment (`dump`): JSON {"format":
  "trustvbd-xenstore", "version": 1, "nodes": [[path, value (base64), [perm, ...]],
  ...] parents before children, children in their order, "meta": META};
- a **journal** of what changed since (`Journal.entry`), one JSON line per batch of
  changes: {"nodes": {path: [value (base64), [perm, ...], [child, ...]] or null
  (removed)}, "meta": META (only when it changed)}. Each line holds the nodes'
  whole new state, so replaying it is a plain overwrite, and replaying lines the
  base already holds changes nothing. A last line without its newline was cut short
  by a crash before its reply went out: it is ignored.

META is {"introduced": [domid, ...], "targets": {domid: domid}, "revoked":
[[frontend dir, backend dir], ...], "domains": {domid: [name, label]}}. Not saved:
open transactions and watches (they belong to connections, which a restart ends).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from typing import Any

from trustvbd.xenstore import paths
from trustvbd.xenstore.core import Store
from trustvbd.xenstore.perms import Acl
from trustvbd.xenstore.quotas import Quotas
from trustvbd.xenstore.tree import Node
from trustvbd.xenstore.wire import XsError

FORMAT, VERSION = "trustvbd-xenstore", 1
Domains = dict[int, tuple[str, str]]  # domid -> name, label


class SnapshotError(ValueError):
    """Bytes that are not a store state this version wrote; the message says what."""


def _meta(store: Store, domains: Domains) -> dict[str, Any]:
    return {"introduced": sorted(store.introduced),
            "targets": {str(k): v for k, v in sorted(store.targets.items())},
            "revoked": sorted([fe, be] for fe, be in store.revoked),
            "domains": {str(k): list(v) for k, v in sorted(domains.items())}}


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def dump(store: Store, domains: Domains) -> bytes:
    """The base: everything, now. Whatever the tree had changed is in it."""
    nodes: list[list[Any]] = []
    stack = ["/"]
    while stack:
        path = stack.pop()
        node = store.tree.nodes[path]
        nodes.append([path, _b64(node.value), node.acl.format()])
        stack.extend(paths.join(path, c) for c in reversed(node.children))
    store.tree.dirty.clear()
    return json.dumps({"format": FORMAT, "version": VERSION, "nodes": nodes,
                       "meta": _meta(store, domains)}, separators=(",", ":")).encode()


class Journal:
    """Turns what changed since the last call into one journal line."""

    def __init__(self, store: Store, domains: Domains) -> None:
        self.last_meta = json.dumps(_meta(store, domains))
        self.meta_seen = store.meta_revision

    def entry(self, store: Store, domains: Domains) -> bytes | None:
        """A line (with its newline) for the changes since the last base or entry; None if
        nothing changed."""
        tree, out = store.tree, {}
        for path in sorted(tree.dirty):
            node = tree.nodes.get(path)
            out[path] = None if node is None else [_b64(node.value), node.acl.format(),
                                                   list(node.children)]
        tree.dirty.clear()
        entry: dict[str, Any] = {"nodes": out}
        if store.meta_revision != self.meta_seen:  # (names and labels count as meta too)
            self.meta_seen = store.meta_revision
            meta = json.dumps(_meta(store, domains))
            if meta != self.last_meta:
                entry["meta"], self.last_meta = json.loads(meta), meta
        if not out and "meta" not in entry:
            return None
        return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def load(base: bytes, journal: bytes = b"", quotas: Quotas | None = None
         ) -> tuple[Store, Domains]:
    """The Store a base and its journal describe; SnapshotError if they are damaged."""
    try:
        doc = json.loads(base)
    except ValueError as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"not a store snapshot (format is not {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise SnapshotError(f"version {doc.get('version')!r}; this store reads {VERSION}")
    store = Store(quotas)
    try:
        nodes = _base_nodes(doc["nodes"])
        meta = doc["meta"]
        lines = journal.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):  # the last is empty, or cut short
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"journal line {number} is not JSON") from None
            for path, state in entry["nodes"].items():
                if state is None:
                    nodes.pop(path, None)
                else:
                    value, perms, children = state
                    nodes[path] = _node(path, value, perms, [str(c) for c in children])
            meta = entry.get("meta", meta)
        _check_tree(nodes)
        gens = store.tree.gens
        store.tree.nodes = {p: Node(n.value, n.acl, n.children, next(gens)) for p, n in nodes.items()}
        store.tree.owned = Counter(n.acl.owner for n in nodes.values())
        store.introduced = {0, *(_domid(d) for d in meta["introduced"])}
        store.targets = {_domid(int(k)): _domid(v) for k, v in meta["targets"].items()}
        store.revoked = {(str(fe), str(be)) for fe, be in meta["revoked"]}
        domains = {_domid(int(k)): (str(name), str(label))
                   for k, (name, label) in meta["domains"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, XsError, binascii.Error) as exc:
        raise SnapshotError(f"damaged: {type(exc).__name__}: {exc}") from None
    store.tree.dirty.clear()
    return store, domains


def _node(path: str, value: str, perms: list[str], children: list[str]) -> Node:
    if paths.canonical(path.encode(), 0) != path:
        raise ValueError(f"node path {path[:80]!r} is not canonical")
    return Node(base64.b64decode(value, validate=True), Acl.parse([p.encode() for p in perms]),
                tuple(children), 0)


def _base_nodes(entries: list[Any]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for path, value, perms in entries:
        if not nodes and path != "/":
            raise ValueError("the first node is not the root")
        if nodes and (paths.parent(path) not in nodes or path in nodes):
            raise ValueError(f"node {path[:80]!r} comes before its parent, or twice")
        nodes[path] = _node(path, value, perms, [])
        if path != "/":
            parent = nodes[paths.parent(path)]
            nodes[paths.parent(path)] = Node(parent.value, parent.acl,
                                             (*parent.children, paths.leaf(path)), 0)
    return nodes


def _check_tree(nodes: dict[str, Node]) -> None:
    """One tree: a root, every child there, every node its parent's child, once."""
    if "/" not in nodes:
        raise ValueError("there is no root node")
    for path, node in nodes.items():
        if len(set(node.children)) != len(node.children):
            raise ValueError(f"node {path[:80]!r} lists a child twice")
        for child in node.children:
            if paths.join(path, child) not in nodes:
                raise ValueError(f"node {path[:80]!r} lists {child[:40]!r}, which is missing")
        parent = nodes.get(paths.parent(path)) if path != "/" else None
        if path != "/" and (parent is None or paths.leaf(path) not in parent.children):
            raise ValueError(f"node {path[:80]!r} is not its parent's child")


def _domid(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value!r:.20} is not a domain id")
    return value
