"""TLS contexts for NBD, from a certificate directory (see x509.py for the layout).

Choices, made once here: TLS 1.2 or later, the client certificate required and
verified against ca-cert.pem (signature, validity dates, purpose), the server
verified by name. Who a verified client is, is its certificate's Common Name.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import Any

from trustvbd.crypt.x509 import CA_CERT, CLIENT_CERT, CLIENT_KEY, MAX_PEM_FILE, SERVER_CERT, SERVER_KEY
from trustvbd.regular_file import NotRegularFile, read_regular

# All an encryption domain reads from a TLS directory (never the CA's private key).
TLS_DOMAIN_FILES = frozenset({CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY})


class TlsSetupError(Exception):
    """A certificate directory cannot be used; the message names the file and the fix."""


def read_tls_file(path: Path) -> bytes:
    """A certificate's or key's bytes, only from a regular file of at most MAX_PEM_FILE
    bytes: OpenSSL opened a FIFO in its place and waited for a writer for good (in `up`,
    or in an encryption domain's event loop), and read a device (/dev/zero) without end.
    FileNotFoundError as open(2); TlsSetupError for anything else that is no such file."""
    try:
        data = read_regular(path, "a certificate or key", MAX_PEM_FILE)
    except NotRegularFile as exc:
        kind = "a directory" if stat.S_ISDIR(exc.mode) else "not a regular file"
        raise TlsSetupError(f"{path} is {kind}, not a PEM certificate or key; put the file"
                            " there (`trustvbd tls init DIR` makes them)") from None
    if len(data) > MAX_PEM_FILE:
        raise TlsSetupError(f"{path} is larger than {MAX_PEM_FILE >> 20} MiB, so no PEM"
                            " certificate or key; put the right file there")
    return data


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding `data` (no name on any filesystem)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, key_path: Path
                     ) -> None:
    """load_cert_chain from bytes: it takes only paths, so each goes to OpenSSL as an
    anonymous memfd named by /proc/self/fd/N (a magic link to that very file, open to
    this process whatever its user; nothing is written to a disk), closed right after.
    An encrypted key is refused: without a password callback OpenSSL asked for its
    passphrase on the terminal and waited (`up`'s check before start, the CLI)."""
    def no_passphrase() -> bytes:
        raise TlsSetupError(f"{key_path} is an encrypted private key, and trustvbd asks"
                            " no passphrase for one: decrypt it (`openssl pkey -in FILE -out FILE`,"
                            " then chmod 600 FILE) or make new files (`trustvbd tls init DIR`)")

    cert_fd = _memfd("tls-cert", cert_pem)
    try:
        key_fd = _memfd("tls-key", key_pem)
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}",
                                password=no_passphrase)
        finally:
            os.close(key_fd)
    finally:
        os.close(cert_fd)


def _context(purpose: ssl._SSLMethod, directory: Path, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        # Each file's bytes as read_tls_file checked them, never its path again: a FIFO
        # swapped in after the check would hold OpenSSL's open() for good.
        ca = read_tls_file(directory / CA_CERT)
        cert_pem, key_pem = read_tls_file(directory / cert), read_tls_file(directory / key)
        ctx.load_verify_locations(cadata=ca.decode("ascii", "ignore"))
        _load_cert_chain(ctx, cert_pem, key_pem, directory / key)
    except FileNotFoundError as exc:
        raise TlsSetupError(f"{exc.filename or directory}: missing; make the directory with"
                            f" `trustvbd tls init {directory}`") from None
    except (ssl.SSLError, ValueError, OSError) as exc:  # ValueError: an empty CA file
        raise TlsSetupError(f"{directory}: cannot use its certificates ({cert}, {key},"
                            f" {CA_CERT}): {exc}") from None
    return ctx


def server_context(directory: Path) -> ssl.SSLContext:
    """For the encryption domain's TLS ports: every client must show a certificate of our CA."""
    return _context(ssl.PROTOCOL_TLS_SERVER, directory, SERVER_CERT, SERVER_KEY)


def client_context(directory: Path) -> ssl.SSLContext:
    """For connections to remote drivers: our client certificate; the server checked by name."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, directory, CLIENT_CERT, CLIENT_KEY)
    ctx.check_hostname = True
    return ctx


def peer_common_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The verified peer certificate's Common Name ('' if there is none)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    subject: Any = (cert or {}).get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def check_tls_dir(directory: Path, server: bool, client: bool) -> None:
    """Before start: the certificates load, and no private key is readable by others."""
    for needed, make, key in ((server, server_context, SERVER_KEY),
                              (client, client_context, CLIENT_KEY)):
        if not needed:
            continue
        make(directory)
        mode = (directory / key).stat().st_mode & 0o777
        if mode & 0o077:
            raise TlsSetupError(f"{directory / key} is readable by others (mode {mode:o}); fix:"
                                f" chmod 600 {directory / key}")
