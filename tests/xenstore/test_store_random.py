"""Seeded random requests from three domains: no exception escapes, the tree stays whole."""

from __future__ import annotations

import random
from collections import Counter

from trustvbd.xenstore import paths
from trustvbd.xenstore.core import Store
from trustvbd.xenstore.wire import Decoder, Message, Op, encode

WORDS = [b"/", b"/a", b"/a/b", b"/a/b/c", b"a", b"a/x", b"@releaseDomain", b"@x", b"/local/domain/3",
         b"device/vbd/1/backend", b"/local/domain/3/device/vbd/1/backend",
         b"/local/domain/4/backend/vbd/3/1", b"/local/domain/4/backend/vbd/3/1/frontend",
         b"/local/domain/3/device/vbd/1", b"n3", b"r0", b"b4", b"w3", b"T", b"F", b"0", b"99999999999",
         b"-1", b"\xff", b"", b"x" * 3000, b"3", b"4", b"1"]


def test_random_requests_never_crash_and_keep_the_tree_consistent() -> None:
    rng = random.Random(20261130)
    store = Store()
    store.add_domain(3)
    store.add_domain(4)
    store.ask_pairings = True
    sessions = [store.connect(0, True), store.connect(3), store.connect(4)]
    tx_ids = [0]
    for i in range(20_000):
        s = rng.choice(sessions)
        if s.closed:
            sessions.remove(s)
            sessions.append(store.connect(rng.choice([0, 3, 4])))
            continue
        op = rng.choice([*range(25), 0xFFFF, 1000])
        payload = b"\0".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))
        payload += b"\0" if rng.random() < 0.9 else b""
        s.receive_data(encode(Message(op, i, rng.choice([*tx_ids[-5:], 0, 0, 12345]), payload[:4096])))
        decoder = Decoder()
        decoder.feed(s.data_to_send())
        while (m := decoder.next_message()) is not None:
            assert m.op in (op, Op.ERROR, Op.WATCH_EVENT), m
            if m.op == Op.TRANSACTION_START:
                tx_ids.append(int(m.payload[:-1]))
        for question in store.take_questions():
            store.answer(question, rng.random() < 0.5)
        for other in sessions:
            other.data_to_send()
    tree = store.tree
    assert len(tree.nodes) > 10  # the run did build something
    for path, node in tree.nodes.items():
        assert len(set(node.children)) == len(node.children), path
        assert all(paths.join(path, c) in tree.nodes for c in node.children), path
        if path != "/":
            assert paths.leaf(path) in tree.nodes[paths.parent(path)].children, path
    assert +Counter(n.acl.owner for n in tree.nodes.values()) == +tree.owned
