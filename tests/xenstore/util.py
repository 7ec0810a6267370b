"""An in-memory client for the sans-I/O store: encode requests, decode what comes back."""

from __future__ import annotations

import itertools

from trustvbd.xenstore.core import Session, Store
from trustvbd.xenstore.wire import Decoder, Message, Op, encode


class Peer:
    """One client session of a Store, driven byte by byte as a socket would be."""

    def __init__(self, store: Store, domid: int = 0, privileged: bool | None = None) -> None:
        self.session: Session = store.connect(domid, domid == 0 if privileged is None else privileged)
        self.decoder = Decoder()
        self.ids = itertools.count(1)
        self.events: list[tuple[str, bytes]] = []

    def send_raw(self, data: bytes) -> list[Message]:
        self.session.receive_data(data)
        return self.collect()

    def collect(self) -> list[Message]:
        self.decoder.feed(self.session.data_to_send())
        out = []
        while (m := self.decoder.next_message()) is not None:
            if m.op == Op.WATCH_EVENT:
                path, token = m.payload[:-1].split(b"\0", 1)
                self.events.append((path.decode(), token))
            else:
                out.append(m)
        return out

    def call(self, op: int, *args: bytes, tx: int = 0, raw: bytes | None = None) -> tuple[int, bytes]:
        payload = raw if raw is not None else b"".join(a + b"\0" for a in args)
        req = next(self.ids)
        replies = self.send_raw(encode(Message(op, req, tx, payload)))
        assert len(replies) == 1, replies
        assert replies[0].req_id == req and replies[0].tx_id == tx
        return replies[0].op, replies[0].payload

    def ok(self, op: int, *args: bytes, tx: int = 0, raw: bytes | None = None) -> bytes:
        kind, payload = self.call(op, *args, tx=tx, raw=raw)
        assert kind == op, payload
        return payload

    def err(self, op: int, *args: bytes, tx: int = 0, raw: bytes | None = None) -> str:
        kind, payload = self.call(op, *args, tx=tx, raw=raw)
        assert kind == Op.ERROR, (kind, payload)
        assert payload.endswith(b"\0")
        return payload[:-1].decode()

    def write(self, path: str, value: bytes, tx: int = 0) -> bytes:
        return self.ok(Op.WRITE, raw=path.encode() + b"\0" + value, tx=tx)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.ok(Op.READ, path.encode(), tx=tx)

    def ls(self, path: str, tx: int = 0) -> list[str]:
        payload = self.ok(Op.DIRECTORY, path.encode(), tx=tx)
        return [x.decode() for x in payload.split(b"\0")[:-1]]

    def start(self) -> int:
        return int(self.ok(Op.TRANSACTION_START, b"")[:-1])
