"""Listening sockets the hypervisor binds and hands to domains (guests', drivers', its own)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def listen_unix(path: Path, owner: int | None = None) -> socket.socket:
    """A listening socket only its owner (`owner`, else us) and root may connect to."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    if owner is not None:
        os.chown(path, owner, -1)
    sock.listen(128)
    return sock


def listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def close_listeners(socks: list[socket.socket]) -> None:
    for sock in socks:
        if sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                Path(sock.getsockname()).unlink()
        sock.close()
