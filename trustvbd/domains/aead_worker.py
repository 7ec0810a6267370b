"""An AEAD worker of the encryption domain: encrypts and decrypts blocks in shared memory.

Started by the encryption domain (never by the launcher: it is part of that
domain, with its trust and its keys) with a SOCK_SEQPACKET socket and a memfd;
see blocks/aead_jobs.py for the messages. It does no I/O but on that socket,
keeps nothing but the data keys it was given, and dies with its parent.
"""

from __future__ import annotations

import argparse
import mmap
import socket
import sys

from trustvbd.blocks import aead_jobs as j
from trustvbd.crypt.aead import LEAF_SIZE, BlockCipher, BlockViews
from trustvbd.domains.common import die_with_parent, quiet_garbage_collector


def slot_views(view: memoryview, slot: int, op: bytes) -> BlockViews:
    """Views of one slot for one operation, for all MAX_BLOCKS blocks (jobs use the first n)."""
    base = slot * j.SLOT_SIZE
    data = view[base:base + j.DATA_BYTES]
    leaves = view[base + j.LEAVES_OFFSET:base + j.LEAVES_OFFSET + j.MAX_BLOCKS * LEAF_SIZE]
    if op == j.OP_ENCRYPT:
        out = view[base + j.OUT_OFFSET:base + j.OUT_OFFSET + j.DATA_BYTES]
        return BlockViews(data, leaves, out, j.MAX_BLOCKS, encrypt=True)
    return BlockViews(data, leaves, data, j.MAX_BLOCKS, encrypt=False)  # decrypt in place


def serve(sock: socket.socket, shm: mmap.mmap) -> None:
    ciphers: dict[int, BlockCipher] = {}
    view = memoryview(shm)
    views: dict[tuple[int, bytes], BlockViews] = {}  # cut once per slot and operation
    while True:
        msg = sock.recv(j.KEY.size + 16)
        if not msg:
            return  # the encryption domain closed the socket: done
        op = msg[:1]
        if op == j.OP_KEY and len(msg) == j.KEY.size:
            _, disk, key, disk_id, key_id = j.KEY.unpack(msg)
            ciphers[disk] = BlockCipher(key, disk_id, key_id)
            continue
        if op == j.OP_FORGET and len(msg) == j.FORGET.size:
            ciphers.pop(j.FORGET.unpack(msg)[1], None)
            continue
        if len(msg) != j.JOB.size or op not in (j.OP_ENCRYPT, j.OP_DECRYPT):
            raise SystemExit(f"AEAD worker: malformed message of {len(msg)} bytes")
        _, job, disk, slot, n, block, version = j.JOB.unpack(msg)
        cipher = ciphers.get(disk)
        if cipher is None or not 0 < n <= j.MAX_BLOCKS or not 0 <= slot < j.SLOTS:
            sock.send(j.encode_reply(job, j.STATUS_REFUSED, []))
            continue
        run = views.get((slot, op))
        if run is None:
            run = views[slot, op] = slot_views(view, slot, op)
        if op == j.OP_ENCRYPT:
            cipher.encrypt_views(block, version, run, n)
            bad: list[int] = []
        else:
            bad = cipher.decrypt_views(block, run, n)
        sock.send(j.encode_reply(job, j.STATUS_OK, bad))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustvbd.domains.aead_worker")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--memory-fd", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    quiet_garbage_collector()
    sock = socket.socket(fileno=args.socket_fd)
    sock.setblocking(True)
    shm = mmap.mmap(args.memory_fd, j.SLOTS * j.SLOT_SIZE)
    try:
        serve(sock, shm)
    except ConnectionError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
