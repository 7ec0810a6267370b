"""The store's state as one file, so a restarted store domain goes on with the same tree.

`dump` turns a Store (its nodes with their permissions, introduced domains, SET_TARGET
links, torn-down pairings) plus the shell's domain names and labels into bytes; `load`
checks those bytes and rebuilds a Store. No I/O here: domains/store.py writes the
file (a new file, then a rename) and reads it when it starts again.

The file is JSON: {"format": "trustvbd-xenstore", "version": 1, "nodes": [[path,
value (base64), [perm, ...]], ...] parents before children, children in their order,
"introduced": [domid, ...], "targets": {domid: domid}, "revoked": [[frontend dir,
backend dir], ...], "domains": {domid: [name, label]}}. What is not in it: open
transactions and watches (they belong to connections, which a restart ends).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from trustvbd.xenstore import paths
from trustvbd.xenstore.core import Store
from trustvbd.xenstore.perms import Acl, Caller
from trustvbd.xenstore.quotas import Quotas
from trustvbd.xenstore.tree import Node
from trustvbd.xenstore.wire import XsError

FORMAT, VERSION = "trustvbd-xenstore", 1
Domains = dict[int, tuple[str, str]]  # domid -> name, label


class SnapshotError(ValueError):
    """Bytes that are not a store snapshot this version wrote; the message says what."""


def dump(store: Store, domains: Domains) -> bytes:
    nodes: list[list[Any]] = []
    stack = ["/"]
    while stack:
        path = stack.pop()
        node = store.tree.nodes[path]
        nodes.append([path, base64.b64encode(node.value).decode(), node.acl.format()])
        stack.extend(paths.join(path, c) for c in reversed(node.children))
    return json.dumps({
        "format": FORMAT, "version": VERSION, "nodes": nodes,
        "introduced": sorted(store.introduced),
        "targets": {str(k): v for k, v in store.targets.items()},
        "revoked": sorted([fe, be] for fe, be in store.revoked),
        "domains": {str(k): list(v) for k, v in domains.items()},
    }, separators=(",", ":")).encode()


def load(data: bytes, quotas: Quotas | None = None) -> tuple[Store, Domains]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"not a store snapshot (format is not {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise SnapshotError(f"version {doc.get('version')!r}; this store reads {VERSION}")
    store = Store(quotas)
    try:
        _nodes(store, doc["nodes"])
        store.introduced = {0, *(_domid(d) for d in doc["introduced"])}
        store.targets = {_domid(int(k)): _domid(v) for k, v in doc["targets"].items()}
        store.revoked = {(str(fe), str(be)) for fe, be in doc["revoked"]}
        domains = {_domid(int(k)): (str(name), str(label))
                   for k, (name, label) in doc["domains"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, XsError, binascii.Error) as exc:
        raise SnapshotError(f"damaged: {type(exc).__name__}: {exc}") from None
    return store, domains


def _nodes(store: Store, entries: list[Any]) -> None:
    tree, dom0 = store.tree, Caller(0, True)
    first = True
    for path, value, perms in entries:
        if paths.canonical(path.encode(), 0) != path:
            raise ValueError(f"node path {path[:80]!r} is not canonical")
        acl = Acl.parse([p.encode() for p in perms])
        raw = base64.b64decode(value, validate=True)
        if first:
            if path != "/":
                raise ValueError("the first node is not the root")
            tree.set_perms(dom0, "/", acl)
            tree.write(dom0, "/", raw)
            first = False
            continue
        parent = paths.parent(path)
        if parent not in tree.nodes or path in tree.nodes:
            raise ValueError(f"node {path[:80]!r} comes before its parent, or twice")
        above = tree.nodes[parent]
        tree.nodes[parent] = Node(above.value, above.acl, (*above.children, paths.leaf(path)),
                                  next(tree.gens))
        tree.nodes[path] = Node(raw, acl, (), next(tree.gens))
        tree.owned[acl.owner] += 1
    tree.changed.clear()
    tree.events.clear()


def _domid(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value!r:.20} is not a domain id")
    return value
