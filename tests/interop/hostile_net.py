"""A hostile network around a guest's TCP port: a flood of new connections from anyone who can
reach it, and a link with latency (a real client far away, its handshake long enough to be hit).

`python -m tests.interop.hostile_net PORT MODE SOURCE` floods 127.0.0.1:PORT until killed, each
connection bound to the SOURCE address (any 127.x.y.z on loopback): MODE `silent` says nothing,
`starttls` sends the client flags and NBD_OPT_STARTTLS and then stalls. It holds its last 200
connections open and prints `flooding` once the first is in.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

STARTTLS = struct.pack(">IQII", 1, 0x49484156454F5054, 5, 0)  # flags, IHAVEOPT, STARTTLS, len 0


def flood(port: int, mode: str, source: str) -> None:
    held: collections.deque[socket.socket] = collections.deque()
    said = False
    while True:
        s = socket.socket()
        try:
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            if mode == "starttls":
                s.sendall(STARTTLS)
        except OSError:
            s.close()
            continue
        if not said:
            print("flooding", flush=True)
            said = True
        held.append(s)
        while len(held) > 200:
            held.popleft().close()


@contextlib.contextmanager
def flooding(port: int, mode: str, source: str, processes: int = 2) -> Iterator[None]:
    """A flood of new connections to 127.0.0.1:`port` from `processes` processes, while inside."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.interop.hostile_net", str(port), mode,
                               source], stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "flooding"
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class LatencyLink:
    """A TCP proxy on 127.0.0.1 to 127.0.0.1:`port` that delays every byte by `delay` seconds
    each way, as a far-away client's link does (order kept, bandwidth unlimited)."""

    def __init__(self, port: int, delay: float) -> None:
        self.target, self.delay = port, delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                q: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._send, args=(dst, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        data = b"x"
        while data:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data))

    def _send(self, dst: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = q.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._server.close()
        for s in self._socks:
            s.close()


if __name__ == "__main__":
    flood(int(sys.argv[1]), sys.argv[2], sys.argv[3])
