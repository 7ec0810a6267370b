"""The hypervisor (`trustvbd up`): starts the domains, brokers their channels, answers the CLI.

It keeps no keys and touches no data. The work is split by concern:
supervisor.py starts and restarts processes, hv_domains.py says what each domain
is started with (user, granted descriptors, unlock), broker.py creates every
channel between domains once the access-control domain allows it, messages.py
types what the domains say to each other, hv_control.py answers the CLI,
hv_status.py gathers `status`, hv_policy.py loads a policy into the running
system, up.py runs it all from the command line. This module wires them: which
domains exist, in what order they start and stop, and what the hypervisor answers
each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from trustvbd.acm import Policy
from trustvbd.acm.audit_fields import HYPERVISOR, crypt_role
from trustvbd.acm.client import AcmClient
from trustvbd.config import Config
from trustvbd.domains import hv_policy, sandbox
from trustvbd.domains import messages as m
from trustvbd.domains.broker import ChannelBroker, Endpoint
from trustvbd.domains.control import ControlChannel, ControlClosed, Handler, typed
from trustvbd.domains.hv_domains import DomainGrants, physical_size
from trustvbd.domains.hv_status import gather_status
from trustvbd.domains.hv_store import PairingRefused, StoreLink, crypt_name
from trustvbd.domains.listeners import close_listeners, listen_tcp, listen_unix
from trustvbd.domains.placement import GuestSocket, guest_sockets, types_of
from trustvbd.domains.supervisor import (
    START_TIMEOUT,
    Domain,
    StartError,
    Supervisor,
    paused,
    signal_stopped,
)
from trustvbd.domains.unlock import Unlock, UnlockError, receive_unlock, send_unlock
from trustvbd.fileops import make_dirs
from trustvbd.xenstore.xenbus import State

log = logging.getLogger("trustvbd.hv")
_REFUSED_REPLICA = (m.ErrorCode.FOREIGN_REPLICA, m.ErrorCode.STALE_REPLICA)  # nothing written to it

STOP_TIMEOUT = 60.0
UNLOCK_TIMEOUT = 300.0  # scrypt per disk, then opening it (reading its leaf table)
START_PER_TIB = 60.0  # opening reads and hashes each disk's leaf table (0.8 % of its size)
SCRUB_TIMEOUT = 10.0
STOP_ORDER = ["crypt", "driver", "store", "acm"]  # guests' servers first, policy last
CRYPT_ASKS = (m.SpecQuery, m.ChannelQuery, m.AcmChannelQuery, m.StoreChannelQuery, m.Ready,
              m.DiskFailed, m.Integrity)


class Launcher:
    def __init__(self, config: Config, bootstrap: str, policy: Policy | None = None) -> None:
        self.config = config
        self.grants = DomainGrants(config, types_of(config, policy))
        self.types = self.grants.types  # workload type -> its disks
        self.supervisor = Supervisor(self.fail, start_timeout=self.start_timeout)
        self.acm = AcmClient(str(config.acm_socket),
                             timeout=float(os.environ.get("TRUSTVBD_ACM_TIMEOUT", "5")),
                             hello=self.grants.role_hello(HYPERVISOR))
        self.broker = ChannelBroker(config, self.acm, bootstrap, self.grants.export_token)
        self.crypt_channels: dict[str, ControlChannel] = {}  # encryption domain -> its channel
        self.crypt_ready: dict[str, asyncio.Event] = {}
        # Encryption domain -> its confirmation of the last policy loaded (hv_policy.py).
        self.enforcing: dict[str, asyncio.Task[int | str | None]] = {}
        self.store_following: asyncio.Task[list[m.TornDown] | str] | None = None
        # The policy load in progress (its file, when asked): one at a time (hv_policy.load).
        self.policy_loading: tuple[str, float] | None = None
        self.driver_channels: dict[str, ControlChannel] = {}
        # Drivers granted their channel since they started (one each: from_driver), and
        # those told so since, having asked again.
        self.driver_granted: set[str] = set()
        self.driver_told: set[str] = set()
        self.listeners: list[tuple[GuestSocket, socket.socket]] = []
        self.fatal: str | None = None
        self.done = asyncio.Event()
        self.failed_disks: dict[str, m.DiskFailed] = {}
        self.integrity_events: list[dict[str, Any]] = []
        self.started = time.time()
        self.policy_path = str(config.policy) if config.policy else None
        self.had_passphrase = False
        self.store = StoreLink(config, self.types, bootstrap)
        self.store.handler = typed(self.from_store, m.AcmChannelQuery)
        self.allowed: dict[tuple[str, str], bool] = {}  # check (b) at start, per guest and disk

    @property
    def start_timeout(self) -> float:
        """Seconds a domain may take to start: TRUSTVBD_START_TIMEOUT, else scaled by disk size."""
        env = os.environ.get("TRUSTVBD_START_TIMEOUT")
        if env:
            return float(env)
        tib = sum(d.size for d in self.config.disks.values() if d.encrypt) / (1 << 40)
        return START_TIMEOUT + START_PER_TIB * tib

    def fail(self, why: str) -> None:
        self.fatal = why
        log.error("%s", why)
        self.done.set()

    def compiled_policy(self, suffix: str = "") -> Path:
        return self.grants.compiled_policy(suffix)

    # -- what the domains ask ------------------------------------------------------------
    def crypt_handler(self, domain: Domain) -> Handler:
        return typed(lambda msg, fds: self.from_crypt(domain, msg, fds), *CRYPT_ASKS)

    async def from_crypt(self, domain: Domain, msg: m.Message,
                         fds: list[int]) -> tuple[m.Message, list[int]] | None:
        assert domain.wtype is not None
        if isinstance(msg, m.SpecQuery):
            mine = [(g, s) for g, s in self.listeners if g.wtype == domain.wtype]
            # After the listeners: its own connection to the store, its channel to the
            # access-control domain. The channel closes what it sends; the launcher keeps its
            # own listeners.
            try:
                if (why := self.store_paused()) is not None:  # not waited for 10 s
                    raise ConnectionError(why)
                store = [await self.store.connection_for("crypt", domain.name)]
            except (ConnectionError, TimeoutError) as exc:
                # A stopped store held the domain (and its guests' I/O) out until it ran
                # again; the store is never in the way of the data (domains/bus.py).
                log.warning("%s starts without its connection to the store (%s): it asks"
                            " for one until the store answers", domain.name, exc)
                store = []
            acm = await self.broker.acm_channel(self.broker.crypt)
            spec = dataclasses.replace(self.crypt_spec(domain, mine), store_later=not store)
            return spec, [*(os.dup(s.fileno()) for _, s in mine), *store, acm.detach()]
        if isinstance(msg, m.ChannelQuery):
            try:
                sock, export, tls_name = await self.open_channel(msg.disk, msg.replica,
                                                                 domain.wtype)
            except (PermissionError, ConnectionError):
                self.driver_state(msg.replica, State.CLOSED, msg.disk)
                raise
            # Not waited for: a stopped store held the channel (the guests' I/O on a
            # reconnect) until its request timed out, 10 s later.
            self.driver_state(msg.replica, State.CONNECTED, msg.disk)
            return m.ChannelGranted(export, tls_name), [sock.detach()]
        if isinstance(msg, m.AcmChannelQuery):
            sock = await self.broker.acm_channel(self.broker.crypt)
            return m.ChannelGranted(""), [sock.detach()]
        if isinstance(msg, m.StoreChannelQuery):  # after a restart of the store
            fd = await self.store.connection_for("crypt", domain.name)
            return m.StoreConnected(self.store.domid("crypt", domain.name)), [fd]
        if isinstance(msg, m.Ready):
            self.crypt_ready[domain.name].set()
        elif isinstance(msg, m.DiskFailed):
            self.failed_disks[msg.disk] = msg
        elif isinstance(msg, m.Integrity):
            # (the encryption domain records it in the audit log itself)
            self.integrity_events = [*self.integrity_events[-99:], {**msg.event, "disk": msg.disk}]
        return None

    async def from_store(self, msg: m.Message, fds: list[int]) -> tuple[m.Message, list[int]]:
        """The store's channel to the access-control domain, as every domain's: made here once
        that domain allows it (audited), handed over; asked for again after a loss."""
        for fd in fds:
            os.close(fd)
        sock = await self.broker.acm_channel(Endpoint("store", self.broker.trusted_label,
                                                      "the store"))
        return m.ChannelGranted(""), [sock.detach()]

    def store_started(self, domain: Domain) -> None:
        if domain.restarts:
            self.supervisor.spawn_task(self.store_restarted())

    async def store_restarted(self) -> None:
        try:
            await self.store.restarted()
        except (ConnectionError, OSError, TimeoutError) as exc:
            log.error("the restarted store could not be brought up to date: %s", exc)

    def acm_started(self, domain: Domain) -> None:
        """After a restart of the access-control domain (it loaded the policy last loaded), the
        encryption domains reconnect at once, restoring the Chinese Wall counts of their live
        connections, and check their connections again."""
        if domain.restarts == 0:
            return
        for name, channel in list(self.crypt_channels.items()):
            if not channel.closed.is_set():
                self.supervisor.spawn_task(self.tell_acm_restarted(name, channel))

    def live_crypt_roles(self) -> list[str]:
        """The roles of the encryption domains running now: they hold Chinese Wall counts."""
        roles = []
        for name, channel in self.crypt_channels.items():
            domain = self.supervisor.domains.get(name)
            if domain is not None and domain.wtype is not None and not channel.closed.is_set():
                roles.append(self.crypt_role(domain.wtype))
        return roles

    def crypt_role(self, wtype: str) -> str:
        """Who an encryption domain is to the access-control domain: its disks and guests."""
        return crypt_role(self.types[wtype], [g.guest for g, _ in self.listeners
                                              if g.wtype == wtype])

    async def tell_acm_restarted(self, name: str, channel: ControlChannel) -> None:
        try:
            reply, _ = await channel.ask(m.AcmRestarted(), m.Rechecked)
        except (ControlClosed, TimeoutError, ValueError) as exc:
            reply = m.Failed(m.ErrorCode.UNREACHABLE, str(exc))
        if isinstance(reply, m.Failed):
            log.error("%s could not rebuild its access-control state: %s", name, reply.message)
        else:
            log.info("%s reconnected to the restarted access-control domain", name)

    async def open_channel(self, disk: str, replica: str,
                           wtype: str) -> tuple[socket.socket, str, str | None]:
        """An encryption domain gets channels only for its own workload type's disks."""
        if disk not in self.types.get(wtype, []):
            raise PermissionError(f"disk {disk!r} is not of workload type {wtype!r}: this"
                                  " encryption domain holds no keys for it")
        return await self.broker.replica_channel(disk, replica)

    def driver_domain(self, name: str) -> Domain:
        """A driver domain; the only thing it may ask on its control channel is a channel."""
        me = Endpoint(name, self.config.drivers[name].label, f"driver {name!r}")
        handler = typed(lambda msg, fds: self.from_driver(me, msg, fds), m.DomainChannelQuery)
        domain = self.grants.driver_domain(name, handler, self.driver_channels)
        domain.on_exit, domain.on_start = self.driver_exited, self.driver_started
        return domain

    async def from_driver(self, me: Endpoint, msg: m.Message,
                          fds: list[int]) -> tuple[m.Message, list[int]]:
        """A driver asks for a channel: allowed only with a shared STE type (audited either way).

        As a Xen driver domain's blkback reaches xenstored for its backend directories, a
        driver may reach the store: it gets its own connection, under its own domain id (the
        store's permissions then keep it to its own nodes). No other domain takes channels
        from a driver: the encryption domains connect to drivers, never the other way round.
        """
        assert isinstance(msg, m.DomainChannelQuery)
        for fd in fds:  # a channel request carries none: a driver's are closed, never kept
            os.close(fd)
        # A driver asks once per start (join_store). More grants would each cost an audited
        # decision and a store connection: a driver asking in a loop could grow the audit
        # log and the store's descriptors at will. Refused at once, said once per start.
        # (Refusals need no such bound: the access-control domain counts repeated ones.)
        if me.name in self.driver_granted:
            if me.name not in self.driver_told:
                self.driver_told.add(me.name)
                log.warning("driver %s asked for a channel again (to %r): a driver gets one per"
                            " start; this and later requests are refused until it restarts",
                            me.name, msg.target)
            return m.Failed(m.ErrorCode.POLICY_DENIED, "a driver gets one channel per start;"
                            " it has had it"), []
        target = self.supervisor.domains.get(msg.target)
        if target is None:
            raise KeyError(f"no domain named {msg.target!r}")
        if target.kind == "store":
            if (why := self.store_paused()) is not None:  # it asks again (driver.join_store)
                return m.Failed(m.ErrorCode.UNREACHABLE, why), []
            self.driver_granted.add(me.name)  # before any await: a request meanwhile sees it
        try:
            await self.broker.allow(me, Endpoint(target.name, target.label or
                                                 self.broker.trusted_label))
            if target.kind == "store":
                return m.ChannelGranted(""), [await self.store.connection_for("driver", me.name)]
        except BaseException:
            self.driver_granted.discard(me.name)
            raise
        return m.Failed(m.ErrorCode.UNKNOWN, f"domain {target.name!r} takes no channels from"
                        " drivers (a driver may ask for one to the store)"), []

    def crypt_spec(self, domain: Domain,
                   listeners: list[tuple[GuestSocket, socket.socket]]) -> m.Spec:
        """One encryption domain's share: its own type's disks and the sockets routed to it."""
        c, wtype = self.config, domain.wtype
        assert wtype is not None
        return m.Spec(
            state_dir=str(c.state_dir),
            request_timeout=float(os.environ.get("TRUSTVBD_REQUEST_TIMEOUT", "30")),
            disks=[m.DiskSpec(d.name, d.label, d.size, d.encrypt, list(d.replicas))
                   for d in (c.disks[name] for name in self.types[wtype])],
            guests={g.name: m.GuestSpec(g.label, g.certificate_name, g.uid)
                    for g in c.guests.values()},
            listeners=[m.ListenerSpec(g.guest, s.family != socket.AF_UNIX and c.guests[g.guest].tls)
                       for g, s in listeners],
            tls_dir=str(self.grants.tls_copy(domain)) if c.tls_dir else None,
            limits=dataclasses.asdict(c.limits),
            store=self.store.crypt_spec(domain.name),
            # What it may record: integrity events of its disks, refusals at its guests' sockets.
            acm_hello=self.grants.role_hello(self.crypt_role(wtype)),
            elsewhere=self.elsewhere(wtype))

    def elsewhere(self, wtype: str) -> dict[str, m.ElsewhereSpec]:
        """Other types' disks: names and labels only, so a guest asking for one on the wrong
        socket gets the policy's answer or the right socket, not "no such disk"."""
        return {d.name: m.ElsewhereSpec(d.label, {
            g.guest: str(g.path) for g, s in self.listeners
            if d.name in self.types[g.wtype] and s.family == socket.AF_UNIX})
            for d in self.config.disks.values() if d.name not in self.types[wtype]}

    # -- start and stop -------------------------------------------------------------------
    async def start(self) -> list[str]:
        c = self.config
        for sub in ("guests", "drivers", "disks"):
            make_dirs(c.state_dir / sub)  # synced: a disk's state in it must outlive a power cut
        if self.grants.privileged:
            self.grants.open_state_dir_to_trusted_domains()
        else:
            log.warning("%s", sandbox.WEAK_ISOLATION_WARNING.format(uid=os.geteuid()))
        acm = self.grants.acm_domain(self.live_crypt_roles)
        acm.on_start = self.acm_started
        await self.supervisor.start(acm)
        for disk in c.disks.values():  # check (a) for every replica before any driver starts
            for replica in disk.replicas:
                try:
                    await self.broker.check_replica(disk.name, replica)
                except PermissionError as exc:
                    raise StartError(str(exc)) from None
        self.warn_thin()
        await self.start_store()
        for name, drv in c.drivers.items():
            if drv.dir is not None:
                domain = self.driver_domain(name)
                if not any(name in d.replicas for d in c.disks.values()):
                    domain.state = "idle (no disk uses it)"  # nothing to serve: not started
                    self.supervisor.domains[name] = domain
                    log.warning("driver %s is idle: no [[disk]] lists it in replicas", name)
                    continue
                await self.supervisor.start(domain)
            await self.store.set_driver_state(name, State.INIT_WAIT)
        await self.open_guest_sockets()
        for wtype in self.types:
            ready = asyncio.Event()
            crypt = self.grants.crypt_domain(wtype, self.crypt_handler, self.crypt_channels, ready)
            self.crypt_ready[crypt.name] = ready
            await self.supervisor.start(crypt)
            await self.wait_ready(crypt.name)
        self.grants.forget_passphrase()  # every encryption domain has what unlocks its disks
        if self.failed_disks:
            wrong = [d for d, f in self.failed_disks.items() if f.code is m.ErrorCode.WRONG_KEY]
            if wrong and self.had_passphrase:
                raise StartError(f"wrong passphrase for disk {', '.join(map(repr, wrong))}:"
                                 " nothing was changed; start again with the right one")
            refused = [d for d, f in self.failed_disks.items() if f.code in _REFUSED_REPLICA]
            if len(refused) < len(self.failed_disks) or len(refused) == len(c.disks):
                problems = "; ".join(f"disk {d!r}: {f.message}"
                                     for d, f in self.failed_disks.items())
                raise StartError(f"cannot serve every disk: {problems}")
            # Only replicas refused (nothing written to them), and other disks to serve:
            # serve those, and say which disk is not served and why.
            for d in refused:
                log.warning("disk %r is not served (the other disks are): %s; restart `trustvbd"
                            " up` once that is fixed", d, self.failed_disks[d].message)
        return await self.listing()

    async def open_guest_sockets(self) -> None:
        """Each guest's sockets, one per workload type it may reach: the socket a connection
        arrives on is the guest's identity, and routes it to that type's encryption domain."""
        c, all_types = self.config, list(self.types)
        for guest in c.guests.values():
            for d in c.disks:
                self.allowed[guest.name, d] = await self.guest_may_see(guest.name, d)
                if self.allowed[guest.name, d]:  # a directory pair per attachment
                    await self.store.attach_guest(guest.name, d)
            reachable = [t for t in all_types
                         if any(self.allowed[guest.name, d] for d in self.types[t])]
            try:
                sockets = guest_sockets(c, guest.name, reachable, all_types)
            except ValueError as exc:
                raise StartError(str(exc)) from None
            for gs in sockets:
                self.listeners.append((gs, listen_unix(gs.path, guest.uid)))
            if guest.listen:
                if len(sockets) > 1:
                    log.warning("guest %s: listen %s:%s reaches only disks of workload type %s;"
                                " its other disks are on %s", guest.name, *guest.listen,
                                sockets[0].wtype, ", ".join(str(g.path) for g in sockets[1:]))
                self.listeners.append((sockets[0], listen_tcp(*guest.listen)))

    async def start_store(self) -> None:
        """The store domain, domain 0's connection to it, and the replica directories."""
        store = self.grants.store_domain(self.store)
        store.on_start = self.store_started
        await self.supervisor.start(store)
        await self.store.connect()
        try:
            await self.store.attach_replicas()
        except PairingRefused as exc:
            raise StartError(str(exc)) from None

    def driver_exited(self, domain: Domain) -> None:
        # Its next process may have its channel (cleared here, not at start: a driver asks
        # for it before it says it is ready).
        self.driver_granted.discard(domain.name)
        self.driver_told.discard(domain.name)
        self.driver_state(domain.name, State.CLOSED)

    def driver_started(self, domain: Domain) -> None:
        if domain.restarts:
            # Not over a channel connected to it already: it serves before it says it is
            # ready, which a stopped store delays (its join_store waits 10 s).
            self.driver_state(domain.name, State.INIT_WAIT, unless=State.CONNECTED)

    def store_paused(self) -> str | None:
        """Why not to ask the store now: it is paused by a signal, and a request to it would
        wait out its 10 s timeout (a restarted domain's start with it). None: ask."""
        pid = self.supervisor.pid("store")
        return f"the store is {paused(pid)}" if pid is not None and signal_stopped(pid) else None

    def driver_state(self, driver: str, state: State, disk: str | None = None,
                     unless: State | None = None) -> None:
        """A driver's XenBus state to the store, in the background (StoreLink.set_driver_state)."""
        self.supervisor.spawn_task(self.store.set_driver_state(driver, state, disk, unless))

    async def guest_may_see(self, guest: str, disk: str) -> bool:
        """Check (b) for the start-up listing (the encryption domain enforces it per connection)."""
        g, d = self.config.guests[guest], self.config.disks[disk]
        return (await self.acm.guest_may_use_disk(g.name, g.label, d.name, d.label)).allowed

    async def listing(self) -> list[str]:
        """One line per guest and disk it may use, with the URI that reaches it."""
        c, lines = self.config, []
        for guest in c.guests.values():
            for disk in c.disks.values():
                if not self.allowed.get((guest.name, disk.name)):
                    continue
                if disk.name in self.failed_disks:
                    lines.append(f"guest {guest.name} disk {disk.name} NOT SERVED (`trustvbd"
                                 " status` says why)")
                    continue
                routed = [(g, s) for g, s in self.listeners if g.guest == guest.name
                          and disk.name in self.types[g.wtype]]
                unix = next(g.path for g, s in routed if s.family == socket.AF_UNIX)
                lines.append(f"guest {guest.name} disk {disk.name} "
                             f"nbd+unix:///{disk.name}?socket={unix}")
                for _, sock in routed:
                    if sock.family != socket.AF_UNIX:
                        host, port = sock.getsockname()[:2]
                        host = f"[{host}]" if ":" in host else host
                        scheme = "nbds" if guest.tls else "nbd"
                        lines.append(f"guest {guest.name} disk {disk.name}"
                                     f" {scheme}://{host}:{port}/{disk.name}")
        return lines

    async def wait_ready(self, name: str) -> None:
        """Wait for an encryption domain to open every disk, saying so every 10 s."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(
                    f"the encryption domain did not finish opening the disks within "
                    f"{self.start_timeout:.0f} s; a large disk may need longer: set "
                    "TRUSTVBD_START_TIMEOUT=SECONDS")
            try:
                await asyncio.wait_for(self.crypt_ready[name].wait(), min(10.0, left))
                return
            except TimeoutError:
                log.info("still starting: the encryption domain is opening the disks (%.0f s of "
                         "%.0f s allowed)", time.monotonic() - (deadline - self.start_timeout),
                         self.start_timeout)

    def warn_thin(self) -> None:
        """Thin provisioning is allowed, surprise is not: say when a new sparse backing file
        is larger than the free space under it."""
        for drv in self.config.drivers.values():
            if drv.dir is None:
                continue
            for disk in self.config.disks.values():
                path = drv.dir / f"{disk.name}.img"
                if drv.name not in disk.replicas or path.exists():
                    continue
                need = physical_size(disk.size, disk.encrypt)
                st = os.statvfs(drv.dir)
                free = st.f_bavail * st.f_frsize
                if need > free:
                    log.warning("disk %s: its new backing file %s is %d bytes (sparse), more than "
                                "the %d bytes free under %s: writes fail with ENOSPC once the "
                                "space runs out", disk.name, path, need, free, drv.dir)

    async def stop(self) -> None:
        self.supervisor.stopping = True
        self.grants.forget_passphrase()

        async def stop_crypt(name: str, channel: ControlChannel) -> None:
            if not channel.closed.is_set():
                self.supervisor.continue_paused(name)  # else it holds up every stop 60 s
                with contextlib.suppress(ControlClosed, TimeoutError, OSError, ValueError):
                    await channel.ask(m.Stop(), m.Done, timeout=STOP_TIMEOUT)

        await asyncio.gather(*(stop_crypt(name, ch) for name, ch in self.crypt_channels.items()))
        await self.supervisor.stop(STOP_ORDER)
        await self.store.close()
        for channel in [*self.crypt_channels.values(), *self.driver_channels.values()]:
            channel.close()
        close_listeners([s for _, s in self.listeners])
        self.grants.close()

    # -- what the CLI asks -----------------------------------------------------------------
    async def status(self) -> m.HvStatus:
        return await gather_status(self)

    async def scrub(self, disk: str) -> m.Message:
        """Mirroring: the encryption domain that serves the disk runs its scrub (only that one
        is asked: another, stopped or overloaded, must not hold up this disk's scrub)."""
        wtype = next((t for t, mine in self.types.items() if disk in mine), None)
        if wtype is None:
            return m.Failed(m.ErrorCode.UNKNOWN, f"no running encryption domain serves disk {disk!r}")
        name = crypt_name(wtype)
        channel = self.crypt_channels.get(name)
        if channel is None or channel.closed.is_set():
            return m.Failed(m.ErrorCode.UNREACHABLE,
                            f"disk {disk!r}: its encryption domain {name} is not running")
        try:
            reply, _ = await channel.ask(m.ScrubQuery(disk), m.ScrubStarted, timeout=SCRUB_TIMEOUT)
        except TimeoutError:
            return m.Failed(m.ErrorCode.UNREACHABLE, f"disk {disk!r}: its encryption domain {name}"
                            f" did not answer within {SCRUB_TIMEOUT:g} s (stopped or overloaded?)")
        except ControlClosed as exc:  # ControlFull too: it reads nothing sent to it
            return m.Failed(m.ErrorCode.UNREACHABLE, f"disk {disk!r}: {exc}")
        return reply

    async def unlock(self, disks: list[str], fds: list[int]) -> m.Message:
        """`trustvbd unlock`: the passphrase (a pipe from the CLI) goes, in a new pipe each, to
        the encryption domains holding the locked disks asked for, and nowhere else; this
        process zeroes its copy. Every attempt is in the audit log, the outcome too."""
        try:
            if len(fds) != 1:
                raise ValueError("an unlock request carries the passphrase as one pipe descriptor")
            unlock = receive_unlock(fds.pop(), "the unlock command")
        except (UnlockError, OSError) as exc:  # any local process of this user may ask
            why = str(exc) if isinstance(exc, UnlockError) else f"unreadable: {exc.strerror}"
            return m.Failed(m.ErrorCode.INVALID, f"{why}; `trustvbd unlock` sends it so")
        finally:
            for fd in fds:
                os.close(fd)
        try:
            passphrase = unlock.passphrase
            if not passphrase:
                return m.Failed(m.ErrorCode.INVALID, "no passphrase was given")
            unknown = [d for d in disks if d not in self.config.disks]
            if unknown:
                return m.Failed(m.ErrorCode.UNKNOWN, f"no disk named {', '.join(map(repr, unknown))}"
                                f" in {self.config.path}")
            asked = disks or list(self.config.disks)
            # Every encryption domain at once: one stopped or hung (or scrypt-bound) holds
            # up no other's disks, and its own are named with what to do.
            shares = [self.unlock_in(crypt_name(wtype), channel, targets, passphrase)
                      for wtype, mine in self.types.items()
                      if (targets := [d for d in asked if d in mine])
                      and (channel := self.crypt_channels.get(crypt_name(wtype))) is not None
                      and not channel.closed.is_set()]
            done = m.Unlocked([], [], {})
            for reply in await asyncio.gather(*shares):
                done = m.Unlocked([*done.unlocked, *reply.unlocked], [*done.wrong, *reply.wrong],
                                  {**done.failed, **reply.failed},
                                  {**done.unanswered, **reply.unanswered})
        finally:
            unlock.forget()
        for disk in done.unlocked:
            self.failed_disks.pop(disk, None)
        if not (done.unlocked or done.wrong or done.failed or done.unanswered):
            what = (f"disk {', '.join(map(repr, disks))} is not locked" if disks
                    else "no disk is locked")
            return m.Failed(m.ErrorCode.INVALID, f"{what}: nothing to unlock (`trustvbd status -c"
                            f" {self.config.path}` shows each disk's state)")
        await self.acm.record("event", event="unlock", unlocked=done.unlocked,
                              wrong_passphrase=done.wrong,
                              failed=sorted([*done.failed, *done.unanswered]))
        return done

    async def unlock_in(self, name: str, channel: ControlChannel, disks: list[str],
                        passphrase: bytearray) -> m.Unlocked:
        """One encryption domain's share of `trustvbd unlock`, in a pipe of its own; when it
        does not answer, each of its disks says why and what to do."""
        pid = self.supervisor.pid(name)
        if pid is not None and signal_stopped(pid):  # it would hold the command 300 s
            why = f"its encryption domain {name} is {paused(pid)}; then unlock again"
            return m.Unlocked([], [], {}, {d: why for d in disks})
        copy = Unlock(passphrase=bytearray(passphrase))
        try:
            fd = send_unlock(copy)
        finally:
            copy.forget()  # send_unlock zeroes only its own encoding
        try:
            reply, _ = await channel.ask(m.UnlockQuery(disks), m.Unlocked, fds=[fd],
                                         timeout=UNLOCK_TIMEOUT)
        except (ControlClosed, TimeoutError, ValueError) as exc:
            reply = m.Failed(m.ErrorCode.UNREACHABLE, str(exc))
        finally:
            os.close(fd)
        if isinstance(reply, m.Unlocked):
            return reply
        assert isinstance(reply, m.Failed)
        log.error("unlock: encryption domain %s: %s", name, reply.message)
        why = (f"its encryption domain {name}: {reply.message}; `trustvbd status` shows whether"
               " the disk is still locked (then unlock again)")
        return m.Unlocked([], [], {}, {d: why for d in disks})

    async def policy_load(self, path: str) -> m.Message:
        """Compile, swap the policy in the access-control domain, then close what it now
        forbids (hv_policy.py)."""
        return await hv_policy.load(self, path)
