"""Ed25519 signatures over commits (superblocks), never over single blocks.

Every signed message starts with a context label, so a signature made for one
purpose (a superblock) can never be presented as another.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def fingerprint(public_key: bytes) -> bytes:
    """SHA-256 of the raw 32-byte public key; names a key in superblocks and messages."""
    return hashlib.sha256(public_key).digest()


class Signer:
    """A disk's private signing key (held only in trusted state)."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key: bytes = self._key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)

    def sign(self, context: bytes, message: bytes | bytearray) -> bytes:
        return self._key.sign(context + bytes(message))

    def __repr__(self) -> str:
        return f"Signer(public_key={self.public_key.hex()})"


def verify(public_key: bytes, context: bytes, message: bytes | bytearray, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, context + bytes(message))
    except (InvalidSignature, ValueError):
        return False
    return True
