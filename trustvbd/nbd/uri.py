"""NBD URIs (the NBD project's URI spec, as used by qemu, libnbd and nbdkit).

    nbd+unix:///EXPORT?socket=/abs/path.sock
    nbd://HOST[:PORT]/EXPORT          (PORT defaults to 10809; [v6] hosts allowed)
    nbds://HOST[:PORT]/EXPORT, nbds+unix:///EXPORT?socket=PATH   (TLS, x509)

The export is the URL-decoded path without its leading slash ("" = default).
TLS URIs take libnbd's query keys `tls-certificates=DIR` (a directory with
ca-cert.pem, client-cert.pem, client-key.pem) and `tls-hostname=NAME` (the name
the server's certificate must carry; default the host, or "localhost" for a
Unix socket).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_PORT = 10809
_TLS_KEYS = {"tls-certificates", "tls-hostname"}


@dataclass(frozen=True)
class NbdUri:
    transport: str  # "unix" or "tcp"
    socket_path: str | None
    host: str | None
    port: int | None
    export: str
    tls: bool = False
    tls_certificates: str | None = None  # the URI's own certificate directory, if it names one
    tls_hostname: str | None = None

    @property
    def server_name(self) -> str:
        """The name the server's certificate is checked against (TLS only)."""
        return self.tls_hostname or (self.host if self.transport == "tcp" and self.host
                                     else "localhost")

    def __str__(self) -> str:
        export = quote(self.export, safe="")
        s = "s" if self.tls else ""
        if self.transport == "unix":
            return f"nbd{s}+unix:///{export}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd{s}://{host}:{self.port}/{export}"


def _one(uri: str, query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    if values is None:
        return None
    if len(values) != 1 or not values[0]:
        raise ValueError(f"{uri!r}: give ?{key}= exactly once, with a value")
    return values[0]


def parse_uri(uri: str) -> NbdUri:
    """Parse an NBD URI; ValueError says what is wrong and what a valid one looks like."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # "Invalid IPv6 URL" alone named neither the URI nor the fix
        raise ValueError(f"{uri!r}: cannot parse it ({exc}); expected nbd+unix:///EXPORT?"
                         "socket=PATH or nbd://HOST:PORT/EXPORT (an IPv6 host in brackets: "
                         "nbd://[::1]:10809/EXPORT)") from exc
    scheme = parts.scheme.lower()
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    tls = scheme in ("nbds", "nbds+unix")
    allowed = _TLS_KEYS if tls else set()
    tls_dir = _one(uri, query, "tls-certificates") if tls else None
    tls_host = _one(uri, query, "tls-hostname") if tls else None
    if scheme in ("nbd+unix", "nbds+unix"):
        if parts.netloc:
            raise ValueError(
                f"{uri!r}: a Unix-socket URI has no host; write {scheme}:///EXPORT?socket=PATH"
            )
        extra = set(query) - {"socket"} - allowed
        if extra:
            raise ValueError(f"{uri!r}: unsupported query parameter(s) {sorted(extra)}")
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError(f"{uri!r}: needs exactly one ?socket=/path/to.sock")
        return NbdUri("unix", sockets[0], None, None, export, tls, tls_dir, tls_host)
    if scheme in ("nbd", "nbds"):
        extra = set(query) - allowed
        if extra:
            raise ValueError(f"{uri!r}: unsupported query parameter(s) {sorted(extra)}"
                             + ("; nbd:// URIs take none" if not tls else ""))
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"{uri!r}: bad port ({exc})") from exc
        if not host:
            raise ValueError(f"{uri!r}: needs a host, as in {scheme}://127.0.0.1:10809/EXPORT")
        return NbdUri("tcp", None, host, port if port is not None else DEFAULT_PORT, export, tls,
                      tls_dir, tls_host)
    raise ValueError(
        f"{uri!r}: not an NBD URI; expected nbd+unix:///EXPORT?socket=PATH, "
        "nbd://HOST:PORT/EXPORT, or their TLS forms nbds+unix:// and nbds://"
    )
