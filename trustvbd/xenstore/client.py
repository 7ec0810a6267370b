"""A small asyncio XenStore client: the launcher's way to write the store, and the tests'.

Replies are paired with requests by req_id (the store may answer in any order);
WATCH_EVENT messages go to `events`. An ERROR reply raises XsError with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable

from trustvbd.xenstore.wire import Decoder, Message, Op, ProtocolViolation, XsError, encode


class XsClosed(ConnectionError):
    """The connection to the store is gone."""


class XsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.events: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | None = None, sock: socket.socket | None = None) -> XsClient:
        reader, writer = await asyncio.open_unix_connection(path, sock=sock)
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        decoder = Decoder()
        try:
            while data := await self.reader.read(65536):
                decoder.feed(data)
                while (msg := decoder.next_message()) is not None:
                    if msg.op == Op.WATCH_EVENT:
                        path, _, token = msg.payload.rstrip(b"\0").partition(b"\0")
                        self.events.put_nowait((path.decode("ascii", "replace"), token))
                        continue
                    future = self._pending.pop(msg.req_id, None)
                    if future is not None and not future.done():
                        future.set_result(msg)
        except (OSError, ProtocolViolation):
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(XsClosed("the store closed the connection"))
            self._pending.clear()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the connection is gone (at once if it is)."""
        self._task.add_done_callback(lambda _: callback())

    async def request(self, op: Op, payload: bytes, tx: int = 0, timeout: float = 10.0) -> bytes:
        if self._task.done():
            raise XsClosed("the store closed the connection")
        req_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        self.writer.write(encode(Message(op, req_id, tx, payload)))
        try:
            msg = await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(req_id, None)
        if msg.op == Op.ERROR:
            raise XsError(msg.payload.rstrip(b"\0").decode("ascii", "replace") or "EIO",
                          f"{op.name} {payload[:80]!r}")
        return msg.payload

    @staticmethod
    def _args(*items: str | bytes) -> bytes:
        return b"".join((i.encode() if isinstance(i, str) else i) + b"\0" for i in items)

    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.request(Op.READ, self._args(path), tx)

    async def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self.request(Op.WRITE, path.encode() + b"\0" + data, tx)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self.request(Op.MKDIR, self._args(path), tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.request(Op.RM, self._args(path), tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        payload = await self.request(Op.DIRECTORY, self._args(path), tx)
        return [name.decode() for name in payload.split(b"\0")[:-1]]

    async def get_perms(self, path: str, tx: int = 0) -> list[str]:
        payload = await self.request(Op.GET_PERMS, self._args(path), tx)
        return [p.decode() for p in payload.split(b"\0")[:-1]]

    async def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        await self.request(Op.SET_PERMS, self._args(path, *perms), tx)

    async def watch(self, path: str, token: str) -> None:
        await self.request(Op.WATCH, self._args(path, token))

    async def transaction_start(self) -> int:
        return int((await self.request(Op.TRANSACTION_START, b"\0")).rstrip(b"\0"))

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
