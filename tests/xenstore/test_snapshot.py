"""The store's saved state: what a restarted store starts from (xenstore/snapshot.py), and
tearing down a pairing (core.Store.tear_down). In memory, through the wire protocol."""

from __future__ import annotations

import json
import random

import pytest

from tests.xenstore.test_store_random import WORDS
from tests.xenstore.util import Peer
from trustvbd.xenstore import snapshot
from trustvbd.xenstore.core import Store
from trustvbd.xenstore.pairing import pairings_in
from trustvbd.xenstore.wire import Message, Op, encode

FE, BE = "/local/domain/3/device/vbd/1", "/local/domain/4/backend/vbd/3/1"


def view(store: Store) -> dict:
    """Everything a snapshot promises to keep, without the generation numbers."""
    return {"nodes": {p: (n.value, n.acl, n.children) for p, n in store.tree.nodes.items()},
            "owned": +store.tree.owned, "introduced": store.introduced,
            "targets": store.targets, "revoked": store.revoked}


def busy(store: Store, rng: random.Random, count: int) -> None:
    sessions = [store.connect(0, True), store.connect(3), store.connect(4)]
    for i in range(count):
        s = rng.choice(sessions)
        op = rng.choice([Op.WRITE, Op.MKDIR, Op.RM, Op.SET_PERMS, Op.INTRODUCE, Op.SET_TARGET,
                         Op.TRANSACTION_START, Op.TRANSACTION_END])
        payload = b"\0".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) + b"\0"
        s.receive_data(encode(Message(op, i, rng.choice([0, 0, 1, 2]), payload[:4096])))
        s.data_to_send()
    for s in sessions:
        store.disconnect(s)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_restored_store_has_the_same_tree_and_domains(seed: int) -> None:
    rng = random.Random(seed)
    store = Store()
    store.add_domain(3)
    store.add_domain(4)
    domains = {3: ("vm1", "Payroll"), 4: ("crypt-P", "Sys")}
    busy(store, rng, 500)
    base = snapshot.dump(store, domains)
    journal = snapshot.Journal(store, domains)
    lines = []
    for _ in range(40):  # what the shell does after each batch of requests
        busy(store, rng, rng.randint(1, 60))
        if rng.random() < 0.2:
            store.revoked.add((FE, f"/local/domain/4/backend/vbd/3/{rng.randint(0, 9)}"))
            domains[rng.randint(5, 9)] = ("d", "L")
            store.meta_revision += 1  # as the shell does
        line = journal.entry(store, domains)
        if line is not None:
            lines.append(line)
    Peer(store).write("/bin", bytes(range(256)))  # values are bytes, not text
    lines.append(journal.entry(store, domains) or b"")
    assert journal.entry(store, domains) is None  # nothing more changed
    again, got = snapshot.load(base, b"".join(lines))
    assert view(again) == view(store) and got == domains
    # A journal the base already holds changes nothing (a crash between base and truncate);
    # a last line cut short by a crash was never answered for: it is ignored.
    newer = snapshot.dump(store, domains)
    assert view(snapshot.load(newer, b"".join(lines))[0]) == view(store)
    assert view(snapshot.load(base, b"".join(lines) + lines[0][:-5])[0]) == view(store)
    # And it serves on: permissions, quotas and new nodes work as before.
    again.add_domain(9)
    Peer(again, 9).write("/local/domain/9/new", b"x")
    assert Peer(again, 4).err(Op.READ, b"/local/domain/9/new\0") == "EACCES"


def test_a_damaged_journal_is_refused_saying_where() -> None:
    store = Store()
    store.add_domain(3)
    base = snapshot.dump(store, {})
    journal = snapshot.Journal(store, {})
    Peer(store).write("/local/domain/3/x", b"1")
    line = journal.entry(store, {})
    assert line is not None
    with pytest.raises(snapshot.SnapshotError, match="journal line 2 is not JSON"):
        snapshot.load(base, line + b"{oops\n" + line)
    orphan = b'{"nodes":{"/a/b":["",["n0"],[]]}}\n'
    with pytest.raises(snapshot.SnapshotError, match="'/a/b' is not its parent's child"):
        snapshot.load(base, orphan)
    dangling = b'{"nodes":{"/":["",["n0"],["local","gone"]]}}\n'
    with pytest.raises(snapshot.SnapshotError, match="lists 'gone', which is missing"):
        snapshot.load(base, dangling)


@pytest.mark.parametrize(("damage", "says"), [
    (lambda d: b"{", "not JSON"),
    (lambda d: json.dumps({**d, "format": "other"}).encode(), "not a store snapshot"),
    (lambda d: json.dumps({**d, "version": 9}).encode(), "version 9; this store reads 1"),
    (lambda d: json.dumps({**d, "nodes": d["nodes"][1:]}).encode(), "the first node is not the root"),
    (lambda d: json.dumps({**d, "nodes": [d["nodes"][0], d["nodes"][-1]]}).encode(),
     "comes before its parent"),
    (lambda d: json.dumps({**d, "nodes": [d["nodes"][0], ["/a//b", "", ["n0"]]]}).encode(),
     "damaged"),
    (lambda d: json.dumps({**d, "nodes": [d["nodes"][0], ["/a", "!!", ["n0"]]]}).encode(),
     "damaged"),
    (lambda d: json.dumps({**d, "nodes": [d["nodes"][0], ["/a", "", ["x9"]]]}).encode(),
     "damaged"),
    (lambda d: json.dumps({**d, "meta": {**d["meta"], "introduced": [70000]}}).encode(),
     "is not a domain id"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "meta"}).encode(), "KeyError"),
])
def test_a_damaged_snapshot_is_refused_saying_what(damage, says: str) -> None:  # type: ignore[no-untyped-def]
    store = Store()
    store.add_domain(3)
    Peer(store).write("/local/domain/3/x", b"1")
    good = json.loads(snapshot.dump(store, {3: ("vm1", "L")}))
    with pytest.raises(snapshot.SnapshotError, match=None) as exc:
        snapshot.load(damage(good))
    assert says in str(exc.value)


def paired_store() -> tuple[Store, Peer]:
    store = Store()
    store.add_domain(3)
    store.add_domain(4)
    dom0 = Peer(store)
    for d, owner, other in ((FE, 3, "b4"), (BE, 4, "r3")):
        dom0.ok(Op.MKDIR, d.encode())
        dom0.ok(Op.SET_PERMS, d.encode(), f"n{owner}".encode(), other.encode())
        dom0.write(f"{d}/state", b"4")
    dom0.write(f"{FE}/backend", BE.encode())
    dom0.write(f"{BE}/frontend", FE.encode())
    return store, dom0


def test_pairings_are_found_once_and_torn_down_for_good() -> None:
    store, dom0 = paired_store()
    (pairing,) = store.pairings()
    assert (pairing.frontend_dir, pairing.backend_dir) == (FE, BE)
    assert pairings_in([(f"{FE}/backend", b"/local/domain/9/backend/vbd/3/1")]) != []
    assert pairings_in([(f"{FE}/backend", b"/elsewhere"), ("/x/backend", b"y")]) == []
    watcher = Peer(store, 3)
    watcher.ok(Op.WATCH, f"{FE}/state".encode(), b"t")
    watcher.collect()
    watcher.events.clear()
    before = store.revision
    store.tear_down(pairing)
    assert store.revision > before  # the shell saves it
    # Closing, Closed, then the permissions change: the watcher sees all three.
    assert watcher.collect() == [] and len(watcher.events) == 3
    assert dom0.read(f"{FE}/state") == b"6" and dom0.read(f"{BE}/state") == b"6"
    # Neither end may write into its directory again, nor add to it; both may still read.
    assert Peer(store, 4).err(Op.WRITE, raw=f"{BE}/state\0".encode() + b"4") == "EACCES"
    assert Peer(store, 4).err(Op.WRITE, raw=f"{FE}/state\0".encode() + b"4") == "EACCES"
    assert Peer(store, 3).err(Op.WRITE, raw=f"{FE}/new\0".encode() + b"4") == "EACCES"
    assert Peer(store, 3).read(f"{BE}/state") == b"6"
    assert store.pairings() == []  # not asked about again
    again, _ = snapshot.load(snapshot.dump(store, {}))
    assert again.pairings() == []  # not even after a restart
