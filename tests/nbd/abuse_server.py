"""A server process for the abuse tests: two guests, each with its own memory budget.

    python -m tests.nbd.abuse_server DIR BUDGET_MIB HANDSHAKE_TIMEOUT IDLE_TIMEOUT

Serves a slow 64 MiB in-memory export (reads take 5 ms, so requests pile up in flight)
as guest "a" on DIR/a.sock and guest "b" on DIR/b.sock. Prints "ready"; then, for every
line read on stdin, one JSON line: each guest's budget use and peak, connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

from trustvbd.blocks.file import MemoryBackend
from trustvbd.blocks.layer import Layer
from trustvbd.nbd.budget import MemoryBudget
from trustvbd.nbd.server import Export, NbdServer, StaticExports


class SlowReads(Layer):
    async def pread(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0.005)
        return bytes(await self.next.pread(offset, length))


async def main(directory: Path, budget_mib: int, handshake: float, idle: float) -> None:
    backend = SlowReads(MemoryBackend(64 << 20))
    servers, budgets, tasks = {}, {}, []
    for guest in ("a", "b"):
        budgets[guest] = MemoryBudget(budget_mib << 20)
        servers[guest] = NbdServer(StaticExports([Export("d", backend)]), identity=guest,
                                   budget=budgets[guest], handshake_timeout=handshake,
                                   idle_timeout=idle, max_connections=256)
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(str(directory / f"{guest}.sock"))
        listening.listen(256)
        tasks.append(asyncio.create_task(servers[guest].serve_socket(listening)))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        print(json.dumps({g: {"used": budgets[g].used, "peak": budgets[g].peak,
                              "connections": len(servers[g].connections)}
                          for g in servers}), flush=True)
    for server in servers.values():
        await server.close(1)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                     float(sys.argv[4])))
