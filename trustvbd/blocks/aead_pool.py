"""Big requests' AES-GCM on threads of the encryption domain, the event loop kept free.

The native codec (crypt/aead.py) releases the GIL while it seals or opens, so a
thread can do a big request on another core while the event loop goes on
serving other requests. Handing a request to a thread and back costs the event
loop about as much as sealing a few dozen blocks inline (figures in bench/README.md),
so smaller requests are done inline. The threads hold no state of their own: a request
whose caller was cancelled finishes on its own copies and its result is
dropped; nothing is shared with them but the (thread-safe) BlockCipher.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from trustvbd.crypt.aead import BLOCK_SIZE, BlockCipher, Buffer

BULK_MIN = 32  # blocks; below this the hand-over costs the event loop more than it saves


def default_threads() -> int:
    """TRUSTVBD_AEAD_THREADS, else one per core beyond the second (at most 4).

    The domain shares the machine with its drivers and its guests: with two cores there
    is no idle core for a thread, and a thread coming back for the GIL waits behind the
    busy event loop, so everything inline is faster there (bench/README.md).
    """
    value = os.environ.get("TRUSTVBD_AEAD_THREADS")
    if value is not None:
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"TRUSTVBD_AEAD_THREADS={value!r} is not a number; "
                             "give 0 (all AES-GCM on the event loop) or more") from None
        if not 0 <= count <= 64:
            raise ValueError(f"TRUSTVBD_AEAD_THREADS={count} is out of range 0..64")
        return count
    return max(0, min(4, (os.cpu_count() or 1) - 2))


class AeadPool:
    """Threads for big requests' AES-GCM; with 0 threads everything is done inline."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = (ThreadPoolExecutor(threads, thread_name_prefix="trustvbd-aead")
                          if threads else None)
        self.jobs_offloaded = 0

    def inline(self, blocks: int) -> bool:
        """Whether a request of `blocks` blocks is done on the caller's thread (then the
        caller may call the cipher itself and skip a coroutine)."""
        return self._executor is None or blocks < BULK_MIN

    def _offload(self, blocks: int) -> ThreadPoolExecutor | None:
        return self._executor if blocks >= BULK_MIN else None

    async def seal(self, cipher: BlockCipher, first_block: int, first_version: int,
                   plain: Buffer) -> tuple[bytes, bytes]:
        """cipher.seal, on a thread when the request is big."""
        executor = self._offload(len(plain) // BLOCK_SIZE)
        if executor is None:
            return cipher.seal(first_block, first_version, plain)
        self.jobs_offloaded += 1
        return await asyncio.get_running_loop().run_in_executor(
            executor, cipher.seal, first_block, first_version, plain)

    async def open(self, cipher: BlockCipher, first_block: int, ciphertext: Buffer,
                   leaves: Buffer) -> tuple[bytes, list[int]]:
        """cipher.open, on a thread when the request is big."""
        executor = self._offload(len(ciphertext) // BLOCK_SIZE)
        if executor is None:
            return cipher.open(first_block, ciphertext, leaves)
        self.jobs_offloaded += 1
        return await asyncio.get_running_loop().run_in_executor(
            executor, cipher.open, first_block, ciphertext, leaves)

    async def close(self) -> None:
        """Stop the threads once their jobs (a few ms at most) are done."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


INLINE = AeadPool(0)  # for disks opened without a pool (tools, tests)
