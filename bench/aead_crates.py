"""AES-256-GCM per 4 KiB block: candidate Rust crates vs Python's `cryptography` (issue #13).

    .venv/bin/python bench/aead_crates.py [--blocks N]

Rows (ns per block, best of 25 runs): the Rust crates alone (bench/aead_crates/, built with
cargo --release: RustCrypto aes-gcm, ring, aws-lc-rs), `cryptography`'s AESGCM called once
per block from Python (encrypt_into/decrypt_into, the cheapest calls it has), and
trustvbd's native codec (trustvbd._native, on the chosen crate) per request of 1 and 64
blocks, Python call included. The machine is shared: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = Path(__file__).resolve().parent
BS = 4096
REPS = 25


def best_ns(blocks: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(REPS):
        start = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - start) / blocks)
    return best


def rust_crates(blocks: int) -> list[tuple[str, float]]:
    cargo = os.environ.get("CARGO", "cargo")
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":" + str(Path.home() / ".cargo/bin")}
    out = subprocess.run([cargo, "run", "--quiet", "--release", "--locked", "--manifest-path",
                          str(HERE / "aead_crates/Cargo.toml"), "--", str(blocks)],
                         check=True, capture_output=True, text=True, env=env).stdout
    rows = []
    for line in out.splitlines():
        name, op, ns = line.split()
        rows.append((f"{name} (Rust alone) {op}", float(ns)))
    return rows


def python_cryptography(blocks: int) -> list[tuple[str, float]]:
    aead = AESGCM(bytes(range(32)))
    aad = bytes(32)
    plain = bytes(BS)
    out = bytearray(BS + 16)
    nonces = [i.to_bytes(8, "big") + bytes(4) for i in range(1, blocks + 1)]

    def seal() -> None:
        for nonce in nonces:
            aead.encrypt_into(nonce, plain, aad, out)

    sealed = [aead.encrypt(n, plain, aad) for n in nonces[:64]]
    clear = bytearray(BS)

    def open_() -> None:
        for i in range(blocks):
            aead.decrypt_into(nonces[i % 64], sealed[i % 64], aad, clear)

    return [("cryptography AESGCM, one call per block, seal", best_ns(blocks, seal)),
            ("cryptography AESGCM, one call per block, open", best_ns(blocks, open_))]


def native_codec(blocks: int) -> list[tuple[str, float]]:
    from trustvbd._native import BlockCodec

    codec = BlockCodec(bytes(range(32)), bytes(16), 12345)
    rows = []
    for per_call in (1, 64):
        calls = max(1, blocks // per_call)
        plain = bytes(per_call * BS)
        ct, leaves = codec.seal(0, 1, plain)

        def seal(per_call: int = per_call, calls: int = calls, plain: bytes = plain) -> None:
            for c in range(calls):
                codec.seal(c * per_call, 1 + c * per_call, plain)

        def open_(calls: int = calls, ct: bytes = ct, leaves: bytes = leaves) -> None:
            for _ in range(calls):
                codec.open(0, ct, leaves)

        rows.append((f"trustvbd._native, {per_call} block(s) per call, seal", best_ns(calls * per_call, seal)))
        rows.append((f"trustvbd._native, {per_call} block(s) per call, open", best_ns(calls * per_call, open_)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=2000)
    args = parser.parse_args()
    rows = rust_crates(args.blocks) + python_cryptography(args.blocks)
    try:
        rows += native_codec(args.blocks)
    except ImportError as exc:
        print(f"(trustvbd._native not built: {exc}; run `make deps`)", file=sys.stderr)
    width = max(len(name) for name, _ in rows)
    print(f"{'AES-256-GCM, 4 KiB block':<{width}}  ns/block")
    for name, ns in rows:
        print(f"{name:<{width}}  {ns:8.0f}")


if __name__ == "__main__":
    main()
