"""NBD URIs (the NBD project's URI spec, as used by qemu, libnbd and nbdkit).

    nbd+unix:///EXPORT?socket=/abs/path.sock
    nbd://HOST[:PORT]/EXPORT          (PORT defaults to 10809; [v6] hosts allowed)

The export is the URL-decoded path without its leading slash ("" = default).
TLS (nbds://) is not supported and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class NbdUri:
    transport: str  # "unix" or "tcp"
    socket_path: str | None
    host: str | None
    port: int | None
    export: str

    def __str__(self) -> str:
        export = quote(self.export, safe="")
        if self.transport == "unix":
            return f"nbd+unix:///{export}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"


def parse_uri(uri: str) -> NbdUri:
    """Parse an NBD URI; ValueError says what is wrong and what a valid one looks like."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    if scheme in ("nbds", "nbds+unix"):
        raise ValueError(f"{uri!r}: TLS NBD URIs are not supported; use nbd:// or nbd+unix://")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError(
                f"{uri!r}: a Unix-socket URI has no host; write nbd+unix:///EXPORT?socket=PATH"
            )
        extra = set(query) - {"socket"}
        if extra:
            raise ValueError(f"{uri!r}: unsupported query parameter(s) {sorted(extra)}")
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError(f"{uri!r}: needs exactly one ?socket=/path/to.sock")
        return NbdUri("unix", sockets[0], None, None, export)
    if scheme == "nbd":
        if query:
            raise ValueError(f"{uri!r}: nbd:// URIs take no query parameters")
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"{uri!r}: bad port ({exc})") from exc
        if not host:
            raise ValueError(f"{uri!r}: needs a host, as in nbd://127.0.0.1:10809/EXPORT")
        return NbdUri("tcp", None, host, port if port is not None else DEFAULT_PORT, export)
    raise ValueError(
        f"{uri!r}: not an NBD URI; expected nbd+unix:///EXPORT?socket=PATH "
        "or nbd://HOST:PORT/EXPORT"
    )
