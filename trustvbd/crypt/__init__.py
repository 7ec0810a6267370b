"""The only place that touches cryptographic primitives: small recipes, no knobs.

- `aead`: AES-256-GCM per 4 KiB block, nonce and AAD bound to (disk, block, version).
- `tree`: SHA-256 hash tree over leaf pages.
- `sign`: Ed25519 signatures over commits.
- `superblock`: the signed per-commit record stored on replicas.
- `keys`: per-disk secrets wrapped by a key file or a scrypt passphrase.
"""

from trustvbd.crypt.aead import BlockCipher
from trustvbd.crypt.keys import DiskSecrets, Kek, KeyFileError, WrongKeyError
from trustvbd.crypt.sign import Signer, fingerprint, verify
from trustvbd.crypt.tree import HashTree, page_hash

__all__ = [
    "BlockCipher",
    "DiskSecrets",
    "HashTree",
    "Kek",
    "KeyFileError",
    "Signer",
    "WrongKeyError",
    "fingerprint",
    "page_hash",
    "verify",
]
