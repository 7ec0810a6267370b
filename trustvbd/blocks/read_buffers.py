"""A pool of buffers for big reads of the encryption domain (crypt_layer.py)."""

from __future__ import annotations

import sys
from collections import deque


class ReadBuffers:
    """Reused bytearrays for big reads: the ciphertext is received into one and opened in
    place, so the plaintext handed on is that same buffer.

    A buffer is handed out again only once nothing but this pool refers to it: the reply
    that carried it has left (a transport holding it, a memoryview or buffer export of
    it, a caller keeping it: each adds a reference). Buffers come back in about the order
    they went out, so the few least recently handed out are the ones looked at. At most
    `kept` bytes are pooled; a read that finds none free gets a fresh buffer.
    """

    LOOK_AT = 32

    def __init__(self, kept: int) -> None:
        self._pooled: dict[int, deque[bytearray]] = {}
        self._kept, self._held = kept, 0

    def get(self, size: int) -> bytearray:
        pooled = self._pooled.get(size)
        if pooled is None:
            pooled = self._pooled[size] = deque()
        for _ in range(min(len(pooled), self.LOOK_AT)):
            buf = pooled.popleft()
            pooled.append(buf)
            # 3 references: the deque, `buf`, getrefcount's argument.
            if sys.getrefcount(buf) == 3:
                return buf
        buf = bytearray(size)
        while self._held + size > self._kept and self._drop_one_free(size):
            pass
        if self._held + size <= self._kept:
            pooled.append(buf)
            self._held += size
        return buf

    def _drop_one_free(self, size: int) -> bool:
        """Room for a buffer of `size`: let go of a free one of another size, if any."""
        for other, pooled in self._pooled.items():
            if other != size and pooled and sys.getrefcount(pooled[0]) == 2:  # deque, argument
                pooled.popleft()
                self._held -= other
                return True
        return False
