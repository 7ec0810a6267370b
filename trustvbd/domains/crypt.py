"""The encryption domain (trusted): the NBD server guests talk to.

It owns each disk's layer stack (replica link -> CryptDisk, built by crypt_stack.py)
and serves one listening socket per guest; the socket a connection arrives on is the
guest's identity. It never opens a channel to a driver itself: it asks the launcher,
which checks policy and hands over a connected socket.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustvbd._native import SPIN_BUDGET_MAX_US, SPIN_PSI_MAX
from trustvbd.acm.client import AcmClient
from trustvbd.acm.decisions import Decision
from trustvbd.blockdev import Backend, HasEpoch
from trustvbd.blocks.aead_pool import AeadPool
from trustvbd.blocks.crypt_layer import CryptDisk
from trustvbd.blocks.disk_state import disk_with_id
from trustvbd.blocks.integrity import EventWindows, refusal_text
from trustvbd.blocks.reconnect import ReplicaLink
from trustvbd.blocks.space import SpaceWatch
from trustvbd.blocks.write_ring import WriteRing
from trustvbd.domains import crypt_stack
from trustvbd.domains import messages as m
from trustvbd.domains.bus import NoStore, StateWriter
from trustvbd.domains.common import die_with_parent, keep_freed_memory, ready, run, setup_logging
from trustvbd.domains.control import ControlChannel, ControlClosed, handed_socket, typed
from trustvbd.domains.crypt_bus import CryptBus
from trustvbd.domains.crypt_disks import PassphraseNeeded
from trustvbd.domains.policy_gate import PolicyGate
from trustvbd.domains.unlock import Unlock, receive_unlock
from trustvbd.nbd import spin
from trustvbd.nbd.budget import DecisionRate, MemoryBudget
from trustvbd.nbd.server import Export, ExportRefused, NbdServer, PeerInfo

log = logging.getLogger("trustvbd.crypt")


@dataclass
class Disk:
    name: str
    label: str
    size: int
    encrypt: bool
    replica_names: list[str]
    backend: Backend | None = None
    links: list[ReplicaLink] = field(default_factory=list)
    space: list[SpaceWatch] = field(default_factory=list)  # one per link, same order
    integrity_events: int = 0
    # Integrity events to the audit log: the first per replica at once, then one summary
    # per window (a lying driver must not flood the access-control domain).
    event_windows: EventWindows = field(default_factory=EventWindows)
    summary_timer: asyncio.TimerHandle | None = None
    error: str | None = None
    locked: bool = False  # needs a passphrase this domain was not given: `trustvbd unlock`
    scrub: dict[str, Any] | None = None  # the running or last scrub
    ring: WriteRing | None = None  # a mirror's ciphertext ring (blocks/write_ring.py)

    @property
    def description(self) -> str:
        """What a guest's listing (NBD_OPT_LIST) and its opened export both say."""
        return f"trustvbd disk {self.name}, {self.size} bytes"


class GuestExports:
    """What one guest may see and open; every decision goes through the policy gate."""

    def __init__(self, domain: CryptDomain, guest: str, label: str, rate: DecisionRate) -> None:
        self.domain, self.guest, self.label = domain, guest, label
        self.rate = rate  # this guest's GO/INFO decisions per second (its flood waits, not others)

    def list_exports(self, peer: PeerInfo) -> list[tuple[str, str]]:
        gate = self.domain.gate
        return [
            (d.name, d.description)
            for d in self.domain.disks.values()
            if gate.may_list(self.guest, self.label, d.name, d.label)
        ]

    async def open_export(self, peer: PeerInfo, name: str) -> Export:
        await self.rate.take()
        disks = self.domain.disks
        if name == "":
            visible = [n for n, _ in self.list_exports(peer)]
            if len(visible) != 1:
                raise ExportRefused(
                    "unknown", "give the disk name as the export name; this guest may use: "
                    + (", ".join(visible) or "no disk"),
                )
            name = visible[0]
        disk = disks.get(name)
        if disk is None:
            await self.elsewhere(name)
            raise ExportRefused("unknown", f"no disk named {name!r}")
        decision = await self.domain.gate.attach(peer, self.guest, self.label, disk.name, disk.label)
        if not decision.allowed:
            raise ExportRefused("policy", f"refused by policy ({decision.rule}): {decision.reason}")
        if disk.backend is None:
            await self.domain.gate.detach(peer, self.guest, disk.name)
            raise ExportRefused("unavailable", f"disk {name!r} is not available: {disk.error}")
        self.domain.bus.attached(self.guest, disk.name)
        return Export(disk.name, disk.backend, disk.description)

    def knows(self, peer: PeerInfo, name: str) -> bool:
        visible = [n for n, _ in self.list_exports(peer)]
        return name in visible or (name == "" and len(visible) == 1)  # open_export's default

    async def elsewhere(self, name: str) -> None:
        """A disk of another workload type: refused by policy, or served on another socket."""
        other = self.domain.spec.elsewhere.get(name)
        if other is None:
            return
        decision = await self.domain.gate.check(self.guest, self.label, name, other.label)
        if not decision.allowed:
            raise ExportRefused("policy", f"refused by policy ({decision.rule}): {decision.reason}")
        where = other.sockets.get(self.guest)
        raise ExportRefused("unknown", f"disk {name!r} is of another workload type, held by another"
                            " encryption domain" + (f": connect to {where}" if where else ""))

    def release_export(self, peer: PeerInfo, export: Export) -> None:
        self.domain.bus.detached(self.guest, export.name)
        asyncio.get_running_loop().create_task(self.domain.gate.detach(peer, self.guest, export.name))


class CryptDomain:
    def __init__(self, control: socket.socket, unlock: Unlock | None = None,
                 state_dir: Path | None = None) -> None:
        self.control = ControlChannel(
            control, typed(self.handle, m.StatusQuery, m.Stop, m.PolicyChanged,
                           m.ScrubQuery, m.AcmRestarted, m.UnlockQuery, m.GuestSockets), "hv")
        self.bus = CryptBus(StateWriter(None), None)  # XenBus states; the store's comes with the spec
        self.unlock = unlock or Unlock()  # zeroed once every disk is open
        self.state_dir_override = state_dir  # a directory fd's /proc path, when given one
        self.disks: dict[str, Disk] = {}
        self.servers: dict[str, list[NbdServer]] = {}
        self.budgets: dict[str, MemoryBudget] = {}
        self.rates: dict[str, DecisionRate] = {}
        self.gate: PolicyGate
        self.state_dir = Path()
        self.stopped = asyncio.Event()
        self.stopping = False
        self.spec: m.Spec
        self.tls_dir: Path | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.records: set[asyncio.Task[Any]] = set()  # integrity records on their way to the log
        self.aead: AeadPool | None = None

    # -- requests from the launcher -------------------------------------------------
    async def handle(self, msg: m.Message, fds: list[int]) -> tuple[m.Message, list[int]]:
        if isinstance(msg, m.StatusQuery):
            st = self.status()
            return m.CryptStatus(st["disks"], st["guests"], st["aead_threads"]), []
        if isinstance(msg, m.Stop):
            await self.stop()
            return m.Done(), []
        if isinstance(msg, m.ScrubQuery):
            return self.start_scrub(msg.disk), []
        if isinstance(msg, m.UnlockQuery):
            return await self.unlock_disks(msg.disks, fds), []
        if isinstance(msg, m.GuestSockets):
            return await self.follow_sockets(msg, fds), []
        if isinstance(msg, m.AcmRestarted):  # its Chinese Wall counts come from us
            await self.gate.client.restore()
        self.gate.policy_changed()
        await self.gate.refresh()
        return m.Rechecked(await self.recheck_connections()), []

    def name_disk(self, disk_id: bytes) -> str | None:
        """Which of this domain's disks has this id: a refused replica's message names it."""
        return disk_with_id(self.state_dir, self.disks, disk_id)

    def status(self) -> dict[str, Any]:
        disks = []
        for d in self.disks.values():
            entry: dict[str, Any] = {
                "name": d.name, "size": d.size, "label": d.label, "encrypt": d.encrypt,
                "state": "serving" if d.backend else
                         "locked: run trustvbd unlock" if d.locked else
                         f"failed: {d.error}" if d.error else "opening",
                "integrity_events": d.integrity_events,
                "replicas": [{**link.status(), **watch.status()}
                             for link, watch in zip(d.links, d.space, strict=False)],
            }
            if isinstance(d.backend, CryptDisk):
                if d.backend._commits.state_full is not None:
                    entry["state"] = f"serving, but {d.backend._commits.state_full}"
                entry["replicas"] = [{**link.status(), **r, **watch.status()} for link, r, watch in
                                     zip(d.links, d.backend.replicas.status(), d.space, strict=False)]
                if d.scrub is not None:
                    entry["scrub"] = d.scrub
            if isinstance(d.backend, HasEpoch):
                entry["epoch"] = d.backend.epoch
            disks.append(entry)
        guests = []
        for name, servers in self.servers.items():
            conns = [
                {"export": c.export_name, "address": c.peer.address,
                 "certificate": c.peer.certificate or None}
                for s in servers for c in s.connections
            ]
            budget, rate = self.budgets.get(name), self.rates.get(name)
            guests.append({"name": name, "connections": conns,
                           "memory": budget.used if budget else 0,
                           "memory_peak": budget.peak if budget else 0,
                           "decisions_waited": rate.waited if rate else 0})
        threads = self.aead.threads if self.aead else 0
        return {"disks": disks, "guests": guests, "aead_threads": threads}

    def start_scrub(self, name: str) -> m.Message:
        """Start scrubbing a disk in the background (progress and result in `status`)."""
        disk = self.disks.get(name)
        if disk is None:
            return m.Failed(m.ErrorCode.UNKNOWN, f"no disk named {name!r}")
        backend = disk.backend
        if not isinstance(backend, CryptDisk):
            why = ("it is not encrypted: there is nothing to verify against" if backend else
                   "it is locked: run `trustvbd unlock` first" if disk.locked else
                   disk.error or "it is still opening (see `trustvbd status`): try again soon")
            return m.Failed(m.ErrorCode.INVALID, f"disk {name!r} cannot be scrubbed: {why}")
        if disk.scrub is not None and disk.scrub.get("running"):
            return m.ScrubStarted(already_running=True)
        scrub: dict[str, Any] = {"running": True, "done": 0, "total": backend.size // 4096,
                                 "started": time.time()}
        disk.scrub = scrub

        def progress(done: int, total: int) -> None:
            scrub["done"], scrub["total"] = done, total

        async def run_scrub() -> None:
            try:
                scrub["result"] = await backend.scrub(progress)
            except Exception as exc:
                scrub["error"] = str(exc)
                log.error("disk %s: scrub failed: %s", name, exc)
            finally:
                scrub["running"] = False
                scrub["seconds"] = round(time.time() - scrub["started"], 2)

        task = asyncio.get_running_loop().create_task(run_scrub())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return m.ScrubStarted(already_running=False)

    async def unlock_disks(self, names: list[str], fds: list[int]) -> m.Message:
        """Open locked disks with the passphrase in the pipe the hypervisor handed over.

        Each disk's keys file is unwrapped first (scrypt, off the event loop): a passphrase
        that does not unlock a disk changes nothing for it; it stays locked.
        """
        from trustvbd.blocks.disk_state import DiskState
        from trustvbd.crypt.keys import WrongKeyError
        from trustvbd.domains.crypt_disks import kek_for

        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError("an unlock request carries one pipe with the passphrase")
        unlock = receive_unlock(fds[0], "the hypervisor")
        try:
            if not unlock.passphrase:
                raise ValueError("the unlock pipe holds no passphrase")
            unlocked, wrong, failed = [], [], {}
            for name in names:
                disk = self.disks.get(name)
                if disk is None or not disk.locked:
                    continue
                try:
                    kek = kek_for(self.state_dir, name, unlock)
                    await asyncio.to_thread(DiskState(self.state_dir, name).unlock, kek)
                except WrongKeyError:
                    wrong.append(name)
                    continue
                disk.locked, disk.error = False, None
                try:
                    disk.backend = await crypt_stack.open_encrypted(self, disk, kek)
                except Exception as exc:
                    disk.error = failed[name] = str(exc)
                    log.error("disk %s unlocked but cannot be served: %s", name, exc)
                    continue
                unlocked.append(name)
                log.info("disk %s unlocked: serving", name)
            return m.Unlocked(unlocked, wrong, failed)
        finally:
            unlock.forget()

    async def follow_sockets(self, msg: m.GuestSockets, fds: list[int]) -> m.Message:
        """After a policy load: serve a guest's new socket, drop one it may no longer use."""
        if len(fds) != len(msg.add) or any(a.guest not in self.spec.guests for a in msg.add):
            for fd in fds:
                os.close(fd)
            raise ValueError("guest sockets: one listening socket per known guest, in order")
        self.spec = dataclasses.replace(self.spec, elsewhere=msg.elsewhere)
        for guest in msg.remove:  # (this domain serves no other socket of a further type's guest)
            for server in self.servers.pop(guest, []):
                await server.close()
        for listener, fd in zip(msg.add, fds, strict=True):
            self.serve_guest(listener, socket.socket(fileno=fd))
        return m.Done()

    def serve_guest(self, listener: m.ListenerSpec, sock: socket.socket) -> None:
        """Serve one of a guest's listening sockets until its server closes."""
        server = self.guest_server(listener.guest, listener.tls)
        self.servers.setdefault(listener.guest, []).append(server)

        async def serve() -> None:
            try:
                await server.serve_socket(sock)
            finally:
                sock.close()

        task = asyncio.get_running_loop().create_task(serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def recheck_connections(self) -> int:
        """After a policy change or an access-control restart: close every connection the
        policy forbids, or whose Chinese Wall attachment could not be restored."""
        closing: list[asyncio.Task[None]] = []
        for guest, servers in self.servers.items():
            label = self.spec.guests[guest].label
            for server in servers:
                for conn in list(server.connections):
                    disk = self.disks.get(conn.export_name or "")
                    if disk is None:
                        continue
                    decision = await self.gate.check(guest, label, disk.name, disk.label)
                    if decision.allowed and self.gate.wall_lost(conn.peer, disk.name):
                        decision = Decision(False, "chinese-wall", "its Chinese Wall attachment "
                                            "could not be restored after the access-control "
                                            "domain restarted (a conflicting type runs now)")
                    if not decision.allowed:
                        log.warning("closing %s's connection to %s: %s", guest, disk.name, decision.reason)
                        # Cut off now; its requests under way get their time meanwhile, not
                        # before the next connection is cut off.
                        closing.append(asyncio.get_running_loop().create_task(conn.close()))
        await asyncio.gather(*closing)
        return len(closing)

    # -- channels from the launcher --------------------------------------------------
    @staticmethod
    def granted(reply: m.Message, fds: list[int]) -> socket.socket:
        """The one socket a granted channel comes with; ConnectionError for a refusal."""
        return handed_socket(reply, fds, m.ChannelGranted, "channel")

    async def acm_channel(self) -> socket.socket:
        """A new channel to the access-control domain, from the hypervisor (after a loss)."""
        reply, fds = await self.control.ask(m.AcmChannelQuery(), m.ChannelGranted)
        return self.granted(reply, fds)

    async def store_channel(self) -> socket.socket:
        """A new connection to the store, from the hypervisor (after the store restarted)."""
        try:
            reply, fds = await self.control.ask(m.StoreChannelQuery(), m.StoreConnected)
        except ControlClosed as exc:
            raise NoStore(str(exc)) from None
        except m.MessageError as exc:
            raise ConnectionError(str(exc)) from None
        return handed_socket(reply, fds, m.StoreConnected, "connection to the store")

    async def start(self, ready_fd: int | None) -> None:
        self.control.start()
        reply, fds = await self.control.ask(m.SpecQuery(), m.Spec)
        store = isinstance(reply, m.Spec) and reply.store is not None and not reply.store_later
        if not isinstance(reply, m.Spec) or len(fds) != len(reply.listeners) + 1 + store:
            raise ConnectionError(f"the hypervisor sent no usable spec: {reply}")
        self.spec = spec = reply
        # After the listeners: this domain's own connection to the store, then its channel to
        # the access-control domain.
        acm_fd = fds.pop()
        self.bus = CryptBus(await StateWriter.from_fd(fds.pop() if store else None,
                                                      self.store_channel, spec.store_later),
                            spec.store)
        self.state_dir = Path(spec.state_dir)
        self.tls_dir = Path(spec.tls_dir) if spec.tls_dir else None
        if self.state_dir_override is not None:  # reach the state directory only through the fd
            if self.tls_dir is not None and self.tls_dir.is_relative_to(self.state_dir):
                self.tls_dir = self.state_dir_override / self.tls_dir.relative_to(self.state_dir)
            self.state_dir = self.state_dir_override
        acm = AcmClient(sock=socket.socket(fileno=acm_fd), reconnect=self.acm_channel,
                        timeout=float(os.environ.get("TRUSTVBD_ACM_TIMEOUT", "5")),
                        hello=spec.acm_hello)
        labels = {name: g.label for name, g in spec.guests.items()}
        self.gate = await PolicyGate.connect(acm, labels, spec.disks)
        for d in spec.disks:
            self.disks[d.name] = Disk(d.name, d.label, d.size, d.encrypt, d.replicas)
        for disk in self.disks.values():
            try:
                await crypt_stack.open_disk(self, disk)
            except Exception as exc:  # one bad disk must not take the others down
                disk.error = refusal_text(exc, self.name_disk)
                disk.locked = isinstance(exc, PassphraseNeeded)
                log.error("disk %s cannot be served: %s", disk.name, disk.error)
                self.control.tell(m.DiskFailed(disk.name, m.error_code(exc), disk.error))
        self.unlock.forget()  # the disks hold their keys; the key-encryption key goes
        for listener, fd in zip(spec.listeners, fds, strict=True):
            self.serve_guest(listener, socket.socket(fileno=fd))
        self.bus.serving()
        self.control.tell(m.Ready())
        ready(ready_fd)

    def guest_server(self, guest: str, tls: bool) -> NbdServer:
        """The NBD server of one of a guest's sockets: who may connect, and for how long."""
        g, limits = self.spec.guests[guest], self.spec.limits
        context = None
        if tls:
            from trustvbd.crypt.tls import server_context

            assert self.tls_dir is not None  # config check: no TLS listener without [tls]
            context = server_context(self.tls_dir)
        if guest not in self.budgets:  # shared by the guest's Unix socket and TCP port
            self.budgets[guest] = MemoryBudget(limits["memory"])
            self.rates[guest] = DecisionRate(limits["decisions_per_second"])
        return NbdServer(GuestExports(self, guest, g.label, self.rates[guest]), identity=guest,
                         handshake_timeout=limits["handshake_timeout"], tls=context,
                         tls_name=g.tls_name, owner_uid=g.uid, on_refused=self.refused,
                         budget=self.budgets[guest], idle_timeout=limits["idle_timeout"],
                         max_connections=limits["connections"])

    def refused(self, peer: PeerInfo, reason: str) -> None:
        """Someone not the guest came to a guest's socket: into the audit log (counted)."""
        async def record() -> None:
            try:
                await self.gate.client.record("event", event="guest-refused",
                                              guest=peer.identity, reason=reason)
            except Exception as exc:  # the refusal stands; only its record is missing
                log.error("could not audit a refused connection to %s: %s", peer.identity, exc)

        task = asyncio.get_running_loop().create_task(record())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def last_records(self) -> None:
        """The integrity events still counted in a window go to the audit log as summaries,
        and the records on their way there are waited for (a stop loses none of them)."""
        for disk in self.disks.values():
            if disk.summary_timer is not None:
                disk.summary_timer.cancel()
                disk.summary_timer = None
            crypt_stack.send_summaries(self, disk, everything=True)
        if self.records:
            await asyncio.wait(list(self.records), timeout=self.gate.client.timeout)

    async def stop(self) -> None:
        """Close guests, commit and close every disk; once (a stop request and SIGTERM may both come)."""
        if self.stopping:
            await self.stopped.wait()
            return
        self.stopping = True
        for servers in self.servers.values():
            for server in servers:
                await server.close()
        for disk in self.disks.values():
            if disk.backend is None:
                continue
            try:
                await disk.backend.flush()
                await disk.backend.close()
            except Exception as exc:
                log.error("disk %s: final flush failed: %s", disk.name, exc)
        await self.last_records()
        if self.aead is not None:
            await self.aead.close()
        await self.bus.close()
        self.stopped.set()


async def amain(control_fd: int, ready_fd: int | None, unlock: Unlock | None = None,
                state_dir: Path | None = None) -> int:
    loop = asyncio.get_running_loop()
    # The launcher stops us over the control channel; a terminal's SIGINT is for it.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    domain = CryptDomain(socket.socket(fileno=control_fd), unlock, state_dir)
    starting = loop.create_task(domain.start(ready_fd))
    stop_asked = False

    def stop_starting() -> None:
        if not starting.done():
            starting.cancel()
            # Python 3.11's wait_for swallows a cancel that meets its result in the same loop
            # step (a reply from the launcher): cancel again until it takes.
            loop.call_later(0.2, stop_starting)

    def on_sigterm() -> None:
        nonlocal stop_asked
        stop_asked = True
        if not starting.done():
            stop_starting()  # stopped during start-up: whatever it waits for, stop now
        else:
            domain.tasks.add(loop.create_task(domain.stop()))

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await starting
    except asyncio.CancelledError:
        log.info("stopped during start-up")
        await domain.stop()
        return 0
    except Exception as exc:
        log.exception("encryption domain failed to start: %s", exc)
        return 1
    if stop_asked and not domain.stopping:
        await domain.stop()
    closed = loop.create_task(domain.control.closed.wait())
    stopped = loop.create_task(domain.stopped.wait())
    await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not domain.stopped.is_set():
        log.error("launcher went away; stopping")
        await domain.stop()
    await asyncio.sleep(0.05)  # let the stop reply leave
    return 0


# The busy-wait's settings (nbd/spin.py), from the environment: name -> (type, unset, top,
# what a value must be, what to give). TRUSTVBD_SPIN_US: its budget in µs, 0 or unset off
# (off by default: on a quiet machine it lowers QD1 medians but raises the write tail,
# bench/README.md, docs/placement.md). TRUSTVBD_SPIN_PSI_MAX: the CPU pressure (%) above
# which it is off (100: never off for pressure, for measuring on a shared machine).
SPIN_SETTINGS: dict[str, tuple[type[int] | type[float], float, float, str, str]] = {
    "TRUSTVBD_SPIN_US": (int, 0, SPIN_BUDGET_MAX_US, "a busy-wait budget",
                         f"0 (off) to {SPIN_BUDGET_MAX_US} µs ({spin.BUDGET_US} is the one "
                         "measured), or unset it (off)"),
    "TRUSTVBD_SPIN_PSI_MAX": (float, SPIN_PSI_MAX, 100.0, "a share of time",
                              f"0 to 100 (%), or unset it for {SPIN_PSI_MAX}"),
}


def spin_setting(name: str, text: str | None) -> float:
    """The busy-wait setting `name` (SPIN_SETTINGS) from its environment variable's `text`
    (None: unset), or exit saying which variable, what value and what to give."""
    kind, unset, top, what, give = SPIN_SETTINGS[name]
    if text is None:
        return unset
    try:
        value: float = kind(text)
    except ValueError:
        value = -1
    if not 0 <= value <= top:  # (NaN too)
        raise SystemExit(f"crypt: {name}={text!r} is not {what}: give {give}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustvbd.domains.crypt")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--unlock-fd", type=int, help="a pipe with what unlocks the disks")
    parser.add_argument("--state-dir-fd", type=int,
                        help="the state directory, open: its parents need not be reachable")
    args = parser.parse_args(argv)
    setup_logging("crypt")
    die_with_parent()
    keep_freed_memory()
    spin.enable(int(spin_setting("TRUSTVBD_SPIN_US", os.environ.get("TRUSTVBD_SPIN_US"))),
                spin_setting("TRUSTVBD_SPIN_PSI_MAX", os.environ.get("TRUSTVBD_SPIN_PSI_MAX")))
    unlock = receive_unlock(args.unlock_fd) if args.unlock_fd is not None else None
    state_dir = Path(f"/proc/self/fd/{args.state_dir_fd}") if args.state_dir_fd is not None else None
    return run(amain(args.control_fd, args.ready_fd, unlock, state_dir))


if __name__ == "__main__":
    sys.exit(main())
