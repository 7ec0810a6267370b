"""The ceiling of a native data plane here (issue #13), beside the peers, in one run.

    .venv/bin/python bench/dataplane_ceiling.py [--size 256MiB] [--reps 2] [--fio-runtime 3]

`bench/dataplane_ceiling/` is a minimal NBD proxy in Rust: AES-256-GCM per 4 KiB block with
versions and tags in memory, a 32-byte intent record per write, every write to every
driver, reads round robin, one thread per socket. It has none of trustvbd's recovery,
policy, fail-over or bounds: it shows what the machine allows a native data plane over
the same process layout (guest -> encryption domain -> drivers), not what trustvbd does.
Rows: the proxy over 1 and 2 drivers (nbdkit file and `trustvbd driver`), `up` over 2
replicas, nbdkit + luks filter (the reference), measured as bench/run.py measures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from run import measure, report
from servers import (
    TRUSTVBD,
    Server,
    _nbdkit,
    nbdkit_luks,
    parse_size,
    sparse,
    start_ready,
    stop_proc,
    trustvbd_up,
    workdir,
)

CRATE = Path(__file__).resolve().parent / "dataplane_ceiling"
BINARY = CRATE / "target" / "release" / "dataplane-ceiling"


def ceiling(size: int, drivers: int, kind: str) -> Server:
    def start(work: Path) -> tuple[str, Callable[[], None]]:
        with ExitStack() as undo:
            socks = []
            for i in range(drivers):
                image = sparse(work / f"drv{i}.img", size)
                if kind == "nbdkit":
                    uri, stop = _nbdkit(work, f"drv{i}", image, [], [], role="driver")
                    undo.callback(stop)
                    socks.append(uri.split("socket=")[1])
                else:
                    sock = work / f"drv{i}.sock"
                    proc = start_ready([*TRUSTVBD, "driver", "--file", str(image), "--size",
                                        str(size), "--socket", str(sock)], work, "driver")
                    undo.callback(stop_proc(proc))
                    socks.append(str(sock))
            guest = work / "ceiling.sock"
            proc = start_ready([str(BINARY), str(guest), str(work / "intent.log"), str(size),
                                *socks], work, "native-proxy")
            undo.callback(stop_proc(proc))
            stops = undo.pop_all()
        return f"nbd+unix:///?socket={guest}", stops.close
    return Server(f"native ceiling, {drivers} {kind} driver{'s' if drivers > 1 else ''}", start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--fio-runtime", type=int, default=3)
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path",
                    str(CRATE / "Cargo.toml")], check=True)
    size = parse_size(args.size)
    servers = [ceiling(size, 1, "nbdkit"), ceiling(size, 2, "nbdkit"),
               ceiling(size, 2, "trustvbd"), trustvbd_up(size, True, 2), nbdkit_luks()]
    runs: dict[str, list] = {s.name: [] for s in servers}
    with workdir() as src_dir:
        source = src_dir / "source.img"
        source.write_bytes(os.urandom(size))
        for rep in range(args.reps):
            for server in servers:
                print(f"[rep {rep + 1}/{args.reps}] {server.name}", file=sys.stderr)
                runs[server.name].append(measure(server, size, source, args.fio_runtime))
    report({"options": {"size": size, "reps": args.reps, "fio_runtime": args.fio_runtime},
            "suites": {"ceiling": {"reference": "nbdkit + luks filter", "servers": runs}}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
