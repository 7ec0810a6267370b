"""NbdClient alone against one `trustvbd driver`: this process's CPU per 100k requests.

    cd /tmp && PYTHONPATH=TREE TREE/.venv/bin/python TREE/bench/nbd_client.py [--requests N]

4 KiB reads (pread_into, a buffer per worker), then 4 KiB writes (pwrite) at random-ish
offsets of a 64 MiB export, 16 at a time, then batches of SUBMIT_BATCH 4 KiB writes by
submit_writes, SUBMIT_DEPTH batches at a time (a departure of writes behind: what each
replica link of a mirror does at QD16): the encryption domain's link to one replica, with
no guest, no AEAD and no mirror around it. Prints CPU seconds (user + system) per 100k
requests, IOPS and the load average. With PYTHONPATH set to another tree (`git archive main
| tar -x -C DIR`, plus its built `trustvbd/_native.abi3.so`) and run from outside any
checkout, it measures that tree's client; the driver is always the installed one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trustvbd
from trustvbd.blockdev import Buffer
from trustvbd.nbd.client import NbdClient

EXPORT = 64 << 20
DEPTH = 16
SUBMIT_BATCH = 10  # writes per departure of writes behind at QD16, about
SUBMIT_DEPTH = 2


async def worker(client: NbdClient, kind: str, todo: Iterator[int], data: bytes) -> None:
    buf = memoryview(bytearray(4096))
    for i in todo:
        offset = (i * 7919 % (EXPORT // 4096)) * 4096
        if kind == "read":
            await client.pread_into(offset, buf)
        else:
            await client.pwrite(offset, data)


async def submitter(client: NbdClient, todo: Iterator[int], data: bytes) -> None:
    blocks = EXPORT // 4096
    for i in todo:
        if i % SUBMIT_BATCH:
            continue
        writes: list[tuple[int, Buffer]] = [((i + k) * 7919 % blocks * 4096, data)
                                            for k in range(SUBMIT_BATCH)]
        outcomes = client.submit_writes(writes)
        assert outcomes is not None, "submit_writes declined a batch"
        assert (await outcomes).count(None) == SUBMIT_BATCH


async def measure(uri: str, requests: int) -> dict[str, tuple[float, float]]:
    client = await NbdClient.open_uri(uri)
    out = {}
    for kind in ("read", "write", "submit"):
        data, todo = os.urandom(4096), iter(range(requests))
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if kind == "submit":
            await asyncio.gather(*(submitter(client, todo, data) for _ in range(SUBMIT_DEPTH)))
        else:
            await asyncio.gather(*(worker(client, kind, todo, data) for _ in range(DEPTH)))
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        out[kind] = (cpu / requests * 1e5, requests / (t1 - t0))
    await client.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="tvbcl", dir="/tmp"))
    image, sock = work / "d.img", work / "d.sock"
    with open(image, "wb") as f:
        f.truncate(EXPORT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed driver
    driver = subprocess.Popen([sys.executable, "-m", "trustvbd.cli", "driver", "--file", str(image),
                               "--size", str(EXPORT), "--socket", str(sock)],
                              cwd="/", env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)
        out = uvloop.run(measure(f"nbd+unix:///?socket={sock}", args.requests))
    finally:
        driver.terminate()
        driver.wait()
        for path in (image, sock):
            path.unlink(missing_ok=True)
        work.rmdir()
    print(f"{Path(trustvbd.__file__).parent}: " + ", ".join(
        f"{kind} {cpu:.2f} s CPU/100k, {iops:,.0f} IOPS" for kind, (cpu, iops) in out.items())
        + f"; load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
