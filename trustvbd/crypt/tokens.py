"""Role tokens: how a trusted domain proves to the access-control domain what it is.

The launcher makes one random secret per start and hands it to the
access-control domain alone (through a pipe); every other domain it starts gets
the token of its own role (an HMAC of the role's canonical text under that
secret). A domain can prove its role and nothing more: a token for
"crypt:disk1" says nothing about disk2.
"""

from __future__ import annotations

import hashlib
import hmac
import os

SECRET_SIZE = 32
_CONTEXT = b"trustvbd-role-token-v1\x00"


def new_secret() -> bytes:
    return os.urandom(SECRET_SIZE)


def role_token(secret: bytes, role: str) -> str:
    return hmac.new(secret, _CONTEXT + role.encode(), hashlib.sha256).hexdigest()


def token_ok(secret: bytes, role: str, token: object) -> bool:
    return isinstance(token, str) and hmac.compare_digest(role_token(secret, role), token)
