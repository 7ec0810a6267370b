"""Certificates for NBD over TLS: a private CA and the certificates it issues.

The directory layout is the one qemu-nbd, nbdkit and libnbd share:

    ca-cert.pem                      the CA every peer trusts (ca-key.pem signs; keep it apart)
    server-cert.pem, server-key.pem  the encryption domain's server identity
    client-cert.pem, client-key.pem  the encryption domain's identity towards remote drivers
    guests/NAME/                     one client directory per guest (ca-cert.pem, client-*.pem)

Choices, made once here: ECDSA P-256 keys, SHA-256 signatures, a CA valid for ten
years, leaf certificates for two. Keys are written 0600 and never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustvbd.regular_file import NotRegularFile, read_regular

CA_DAYS = 3650
LEAF_DAYS = 730
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY = "ca-cert.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
# A certificate, a key or a CA bundle (the system's is ~200 KiB) is smaller than this.
MAX_PEM_FILE = 1 << 20


class CertificateError(Exception):
    """A certificate directory cannot be made or used; the message says what to do."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (a key is never readable by others, even briefly)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise CertificateError(f"{path} already exists; move it aside to make a new one") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    _write_new(path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_new(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _read_pem(path: Path) -> bytes:
    """A PEM file's bytes, only from a regular file (a FIFO in its place held `tls guest` in
    open() for good, /dev/zero was read until memory ran out)."""
    try:
        return read_regular(path, "a PEM file", MAX_PEM_FILE)
    except NotRegularFile:
        raise CertificateError(f"{path} is not a regular file, so not the CA's PEM file; put"
                               " it back (or make a new CA with `trustvbd tls init`)") from None


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(_read_pem(directory / CA_CERT))
        key = serialization.load_pem_private_key(_read_pem(directory / CA_KEY), None)
    except FileNotFoundError as exc:
        raise CertificateError(f"{exc.filename} is missing; run `trustvbd tls init {directory}`"
                               " first") from None
    except ValueError as exc:
        raise CertificateError(f"{directory}: the CA certificate or key is unreadable: {exc}"
                               ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{directory / CA_KEY}: not a key trustvbd made (expected ECDSA)")
    return cert, key


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
          server: bool, alt_names: Iterable[str], days: int,
          not_before: datetime.datetime | None = None,
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # qemu refuses leaf certificates without keyEncipherment, whatever the key type.
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    names = _alt_names(alt_names)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init_ca(directory: Path, server_names: Iterable[str] = (), ca_name: str = "trustvbd CA",
            ) -> list[Path]:
    """Make a CA, the server certificate (for localhost/127.0.0.1/::1 and `server_names`)
    and the client certificate, in `directory` (created 0700). Returns the files written."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = [directory / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT,
                                        CLIENT_KEY) if (directory / n).exists()]
    if existing:
        raise CertificateError(f"{existing[0]} already exists: {directory} holds certificates"
                               " already; use another directory, or move them aside")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - datetime.timedelta(minutes=5)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / CA_KEY, ca_key)
    _write_cert(directory / CA_CERT, ca_cert)
    extra = list(server_names)
    names = list(dict.fromkeys([*DEFAULT_SERVER_NAMES, *extra]))
    server_cert, server_key = _leaf(ca_cert, ca_key, extra[0] if extra else "localhost",
                                    True, names, LEAF_DAYS)
    _write_key(directory / SERVER_KEY, server_key)
    _write_cert(directory / SERVER_CERT, server_cert)
    client_cert, client_key = _leaf(ca_cert, ca_key, "trustvbd", False, (), LEAF_DAYS)
    _write_key(directory / CLIENT_KEY, client_key)
    _write_cert(directory / CLIENT_CERT, client_cert)
    return [directory / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT,
                                    CLIENT_KEY)]


def issue_guest(directory: Path, common_name: str, out: Path | None = None,
                days: int = LEAF_DAYS, not_before: datetime.datetime | None = None) -> Issued:
    """Issue a client certificate for guest `common_name` into `out` (default
    DIRECTORY/guests/NAME): a directory libnbd, qemu and nbdkit take as is."""
    ca_cert, ca_key = _load_ca(directory)
    target = out if out is not None else directory / "guests" / common_name
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = _leaf(ca_cert, ca_key, common_name, False, (), days, not_before)
    _write_key(target / CLIENT_KEY, key)
    _write_cert(target / CLIENT_CERT, cert)
    if not (target / CA_CERT).exists():
        _write_cert(target / CA_CERT, ca_cert)
    return Issued(target / CLIENT_CERT, target / CLIENT_KEY)
