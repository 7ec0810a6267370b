"""A loop of TLS handshakes without a certificate against a guest's NBD TLS port, from one
address, for the CPU they cost the encryption domain (bench/README.md, session 20, h6).

    .venv/bin/python bench/tls_flood.py PORT SOURCE SECONDS [PROCESSES]

SOURCE: any 127.x.y.z on loopback. Prints the connections made and the handshakes the server
took part in; read the encryption domain's utime+stime (/proc/PID/stat) around it.
"""

from __future__ import annotations

import multiprocessing
import sys

from tests.interop.test_listener_flood import tls_handshakes


def main() -> None:
    port, source, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    processes = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    with multiprocessing.Pool(processes) as pool:
        results = pool.starmap(tls_handshakes, [(port, source, seconds)] * processes)
    print(f"{sum(c for c, _ in results)} connections, {sum(h for _, h in results)} TLS"
          f" handshakes in {seconds:g} s from {source}")


if __name__ == "__main__":
    main()
