"""Per-disk secrets and their wrapping under a key-encryption key (KEK).

Each disk has a random 32-byte data key (block AEAD), a random Ed25519 signing
seed and a random 16-byte disk id. The secrets are stored only in the trusted
state directory, wrapped (AES-256-GCM, random nonce) by a KEK that comes from
either a 32-byte key file (the default) or a passphrase stretched with scrypt
(salt and cost stored per disk). Rewrapping under a new KEK changes only this
small file, never the data on any replica.

A wrong KEK fails the GCM tag of the wrap, which is reported as `WrongKeyError`
(a clear "this key does not unlock that disk"), never as data corruption.
The byte layout is documented in docs/format.md ("keys").
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from trustvbd.crypt.sign import Signer
from trustvbd.regular_file import NotRegularFile, open_regular

KEK_FILE = 1
KEK_PASSPHRASE = 2
_KIND_NAMES = {KEK_FILE: "key file", KEK_PASSPHRASE: "passphrase"}

# scrypt cost: ~0.3 s and 128 MiB per unlock here (OWASP's 2^17, 8, 1).
_SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P = 17, 8, 1
# What a keys file may ask of scrypt: a damaged or hostile file must not make an
# unlock allocate gigabytes, run for hours, or overflow the library's arithmetic.
_SCRYPT_MAX_LOG_N, _SCRYPT_MAX_R, _SCRYPT_MAX_P, _SCRYPT_MAX_MEMORY = 20, 32, 16, 1 << 30

_MAGIC = b"TVBDKEYS"
_VERSION = 1
_HEADER = struct.Struct(">8sII16s16sIIII32s")  # up to and including the public key
_WRAPPED = 12 + 32 + 16  # nonce || ciphertext || tag
KEYS_FILE_SIZE = _HEADER.size + 2 * _WRAPPED + 4
_AAD_LABEL = b"trustvbd-keywrap-v1\x00"


class WrongKeyError(Exception):
    """The key file or passphrase given does not unlock this disk."""


class KeyFileError(Exception):
    """A key file or keys file is missing, malformed, corrupt or too open."""


class Kek:
    """A key-encryption key source. `repr` never shows the secret."""

    def __init__(self, kind: int, secret: bytes, source: str) -> None:
        self.kind = kind
        self._secret = secret
        self.source = source  # where it came from, for messages ("key file /x/kek.key")
        self._derived: dict[tuple[bytes, int, int, int], bytes] = {}

    @classmethod
    def from_passphrase(cls, passphrase: str) -> Kek:
        if not passphrase:
            raise WrongKeyError("an empty passphrase cannot protect a disk")
        return cls(KEK_PASSPHRASE, passphrase.encode("utf-8"), "the passphrase")

    @classmethod
    def from_key_file(cls, path: Path, *, create: bool) -> Kek:
        """Read a 32-byte key file; with `create`, make a new random one (mode 0600) if absent."""
        if create and not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            fd = open_regular(path, "a key file")
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist") from None
        except NotRegularFile:
            raise KeyFileError(f"key file {path} is not a regular file (a key file is one of"
                               " 32 bytes): check the path, or restore the file") from None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 33)  # one more than a key: a longer file is refused below
        finally:
            os.close(fd)
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        if len(data) != 32:
            raise KeyFileError(f"key file {path} must hold exactly 32 bytes, it holds"
                               f" {st.st_size}")
        return cls(KEK_FILE, data, f"key file {path}")

    def _key_for(self, salt: bytes, log_n: int, r: int, p: int) -> bytes:
        if self.kind == KEK_FILE:
            return self._secret
        params = (salt, log_n, r, p)
        if params not in self._derived:
            self._derived[params] = Scrypt(salt=salt, length=32, n=1 << log_n, r=r, p=p).derive(
                self._secret)
        return self._derived[params]

    def __repr__(self) -> str:
        return f"Kek({_KIND_NAMES[self.kind]}, {self.source})"


@dataclass(frozen=True)
class DiskSecrets:
    disk_id: bytes
    data_key: bytes = field(repr=False)
    signing_seed: bytes = field(repr=False)
    public_key: bytes

    @classmethod
    def generate(cls) -> DiskSecrets:
        seed = os.urandom(32)
        return cls(os.urandom(16), os.urandom(32), seed, Signer(seed).public_key)

    def signer(self) -> Signer:
        return Signer(self.signing_seed)


def _aad(header: bytes, purpose: bytes) -> bytes:
    return _AAD_LABEL + purpose + b"\x00" + header


def seal_keys(secrets: DiskSecrets, kek: Kek) -> bytes:
    """The keys file contents for `secrets` wrapped under `kek` (fresh salt and nonces)."""
    if kek.kind == KEK_PASSPHRASE:
        salt, log_n, r, p = os.urandom(16), _SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P
    else:
        salt, log_n, r, p = bytes(16), 0, 0, 0
    header = _HEADER.pack(_MAGIC, _VERSION, kek.kind, secrets.disk_id, salt, log_n, r, p, 0,
                          secrets.public_key)
    aead = AESGCM(kek._key_for(salt, log_n, r, p))
    out = bytearray(header)
    for purpose, secret in ((b"data key", secrets.data_key),
                            (b"signing key", secrets.signing_seed)):
        nonce = os.urandom(12)
        out += nonce + aead.encrypt(nonce, secret, _aad(header, purpose))
    out += struct.pack(">I", zlib.crc32(out))
    return bytes(out)


def _parse_header(blob: bytes, where: str) -> tuple:
    if len(blob) != KEYS_FILE_SIZE:
        raise KeyFileError(f"{where}: keys file is {len(blob)} bytes, expected {KEYS_FILE_SIZE}")
    (crc,) = struct.unpack_from(">I", blob, KEYS_FILE_SIZE - 4)
    if zlib.crc32(blob[:-4]) != crc:
        raise KeyFileError(f"{where}: keys file checksum mismatch (file corrupted)")
    fields = _HEADER.unpack_from(blob, 0)
    if fields[0] != _MAGIC or fields[1] != _VERSION or fields[2] not in _KIND_NAMES:
        raise KeyFileError(f"{where}: not a version-{_VERSION} trustvbd keys file")
    kind, salt, log_n, r, p, reserved = fields[2], fields[4], fields[5], fields[6], fields[7], fields[8]
    if reserved:
        raise KeyFileError(f"{where}: keys file reserved bytes 60-63 are not zero (file corrupted)")
    if kind == KEK_FILE and (any(salt) or log_n or r or p):
        raise KeyFileError(f"{where}: keys file for a key file carries scrypt parameters"
                           " (file corrupted)")
    if kind == KEK_PASSPHRASE and not (
            1 <= log_n <= _SCRYPT_MAX_LOG_N and 1 <= r <= _SCRYPT_MAX_R
            and 1 <= p <= _SCRYPT_MAX_P and 128 * r << log_n <= _SCRYPT_MAX_MEMORY
            and log_n < 16 * r):  # RFC 7914: N < 2^(128 r / 8)
        raise KeyFileError(
            f"{where}: keys file asks scrypt for N=2^{log_n}, r={r}, p={p}, outside what this"
            f" reader accepts (log2 N 1-{_SCRYPT_MAX_LOG_N} and below 16 r, r 1-{_SCRYPT_MAX_R},"
            f" p 1-{_SCRYPT_MAX_P}, at most {_SCRYPT_MAX_MEMORY >> 20} MiB): the file is"
            " damaged or was not written by trustvbd; restore it from a backup")
    return fields


def read_public(blob: bytes, where: str) -> tuple[bytes, bytes, int]:
    """(disk_id, public_key, kek kind) from a keys file, without any secret."""
    f = _parse_header(blob, where)
    return f[3], f[9], f[2]


def open_keys(blob: bytes, kek: Kek, where: str) -> DiskSecrets:
    """Unwrap a keys file; `where` names the disk for messages."""
    _, _, kind, disk_id, salt, log_n, r, p, _, public_key = _parse_header(blob, where)
    if kind != kek.kind:
        raise WrongKeyError(
            f"{where} is protected by a {_KIND_NAMES[kind]}, but {kek.source} was given; "
            f"unlock it with its {_KIND_NAMES[kind]}")
    header = blob[:_HEADER.size]
    aead = AESGCM(kek._key_for(salt, log_n, r, p))
    secrets = []
    off = _HEADER.size
    for purpose in (b"data key", b"signing key"):
        nonce, wrapped = blob[off:off + 12], blob[off + 12:off + _WRAPPED]
        off += _WRAPPED
        try:
            secrets.append(aead.decrypt(nonce, wrapped, _aad(header, purpose)))
        except InvalidTag:
            raise WrongKeyError(
                f"{kek.source} does not unlock {where}: wrong "
                f"{_KIND_NAMES[kind]} (nothing was changed; retry with the right one)") from None
    result = DiskSecrets(disk_id, secrets[0], secrets[1], public_key)
    if result.signer().public_key != public_key:
        raise KeyFileError(f"{where}: the signing key does not match the stored public key")
    return result
