"""The sans-I/O store, driven in memory through its wire protocol."""

from __future__ import annotations

import pytest

from tests.xenstore.util import Peer
from trustvbd.xenstore.core import Store
from trustvbd.xenstore.quotas import Quotas
from trustvbd.xenstore.wire import HEADER, PAYLOAD_MAX, Message, Op, encode


@pytest.fixture
def store() -> Store:
    s = Store()
    s.add_domain(3)
    s.add_domain(4)
    return s


def test_read_write_mkdir_rm_directory(store: Store) -> None:
    dom0 = Peer(store)
    assert dom0.write("/a/b/c", b"v\0with nul") == b"OK\0"
    assert dom0.read("/a/b/c") == b"v\0with nul"
    assert dom0.read("/a/b") == b""  # parents are created empty
    assert dom0.ls("/a") == ["b"]
    assert sorted(dom0.ls("/")) == ["a", "local"]
    assert dom0.err(Op.READ, b"/a/nope") == "ENOENT"
    dom0.ok(Op.MKDIR, b"/a/b/d")
    dom0.ok(Op.MKDIR, b"/a/b/c")  # exists: its value is kept
    assert dom0.read("/a/b/c") == b"v\0with nul" and dom0.ls("/a/b") == ["c", "d"]
    dom0.ok(Op.RM, b"/a/b")
    assert dom0.ls("/a") == [] and dom0.err(Op.READ, b"/a/b/c") == "ENOENT"
    dom0.ok(Op.RM, b"/a/gone")  # missing, parent there: fine (the spec)
    assert dom0.err(Op.RM, b"/a/gone/deeper") == "ENOENT"
    assert dom0.err(Op.RM, b"/") == "EINVAL"
    assert dom0.ok(Op.GET_DOMAIN_PATH, b"3") == b"/local/domain/3\0"
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, b"3") == b"T\0"
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, b"9") == b"F\0"


def test_domains_own_their_home_and_nothing_else(store: Store) -> None:
    dom0, d3, d4 = Peer(store), Peer(store, 3), Peer(store, 4)
    assert d3.write("data/x", b"1") == b"OK\0"  # relative: /local/domain/3/data/x
    assert dom0.read("/local/domain/3/data/x") == b"1"
    assert dom0.ok(Op.GET_PERMS, b"/local/domain/3/data/x") == b"n3\0"
    assert d4.err(Op.READ, b"/local/domain/3/data/x") == "EACCES"
    assert d4.err(Op.READ, b"/local/domain/3/nothing") == "EACCES"  # not even ENOENT
    assert d4.err(Op.WRITE, raw=b"/local/domain/3/data/x\0evil") == "EACCES"
    assert d4.err(Op.WRITE, raw=b"/local/domain/3/new\0evil") == "EACCES"
    assert d4.err(Op.RM, b"/local/domain/3/data") == "EACCES"
    assert d4.err(Op.DIRECTORY, b"/") == "EACCES"
    assert d4.err(Op.WRITE, raw=b"/top\0x") == "EACCES"
    assert d3.read("data/x") == b"1"
    # The owner shares: 4 may read, then write, but never take ownership.
    d3.ok(Op.SET_PERMS, b"data/x", b"n3", b"r4")
    assert d4.read("/local/domain/3/data/x") == b"1"
    assert d4.err(Op.WRITE, raw=b"/local/domain/3/data/x\0evil") == "EACCES"
    d3.ok(Op.SET_PERMS, b"data/x", b"n3", b"b4")
    assert d4.write("/local/domain/3/data/x", b"2") == b"OK\0"
    assert d4.err(Op.SET_PERMS, b"/local/domain/3/data/x", b"n4") == "EACCES"
    assert d3.err(Op.SET_PERMS, b"data/x", b"n4") == "EACCES"  # only dom0 gives nodes away
    assert d3.err(Op.SET_PERMS, b"data/x", b"q3") == "EINVAL"
    dom0.ok(Op.SET_PERMS, b"/local/domain/3/data/x", b"n0")
    assert d3.err(Op.READ, b"data/x") == "EACCES"
    # Domain-management requests are for domain 0.
    for op, args in ((Op.INTRODUCE, (b"7", b"0", b"0")), (Op.RELEASE, (b"3",)),
                     (Op.SET_TARGET, (b"3", b"4")), (Op.CONTROL, (b"check",))):
        assert d3.err(op, *args) == "EACCES"


def test_nodes_a_domain_creates_are_its_own_under_a_shared_parent(store: Store) -> None:
    dom0, d3 = Peer(store), Peer(store, 3)
    dom0.write("/shared", b"")
    dom0.ok(Op.SET_PERMS, b"/shared", b"n0", b"b3")
    d3.write("/shared/mine/leaf", b"x")
    assert dom0.ok(Op.GET_PERMS, b"/shared/mine/leaf") == b"n3\0"
    dom0.ok(Op.SET_TARGET, b"4", b"3")  # 4 now acts for 3
    assert Peer(store, 4).read("/shared/mine/leaf") == b"x"


def test_transaction_sees_its_snapshot_and_commits(store: Store) -> None:
    a, b = Peer(store), Peer(store)
    a.write("/t/x", b"old")
    tx = a.start()
    a.write("/t/y", b"new", tx=tx)
    assert a.read("/t/y", tx=tx) == b"new"
    assert b.err(Op.READ, b"/t/y") == "ENOENT"  # invisible until committed
    a.ok(Op.TRANSACTION_END, b"T", tx=tx)
    assert b.read("/t/y") == b"new"
    tx = a.start()
    a.write("/t/y", b"discarded", tx=tx)
    a.ok(Op.TRANSACTION_END, b"F", tx=tx)
    assert b.read("/t/y") == b"new"
    assert a.err(Op.TRANSACTION_END, b"T", tx=tx) == "ENOENT"  # ended already
    assert a.err(Op.READ, b"/t/y", tx=999) == "ENOENT"
    assert a.err(Op.TRANSACTION_START, b"", tx=a.start()) == "EBUSY"
    tx = a.start()
    assert a.err(Op.TRANSACTION_END, b"X", tx=tx) == "EINVAL"


def test_conflicting_writer_makes_the_transaction_fail_with_eagain(store: Store) -> None:
    a, b = Peer(store), Peer(store)
    a.write("/t/x", b"0")
    a.write("/t/other", b"0")
    tx = a.start()
    assert a.read("/t/x", tx=tx) == b"0"
    a.write("/t/x", b"1", tx=tx)
    b.write("/t/x", b"b")  # a later change to a node the transaction used
    assert a.err(Op.TRANSACTION_END, b"T", tx=tx) == "EAGAIN"
    assert b.read("/t/x") == b"b"  # nothing of the failed transaction applied
    tx = a.start()
    a.write("/t/x", b"2", tx=tx)
    b.write("/t/other", b"b")  # unrelated node: no conflict
    a.ok(Op.TRANSACTION_END, b"T", tx=tx)
    assert b.read("/t/x") == b"2"
    tx = a.start()  # a read-only use counts too
    assert a.ls("/t", tx=tx) == ["x", "other"]
    b.write("/t/new", b"")
    assert a.err(Op.TRANSACTION_END, b"T", tx=tx) == "EAGAIN"


def test_watches_fire_on_path_and_children_with_initial_event(store: Store) -> None:
    w, writer = Peer(store), Peer(store)
    assert w.ok(Op.WATCH, b"/w", b"tok") == b"OK\0"
    assert w.events == [("/w", b"tok")]  # fired once at registration
    writer.write("/w/a/b", b"1")
    writer.write("/elsewhere", b"1")
    writer.write("/w", b"2")
    assert w.collect() == []
    assert w.events[1:] == [("/w/a/b", b"tok"), ("/w", b"tok")]
    w.events.clear()
    w.ok(Op.WATCH, b"/w/a/b/c", b"deep")
    writer.ok(Op.RM, b"/w/a")  # removal of a parent fires the deeper watch with its own path
    w.collect()
    assert w.events == [("/w/a/b/c", b"deep"), ("/w/a", b"tok"), ("/w/a/b/c", b"deep")]
    assert w.err(Op.WATCH, b"/w", b"tok") == "EEXIST"
    w.ok(Op.UNWATCH, b"/w", b"tok")
    assert w.err(Op.UNWATCH, b"/w", b"tok") == "ENOENT"
    w.events.clear()
    tx = writer.start()
    writer.write("/w/a/b/c", b"in tx", tx=tx)
    assert w.collect() == [] and w.events == []  # only when committed
    writer.ok(Op.TRANSACTION_END, b"T", tx=tx)
    w.collect()
    assert w.events == [("/w/a/b/c", b"deep")]


def test_watch_events_respect_read_permission_and_relative_paths(store: Store) -> None:
    d3, d4, dom0 = Peer(store, 3), Peer(store, 4), Peer(store)
    d4.ok(Op.WATCH, b"/local/domain/3", b"spy")
    d3.ok(Op.WATCH, b"data", b"rel")
    d3.events.clear()
    d4.events.clear()
    d3.write("data/secret", b"x")
    d3.collect()
    d4.collect()
    assert d3.events == [("data/secret", b"rel")]
    assert d4.events == []
    dom0.ok(Op.WATCH, b"@releaseDomain", b"r")
    d3.ok(Op.WATCH, b"@releaseDomain", b"r")
    dom0.events.clear()
    d3.events.clear()
    dom0.ok(Op.RELEASE, b"4")
    dom0.collect()
    d3.collect()
    assert dom0.events == [("@releaseDomain", b"r")]
    assert d3.events == []  # domain lifecycle events go to domain 0 only
    store.add_domain(9)
    dom0.ok(Op.WATCH, b"@introduceDomain", b"i")
    dom0.events.clear()
    dom0.ok(Op.INTRODUCE, b"12", b"0", b"0")
    dom0.collect()
    assert dom0.events == [("@introduceDomain", b"i")]


def test_quotas_on_nodes_values_watches_transactions() -> None:
    store = Store(Quotas(nodes_per_domain=5, value_size=8, watches_per_connection=2,
                         transactions_per_connection=1))
    store.add_domain(3)  # its home counts as one of its nodes
    d3, dom0 = Peer(store, 3), Peer(store)
    d3.write("a/b/c", b"")
    assert d3.err(Op.WRITE, raw=b"x/y\0") == "ENOSPC"
    d3.write("a/d", b"12345678")
    assert d3.err(Op.WRITE, raw=b"a/d\x00" + b"123456789") == "ENOSPC"
    d3.ok(Op.RM, b"a/b")
    d3.write("e", b"")  # removal gave the quota back
    d3.ok(Op.WATCH, b"a", b"1")
    d3.ok(Op.WATCH, b"a", b"2")
    assert d3.err(Op.WATCH, b"a", b"3") == "E2BIG"
    d3.start()
    assert d3.err(Op.TRANSACTION_START, b"") == "ENOSPC"
    dom0.write("/big/x", b"v" * 100)  # domain 0 is exempt
    for i in range(3):
        dom0.ok(Op.WATCH, b"/big", str(i).encode())


def test_bad_messages_get_errors_and_the_store_keeps_serving(store: Store) -> None:
    bad, good = Peer(store, 3), Peer(store, 4)
    assert bad.err(99) == "ENOSYS"  # unknown type
    assert bad.err(Op.WATCH_EVENT, b"/x", b"t") == "ENOSYS"  # not a request
    assert bad.err(Op.READ, raw=b"/no-nul") == "EINVAL"
    assert bad.err(Op.WRITE, raw=b"/no-value-separator") == "EINVAL"
    assert bad.err(Op.READ, b"/a//b") == "EINVAL"
    assert bad.err(Op.READ, b"/" + b"a" * 3100) == "EINVAL"
    assert bad.err(Op.GET_DOMAIN_PATH, b"x1") == "EINVAL"
    assert bad.err(Op.DIRECTORY_PART, b"data", b"5") in ("ENOENT", "EINVAL")
    # An oversized payload breaks the framing: the connection is dropped, others go on.
    bad.send_raw(HEADER.pack(Op.WRITE, 1, 0, PAYLOAD_MAX + 1))
    assert bad.session.closed and "4097" in bad.session.closed
    assert bad.session not in store.sessions
    assert good.write("x", b"still served") == b"OK\0"
    assert bad.send_raw(encode(Message(Op.READ, 2, 0, b"/\0"))) == []


def test_a_client_that_never_reads_its_events_is_dropped() -> None:
    store = Store(Quotas(pending_output=4096))
    slow, writer = Peer(store), Peer(store)
    slow.ok(Op.WATCH, b"/", b"t")
    for i in range(200):
        writer.write(f"/n{i}", b"x")
    assert slow.session.closed and "unread" in slow.session.closed
    assert writer.read("/n199") == b"x"


def test_directory_part_pages_a_long_listing(store: Store) -> None:
    dom0 = Peer(store)
    names = [f"child-{i:04d}-" + "x" * 40 for i in range(200)]  # ~10 KiB of names
    for n in names:
        dom0.ok(Op.MKDIR, f"/big/{n}".encode())
    assert dom0.err(Op.DIRECTORY, b"/big") == "E2BIG"
    got, offset, gens = b"", 0, set()
    while True:
        part = dom0.ok(Op.DIRECTORY_PART, b"/big", str(offset).encode())
        gen, _, rest = part.partition(b"\0")
        gens.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += rest[:-1]
            break
        got += rest
        offset += len(rest)
    assert got.split(b"\0")[:-1] == [n.encode() for n in names] and len(gens) == 1


def test_pairing_waits_for_the_decision(store: Store) -> None:
    store.ask_pairings = True
    dom0 = Peer(store)
    fe, be = "/local/domain/3/device/vbd/1", "/local/domain/4/backend/vbd/3/1"
    assert dom0.err(Op.WRITE, raw=f"{fe}/backend\0/local/domain/4/backend/vbd/9/1".encode()) == "EINVAL"
    dom0.session.receive_data(encode(Message(Op.WRITE, 7, 0, f"{fe}/backend\0{be}".encode())))
    dom0.session.receive_data(encode(Message(Op.READ, 8, 0, f"{fe}/backend\0".encode())))
    assert dom0.collect() == []  # parked, and the next request waits behind it
    (question,) = store.take_questions()
    assert (question.pairing.frontend_domid, question.pairing.backend_domid) == (3, 4)
    store.answer(question, allowed=False)
    replies = dom0.collect()
    assert [(m.op, m.req_id) for m in replies] == [(Op.ERROR, 7), (Op.ERROR, 8)]
    assert replies[0].payload == b"EACCES\0"
    dom0.session.receive_data(encode(Message(Op.WRITE, 9, 0, f"{be}/frontend\0{fe}".encode())))
    (question,) = store.take_questions()
    store.answer(question, allowed=True)
    assert [(m.op, m.req_id) for m in dom0.collect()] == [(Op.WRITE, 9)]
    assert dom0.read(f"{be}/frontend") == fe.encode()
    d4 = Peer(store, 4)  # a write that would be refused anyway asks nobody
    assert d4.err(Op.WRITE, raw=f"{fe}/backend\0{be}".encode()) == "EACCES"
    assert store.take_questions() == []


def test_a_burst_of_pipelined_requests_is_served_not_dropped(store: Store) -> None:
    client = Peer(store)
    client.write("/p", b"v")
    burst = b"".join(encode(Message(Op.READ, i, 0, b"/p\0")) for i in range(5000))  # ~95 KB at once
    replies = client.send_raw(burst)
    assert client.session.closed is None
    assert [m.req_id for m in replies] == list(range(5000)) and {m.payload for m in replies} == {b"v"}
