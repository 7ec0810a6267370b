"""Bulk AES-GCM in worker processes of the encryption domain, over shared memory.

The encryption domain is one Python process; per 4 KiB block the AEAD call and
the Python around it cost ~1.5 us, which made sequential reads CPU-bound on one
core while the other idled. A request of at least BULK_MIN blocks is copied into
a free slot of shared memory and done by a worker (blocks/aead_jobs.py gives the
format; domains/aead_worker.py is the worker) while this process goes on serving
other requests. Small requests, and any chunk for which no slot or worker is
free, are done here at once: that also balances the load between this process
and the workers. The recipe is the same BlockCipher on both sides.

A worker that dies, refuses a job or stalls for WORKER_STALL seconds (then it is
killed) costs nothing but speed: its jobs are done again here, from the inputs
that were never touched, and a new worker takes its place (with every disk's
key), at most MAX_RESTARTS times per RESTART_WINDOW; then its share is done here.
A worker only ever sees plaintext and keys this process already holds.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from trustvbd.blockdev import Lent
from trustvbd.blocks import aead_jobs as j
from trustvbd.crypt.aead import BLOCK_SIZE as BS
from trustvbd.crypt.aead import LEAF_SIZE, BlockCipher

log = logging.getLogger("trustvbd.crypt.aead")

BULK_MIN = 16  # blocks; below this the copies and the round trip cost more than they save
WORKER_STALL = 10.0  # seconds a job may take before its worker is declared stuck
MAX_RESTARTS = 3  # replacements of one worker within RESTART_WINDOW seconds; then none
RESTART_WINDOW = 60.0


def default_workers() -> int:
    """TRUSTVBD_AEAD_WORKERS, else one per core beyond the first (at most 4)."""
    value = os.environ.get("TRUSTVBD_AEAD_WORKERS")
    if value is not None:
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"TRUSTVBD_AEAD_WORKERS={value!r} is not a number; "
                             "give 0 (no workers) or more") from None
        if not 0 <= count <= 64:
            raise ValueError(f"TRUSTVBD_AEAD_WORKERS={count} is out of range 0..64")
        return count
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass(eq=False)
class _Worker:
    number: int
    sock: socket.socket
    proc: subprocess.Popen[bytes]
    pending: dict[int, _Job] = field(default_factory=dict)
    alive: bool = True


@dataclass(eq=False)
class _Job:
    id: int
    slot: int
    future: asyncio.Future[tuple[int, list[int]]]
    blocks: int = 0
    started: float = 0.0
    released: bool = False
    # I/O that writes or reads the slot and must end before it is reused (see `hold`).
    holder: asyncio.Future[None] | None = None
    # The worker was killed while it had this job: it might still have been writing
    # the slot as it died, so the slot is never reused (a few MiB, on a bug path).
    lost: bool = False
    # The worker is done with the job (answered, or retired). Not `future.done()`:
    # cancelling the caller cancels the future while the worker still writes the slot.
    answered: bool = False
    release_on_answer: bool = False


class AeadPool:
    """Worker processes plus the shared slots they work in. Use `AeadPool.start(n)`."""

    def __init__(self, memfd: int, shm: mmap.mmap) -> None:
        self._memfd = memfd
        self._shm = shm
        self._view = memoryview(shm)
        self._free_slots = list(range(j.SLOTS))
        self._workers: list[_Worker] = []
        self._next_job = 0
        self._next_disk = 0
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.jobs_offloaded = 0
        self._keys: dict[int, bytes] = {}  # disk -> its KEY message, for replacement workers
        self._restart_times: dict[int, list[float]] = {}
        self._closing = False
        self.restarts = 0

    @classmethod
    async def start(cls, count: int) -> AeadPool:
        memfd = os.memfd_create("trustvbd-aead", os.MFD_CLOEXEC)
        os.ftruncate(memfd, j.SLOTS * j.SLOT_SIZE)
        pool = cls(memfd, mmap.mmap(memfd, j.SLOTS * j.SLOT_SIZE))
        for number in range(count):
            pool._spawn(number)
        pool._arm_watchdog()
        return pool

    def _spawn(self, number: int) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trustvbd.domains.aead_worker",
                 "--socket-fd", str(theirs.fileno()), "--memory-fd", str(self._memfd)],
                pass_fds=(theirs.fileno(), self._memfd), stdin=subprocess.DEVNULL,
                # Out of the terminal's job: Ctrl-C is for the launcher, which stops the
                # domain, which closes the worker's socket (or dies, and PDEATHSIG ends it).
                process_group=0)
        mine.setblocking(False)
        worker = _Worker(number, mine, proc)
        self._workers.append(worker)
        self._loop.add_reader(mine.fileno(), self._on_replies, worker)
        for key in self._keys.values():
            self._send(worker, key)

    def _replace(self, dead: _Worker) -> None:
        """A new worker in place of one that was retired for a fault."""
        if self._closing:
            return
        now = self._loop.time()
        times = [t for t in self._restart_times.get(dead.number, []) if now - t < RESTART_WINDOW]
        if len(times) >= MAX_RESTARTS:
            log.error("AEAD worker %d failed %d times within %.0f s; not restarting it again",
                      dead.number, len(times) + 1, RESTART_WINDOW)
            return
        self._restart_times[dead.number] = [*times, now]
        self._workers.remove(dead)
        self._loop.run_in_executor(None, dead.proc.wait)  # reap it (it was killed)
        try:
            self._spawn(dead.number)
        except OSError as exc:
            log.error("AEAD worker %d cannot be restarted: %s", dead.number, exc)
            return
        self.restarts += 1
        log.warning("AEAD worker %d restarted (pid %d), restart %d", dead.number,
                    self._workers[-1].proc.pid, self.restarts)

    @property
    def live_workers(self) -> int:
        return sum(w.alive for w in self._workers)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.alive]

    def cipher(self, data_key: bytes, disk_id: bytes, key_id: int = 0) -> BulkCipher:
        """A cipher for one disk (encrypting under `key_id`): its key goes to every worker."""
        disk = self._next_disk
        self._next_disk += 1
        self._keys[disk] = j.KEY.pack(j.OP_KEY, disk, data_key, disk_id, key_id)
        for worker in self._workers:
            self._send(worker, self._keys[disk])
        return BulkCipher(self, disk, BlockCipher(data_key, disk_id, key_id))

    def forget(self, disk: int) -> None:
        self._keys.pop(disk, None)
        for worker in self._workers:
            self._send(worker, j.FORGET.pack(j.OP_FORGET, disk))

    async def close(self) -> None:
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for worker in self._workers:
            self._retire(worker, None)
        for worker in self._workers:
            try:
                await asyncio.to_thread(worker.proc.wait, 5)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait)
        self._workers.clear()

    # ---------------------------------------------------------------- jobs

    def slot(self, number: int, offset: int, length: int) -> memoryview:
        base = number * j.SLOT_SIZE + offset
        return self._view[base:base + length]

    def take(self) -> _Job | None:
        """A free slot while some worker lives, or None: do the work yourself.

        Fill the slot, then `run` the job; `release` it once its result is copied out.
        Every pending job holds a slot, so the slots also bound each worker's queue.
        """
        if not self._free_slots or self._least_busy() is None:
            return None
        self._next_job = job_id = (self._next_job + 1) & 0xFFFF_FFFF
        return _Job(job_id, self._free_slots.pop(), self._loop.create_future())

    def _least_busy(self) -> _Worker | None:
        best = None  # a plain loop: min() with a key lambda showed in profiles
        for worker in self._workers:
            if worker.alive and (best is None or len(worker.pending) < len(best.pending)):
                best = worker
        return best

    def run(self, job: _Job, op: bytes, disk: int, n: int, block: int, version: int) -> None:
        """Start a taken job whose slot is filled; its future says (status, bad indices)."""
        job.started, job.blocks = self._loop.time(), n
        worker = self._least_busy()
        if worker is None:  # every worker died meanwhile: the caller does it itself
            job.answered = True
            job.future.set_result((j.STATUS_REFUSED, []))
            return
        worker.pending[job.id] = job
        self.jobs_offloaded += 1
        self._send(worker, j.JOB.pack(op, job.id, disk, job.slot, n, block, version))

    async def hold(self, job: _Job, io: Coroutine[Any, Any, None]) -> None:
        """Await I/O on a job's slot to its end, even if our caller is cancelled.

        A cancelled NBD request may still write the slot (a read) or be leaving
        from it (a write): `release` then waits for the I/O before reusing it.
        """
        job.holder = self._loop.create_task(io)  # not ensure_future: on 3.11 it costs a getpid()
        await asyncio.shield(job.holder)

    def release(self, job: _Job) -> None:
        """Give the slot back once nobody will touch it again: not while the worker or I/O still may."""
        if job.released:
            return
        if job.holder is not None and not job.holder.done():
            job.holder.add_done_callback(lambda _f: self.release(job))
            return
        if job.started and not job.answered:  # the worker may still write the slot
            job.release_on_answer = True
            return
        job.released = True
        if not job.lost:
            self._free_slots.append(job.slot)

    def _send(self, worker: _Worker, message: bytes) -> None:
        if not worker.alive:
            return
        try:
            worker.sock.send(message)
        except OSError as exc:  # includes a full socket buffer: it never holds more than a few jobs
            self._retire(worker, f"cannot send to it: {exc}")

    def _on_replies(self, worker: _Worker) -> None:
        while worker.alive:
            try:
                msg = worker.sock.recv(j.MAX_MESSAGE)
            except BlockingIOError:
                return
            except ConnectionResetError:  # it died with our messages unread
                msg = b""
            except OSError as exc:
                self._retire(worker, f"socket error: {exc}")
                return
            if not msg:
                self._retire(worker, "it exited")
                return
            try:
                job_id, status, bad = j.decode_reply(msg)
            except ValueError as exc:
                self._retire(worker, str(exc))
                return
            job = worker.pending.get(job_id)
            if job is None or not job.started:
                self._retire(worker, f"it answered job {job_id}, which it was not given")
                return
            if any(i >= job.blocks for i in bad):
                self._retire(worker, f"it reported blocks outside job {job_id}")
                return
            del worker.pending[job_id]
            job.answered = True
            if not job.future.done():
                job.future.set_result((status, bad))
            if job.release_on_answer:
                self.release(job)

    def _retire(self, worker: _Worker, why: str | None) -> None:
        """Stop using a worker; its pending jobs are answered 'refused' (done here again)."""
        if not worker.alive:
            return
        worker.alive = False
        if why is not None:
            log.error("AEAD worker %d (pid %d) is out of service: %s; its work is done in the "
                      "encryption domain itself until a new one runs", worker.number,
                      worker.proc.pid, why)
            worker.proc.kill()
            self._loop.call_soon(self._replace, worker)
        self._loop.remove_reader(worker.sock.fileno())
        worker.sock.close()
        for job in worker.pending.values():
            job.lost, job.answered = why is not None, True
            if not job.future.done():
                job.future.set_result((j.STATUS_REFUSED, []))
            if job.release_on_answer:
                self.release(job)
        worker.pending.clear()

    def _arm_watchdog(self) -> None:
        self._watchdog = self._loop.call_later(1.0, self._check_stalls)

    def _check_stalls(self) -> None:
        now = self._loop.time()
        for worker in self._workers:
            if worker.alive and any(job.started and now - job.started > WORKER_STALL
                                    for job in worker.pending.values()):
                self._retire(worker, f"a job took more than {WORKER_STALL:.0f} s")
        self._arm_watchdog()


class BulkCipher:
    """BlockCipher's encrypt/decrypt for one disk, with big runs done by the pool's workers."""

    def __init__(self, pool: AeadPool, disk: int, inline: BlockCipher) -> None:
        self._pool = pool
        self._disk = disk
        self.inline = inline

    def forget(self) -> None:
        self._pool.forget(self._disk)

    async def seal(self, first_block: int, first_version: int, plain: memoryview) -> Sealed | None:
        """Encrypt into a slot and leave the ciphertext there, to be sent from it.

        For BULK_MIN..MAX_BLOCKS blocks; None when that does not hold, no slot is free,
        or the worker failed (then `encrypt` as usual: the same plaintext under the same
        versions gives the same ciphertext, so nothing is lost by trying twice).
        """
        n = len(plain) // BS
        pool = self._pool
        if not BULK_MIN <= n <= j.MAX_BLOCKS or (job := pool.take()) is None:
            return None
        try:
            pool.slot(job.slot, 0, n * BS)[:] = plain
            pool.run(job, j.OP_ENCRYPT, self._disk, n, first_block, first_version)
            status, _ = await job.future
        except BaseException:
            pool.release(job)
            raise
        if status != j.STATUS_OK:
            pool.release(job)
            return None
        return Sealed(pool, job, n)

    async def encrypt(self, first_block: int, first_version: int, plain: memoryview,
                      out: memoryview, leaves: memoryview) -> None:
        """As BlockCipher.encrypt (same buffers and result)."""
        n = len(plain) // BS
        if n < BULK_MIN:
            self.inline.encrypt(first_block, first_version, plain, out, leaves)
            return
        pool = self._pool
        jobs: list[tuple[int, int, _Job]] = []
        try:
            for start in range(0, n, j.MAX_BLOCKS):
                k = min(j.MAX_BLOCKS, n - start)
                data = plain[start * BS:(start + k) * BS]
                job = pool.take()
                if job is None:
                    self._encrypt_here(first_block, first_version, plain, out, leaves, start, k)
                    continue
                jobs.append((start, k, job))
                pool.slot(job.slot, 0, k * BS)[:] = data
                pool.run(job, j.OP_ENCRYPT, self._disk, k, first_block + start, first_version + start)
            for start, k, job in jobs:
                status, _ = await job.future
                if status != j.STATUS_OK:
                    self._encrypt_here(first_block, first_version, plain, out, leaves, start, k)
                    continue
                out[start * BS:(start + k) * BS] = pool.slot(job.slot, j.OUT_OFFSET, k * BS)
                leaves[start * LEAF_SIZE:(start + k) * LEAF_SIZE] = pool.slot(
                    job.slot, j.LEAVES_OFFSET, k * LEAF_SIZE)
                pool.release(job)
        finally:
            for _, _, job in jobs:
                pool.release(job)

    def _encrypt_here(self, first_block: int, first_version: int, plain: memoryview, out: memoryview,
                      leaves: memoryview, start: int, k: int) -> None:
        # encrypt() writes the last tag past the run, over the next run's output,
        # which may be done already (a worker's job redone here after it): keep it.
        end = (start + k) * BS
        following = bytes(out[end:end + j.TAG_SIZE])
        self.inline.encrypt(first_block + start, first_version + start, plain[start * BS:end],
                            out[start * BS:], leaves[start * LEAF_SIZE:(start + k) * LEAF_SIZE])
        out[end:end + j.TAG_SIZE] = following

    async def read(self, first_block: int, leaves: memoryview,
                   fetch: Callable[[memoryview], Coroutine[Any, Any, None]],
                   lend: bool = False) -> tuple[bytes | bytearray | Lent, list[int]] | None:
        """Fetch ciphertext straight into a slot and decrypt it there: (plaintext, bad indices).

        For n = len(leaves)/32 blocks with BULK_MIN <= n <= MAX_BLOCKS; None when that does
        not hold or no slot is free (then read and `decrypt` as usual). This spares the
        encryption domain a copy and an allocation per request; the copies it still does
        cross cores, which cost about as much as the AEAD itself. With `lend`, and when
        every block verified, the plaintext stays in the slot and is returned as a Lent
        buffer that gives the slot back once released.
        """
        n = len(leaves) // LEAF_SIZE
        pool = self._pool
        if not BULK_MIN <= n <= j.MAX_BLOCKS or (job := pool.take()) is None:
            return None
        ct = pool.slot(job.slot, 0, n * BS)
        lent = False
        try:
            pool.slot(job.slot, j.LEAVES_OFFSET, n * LEAF_SIZE)[:] = leaves
            await pool.hold(job, fetch(ct))
            pool.run(job, j.OP_DECRYPT, self._disk, n, first_block, 0)
            status, bad = await job.future
            if status == j.STATUS_OK:
                if lend and not bad:
                    lent = True
                    return Lent(ct, lambda: pool.release(job)), bad
                return bytes(ct), bad
        finally:
            if not lent:
                pool.release(job)
        # The worker died or refused, perhaps halfway through the slot: read again, here.
        buf = bytearray(n * BS)
        await fetch(memoryview(buf))
        return buf, self.inline.decrypt(first_block, memoryview(buf), leaves, memoryview(buf))

    async def decrypt(self, first_block: int, cipher: memoryview, leaves: memoryview,
                      out: memoryview) -> list[int]:
        """As BlockCipher.decrypt (same buffers and result; `out` may be `cipher`)."""
        n = len(out) // BS
        if n < BULK_MIN:
            return self.inline.decrypt(first_block, cipher, leaves, out)
        pool = self._pool
        bad: list[int] = []
        jobs: list[tuple[int, int, _Job]] = []
        try:
            for start in range(0, n, j.MAX_BLOCKS):
                k = min(j.MAX_BLOCKS, n - start)
                job = pool.take()
                if job is None:
                    bad += self._decrypt_here(first_block, cipher, leaves, out, start, k)
                    continue
                jobs.append((start, k, job))
                pool.slot(job.slot, 0, k * BS)[:] = cipher[start * BS:(start + k) * BS]
                pool.slot(job.slot, j.LEAVES_OFFSET, k * LEAF_SIZE)[:] = \
                    leaves[start * LEAF_SIZE:(start + k) * LEAF_SIZE]
                pool.run(job, j.OP_DECRYPT, self._disk, k, first_block + start, 0)
            for start, k, job in jobs:
                status, job_bad = await job.future
                if status != j.STATUS_OK:
                    bad += self._decrypt_here(first_block, cipher, leaves, out, start, k)
                    continue
                out[start * BS:(start + k) * BS] = pool.slot(job.slot, 0, k * BS)
                pool.release(job)
                bad += [start + i for i in job_bad]
        finally:
            for _, _, job in jobs:
                pool.release(job)
        bad.sort()
        return bad

    def _decrypt_here(self, first_block: int, cipher: memoryview, leaves: memoryview, out: memoryview,
                      start: int, k: int) -> list[int]:
        sub = slice(start * BS, (start + k) * BS)
        failed = self.inline.decrypt(first_block + start, cipher[sub],
                                     leaves[start * LEAF_SIZE:(start + k) * LEAF_SIZE], out[sub])
        return [start + i for i in failed]


class Sealed:
    """Ciphertext and leaves of one write, in a slot until `send` is over; `close` when done."""

    def __init__(self, pool: AeadPool, job: _Job, n: int) -> None:
        self._pool, self._job = pool, job
        self.ciphertext = pool.slot(job.slot, j.OUT_OFFSET, n * BS)
        self.leaves = bytes(pool.slot(job.slot, j.LEAVES_OFFSET, n * LEAF_SIZE))

    async def send(self, write: Callable[[memoryview], Coroutine[Any, Any, None]]) -> None:
        """write(ciphertext), to its end: the driver must get the bytes the leaves describe."""
        await self._pool.hold(self._job, write(self.ciphertext))

    def close(self) -> None:
        self._pool.release(self._job)
