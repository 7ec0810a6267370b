"""The launcher's side of the store: domain ids, the device directories, and reading them back.

As Xen's toolstack does, the launcher (domain 0 on the store's public socket) gives
every domain an id and a home /local/domain/<id> (`name`, `label`), then creates a
frontend and a backend directory per disk attachment and pairs them; the store asks
the access-control domain before each pairing (check (a)):

- a guest's use of a disk: /local/domain/<guest>/device/vbd/<n> with
  /local/domain/<crypt>/backend/vbd/<guest>/<n>. The guest speaks NBD, not XenBus, so
  the encryption domain, which sees its handshake, writes the guest's `state` too
  (it is granted write on that directory, nothing else of the guest's).
- the encryption domain's channel to a replica: /local/domain/<crypt>/device/vbd/<m>
  with /local/domain/<driver>/backend/vbd/<crypt>/<m>. The encryption domain writes
  its frontend state; the launcher, which opens that channel, writes the driver's.
  Disk names stay out of the driver's directory (drivers see opaque export names).

Every `state` starts at 1 (Initialising); `status` reads them all back from the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from trustvbd.config import Config
from trustvbd.domains import messages as m
from trustvbd.domains.control import (
    ControlChannel,
    ControlClosed,
    ControlFull,
    Handler,
    socket_pair,
)
from trustvbd.domains.placement import file_safe
from trustvbd.xenstore.client import XsClient
from trustvbd.xenstore.pairing import backend_dir, frontend_dir
from trustvbd.xenstore.wire import XsError
from trustvbd.xenstore.xenbus import State, parse_state

log = logging.getLogger("trustvbd.hv")


class PairingRefused(Exception):
    """The store (the access-control domain behind it) refused to pair two directories."""


class StoreFull(ConnectionError):
    """The store reads nothing from its control channel (stopped?): this request was not sent."""


def log_torn_down(torn: list[m.TornDown], policy: str = "the new policy") -> None:
    """One line for each pairing the store tore down because `policy` forbids it."""
    for t in torn:
        log.warning("%s forbids pairing %s with %s: torn down (%s)", policy, t.frontend_dir,
                    t.backend_dir, t.reason)


@dataclass(frozen=True)
class Attachment:
    kind: str  # "guest" (guest -> encryption domain) | "replica" (encryption domain -> driver)
    frontend: str
    backend: str
    disk: str
    frontend_domid: int
    backend_domid: int
    devid: int

    @property
    def frontend_dir(self) -> str:
        return frontend_dir(self.frontend_domid, "vbd", self.devid)

    @property
    def backend_dir(self) -> str:
        return backend_dir(self.backend_domid, "vbd", self.frontend_domid, self.devid)


def crypt_name(wtype: str) -> str:
    """The encryption domain of one workload type (as the launcher names it)."""
    return f"crypt-{file_safe(wtype)}"


class StoreLink:
    def __init__(self, config: Config, types: dict[str, list[str]], crypt_label: str) -> None:
        self.config = config
        self.crypt_of = {disk: crypt_name(t) for t, disks in types.items() for disk in disks}
        self.domains: dict[tuple[str, str], tuple[int, str]] = {}
        for wtype in types:  # ids in config order: encryption domains, drivers, guests
            self.domains[("crypt", crypt_name(wtype))] = (len(self.domains) + 1, crypt_label)
        for drv in config.drivers.values():
            self.domains[("driver", drv.name)] = (len(self.domains) + 1, drv.label)
        for guest in config.guests.values():
            self.domains[("guest", guest.name)] = (len(self.domains) + 1, guest.label)
        self.attachments: list[Attachment] = []
        self.channel: ControlChannel | None = None
        self.handler: Handler | None = None  # what the store may ask the launcher
        self.client: XsClient | None = None
        self.launches = 0
        self.tree_owner: int | None = None  # the store's uid, when it runs under its own
        self.driver_states: dict[str, State] = {}  # backend dir -> what the launcher wrote
        self._state_writes = asyncio.Lock()  # set_driver_state's writes, one at a time
        self.recheck_due = False  # a policy was loaded; the store has not rechecked its pairings

    def domid(self, kind: str, name: str) -> int:
        return self.domains[(kind, name)][0]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "trustvbd.domains.store", "--supervised",
                "--socket", str(self.config.store_socket)]

    def grant(self, listener_fd: int) -> tuple[list[str], list[int]]:
        """At each start: the public socket the launcher bound, a new control channel, and the
        directory it keeps its tree in. It reaches nothing by a path: its channel to the
        access-control domain it asks for on that control channel (AcmChannelQuery)."""
        if self.channel is not None:
            self.channel.close()
        tree_dir = self.config.state_dir / "store"
        if self.launches == 0:  # every `up` starts with a new tree, as a Xen host boots
            tree_dir.mkdir(mode=0o700, exist_ok=True)
            for name in ("tree.json", "tree.json.new", "tree.log"):
                (tree_dir / name).unlink(missing_ok=True)
            if self.tree_owner is not None:
                os.chown(tree_dir, self.tree_owner, self.tree_owner)
        self.launches += 1
        dir_fd = os.open(tree_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        ours, theirs = socket_pair()
        self.channel = ControlChannel(ours, self.handler, "store")
        self.channel.start()
        fds = [os.dup(listener_fd), theirs.detach(), dir_fd]
        return ["--listen-fd", str(fds[0]), "--control-fd", str(fds[1]),
                "--tree-dir-fd", str(fds[2])], fds

    async def connect(self) -> None:
        """Connect as domain 0 and introduce every domain (none of them gets a connection yet)."""
        self.client = await XsClient.connect(str(self.config.store_socket))
        for (kind, name), (domid, label) in self.domains.items():
            await self._ask(m.StoreIntroduce(domid, name, label))
            home = f"/local/domain/{domid}"
            await self.client.write(f"{home}/name", name)
            await self.client.write(f"{home}/kind", kind)

    async def restarted(self) -> None:
        """The store was restarted (its tree is the one it saved): connect again, introduce
        every domain under its current label, and write again what this launcher keeps
        (the drivers' states), which may have changed while it was down."""
        if self.client is not None:
            await self.client.close()
        self.client = await XsClient.connect(str(self.config.store_socket))
        for (_, name), (domid, label) in self.domains.items():
            await self._ask(m.StoreIntroduce(domid, name, label))
        for directory, state in list(self.driver_states.items()):
            await self.client.write(f"{directory}/state", str(int(state)))
        log.warning("store restarted: %d domains introduced again, %d driver states written",
                    len(self.domains), len(self.driver_states))
        if self.recheck_due:  # a policy loaded since it last checked its pairings
            reply, _ = await self._ask(m.RecheckPairings(), m.PairingsRechecked, timeout=60)
            assert isinstance(reply, m.PairingsRechecked)
            self.recheck_due = False
            log_torn_down(reply.torn_down, "the policy loaded")

    async def follow_policy(self, crypt_label: str) -> list[m.TornDown]:
        """After a policy load: later pairings check the encryption domains under the new
        bootstrap label, and every pairing is asked again; those now forbidden are torn
        down. No timeout: a stopped store does it once it runs again; one restarted
        meanwhile does it at its start (restarted)."""
        self.recheck_due = True
        crypts = [(k, domid) for k, (domid, _) in self.domains.items() if k[0] == "crypt"]
        for key, domid in crypts:  # all first: a restart introduces them under it
            self.domains[key] = (domid, crypt_label)
        if self.channel is None or self.channel.closed.is_set():
            raise ConnectionError("the store is not running (restarting?): it checks its"
                                  " pairings against the new policy when it starts")
        for (_, name), domid in crypts:
            await self._ask(m.StoreIntroduce(domid, name, crypt_label), timeout=None)
        reply, _ = await self._ask(m.RecheckPairings(), m.PairingsRechecked, timeout=None)
        assert isinstance(reply, m.PairingsRechecked)
        self.recheck_due = False
        return reply.torn_down

    async def _ask(self, request: m.Message, *expected: type[m.Message],
                   timeout: float | None = 10) -> tuple[m.Message, list[int]]:
        if self.channel is None:
            raise ConnectionError("store: not started")
        try:
            reply, fds = await self.channel.ask(request, *(expected or (m.Done,)),
                                                timeout=timeout)
        except ControlFull as exc:
            raise StoreFull(f"store: {exc}") from None
        except ControlClosed as exc:
            raise ConnectionError(f"store: {exc}") from None
        if isinstance(reply, m.Failed):
            for fd in fds:
                os.close(fd)
            raise ConnectionError(f"store: {reply.message}")
        return reply, fds

    async def connection_for(self, kind: str, name: str) -> int:
        """A new connection to the store as this domain: a file descriptor to hand over."""
        domid, label = self.domains[(kind, name)]
        _, fds = await self._ask(m.StoreConnect(domid, name, label), m.StoreConnected)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("store: no connection came back")
        return fds[0]

    # -- the device directories ------------------------------------------------------
    async def attach_replicas(self) -> None:
        """A directory pair per (disk, replica) channel; PairingRefused if policy says no."""
        for disk in self.config.disks.values():
            crypt = self.crypt_of[disk.name]
            for replica in disk.replicas:
                devid = len([a for a in self._of("replica") if a.frontend == crypt])
                att = Attachment("replica", crypt, replica, disk.name, self.domid("crypt", crypt),
                                 self.domid("driver", replica), devid)
                await self._create(att, disk_visible_to_backend=False)

    async def attach_guest(self, guest: str, disk: str) -> bool:
        devid, crypt = list(self.config.disks).index(disk), self.crypt_of[disk]
        att = Attachment("guest", guest, crypt, disk, self.domid("guest", guest),
                         self.domid("crypt", crypt), devid)
        try:
            await self._create(att, disk_visible_to_backend=True)
        except PairingRefused as exc:
            log.warning("%s", exc)
            return False
        return True

    def _of(self, kind: str) -> list[Attachment]:
        return [a for a in self.attachments if a.kind == kind]

    async def _create(self, att: Attachment, disk_visible_to_backend: bool) -> None:
        assert self.client is not None
        fe, be, xs = att.frontend_dir, att.backend_dir, self.client
        fe_id, be_id = att.frontend_domid, att.backend_domid
        await xs.mkdir(fe)
        await xs.mkdir(be)
        # A guest's frontend is written by the encryption domain on its behalf (the guest
        # speaks NBD only); a driver may not read the encryption domain's frontend (it
        # names the disk), while backends are readable by their frontend, as in Xen.
        guest = att.kind == "guest"
        await xs.set_perms(fe, [f"n{fe_id}", f"b{be_id}"] if guest else [f"n{fe_id}"])
        await xs.set_perms(be, [f"n{be_id}", f"r{fe_id}"])
        await xs.write(f"{fe}/backend-id", str(be_id))
        await xs.write(f"{be}/frontend-id", str(fe_id))
        await xs.write(f"{fe}/disk", att.disk)
        if disk_visible_to_backend:
            await xs.write(f"{be}/disk", att.disk)
        await xs.write(f"{fe}/state", str(int(State.INITIALISING)))
        await xs.write(f"{be}/state", str(int(State.INITIALISING)))
        try:  # the pairing writes: the store asks the access-control domain first
            await xs.write(f"{fe}/backend", be)
            await xs.write(f"{be}/frontend", fe)
        except XsError as exc:
            await xs.rm(fe)
            await xs.rm(be)
            if exc.code != "EACCES":
                raise
            raise PairingRefused(
                f"policy forbids pairing {att.frontend}'s frontend {fe} with {att.backend}'s backend"
                f" {be} (see the audit log)") from None
        self.attachments.append(att)

    async def set_driver_state(self, driver: str, state: State, disk: str | None = None,
                               unless: State | None = None) -> None:
        """The driver side of the encryption domain's channels (this launcher opens them),
        but where the state kept is `unless`.

        Callers do not wait for it (a stopped store answers in 10 s, when its request
        times out): the states are kept at once, and written one at a time, each
        directory's newest, so one set later never lands before one set earlier."""
        if self.client is None:
            return
        dirs = [att.backend_dir for att in self._of("replica")
                if att.backend == driver and (disk is None or att.disk == disk)
                and (unless is None or self.driver_states.get(att.backend_dir) is not unless)]
        for directory in dirs:
            self.driver_states[directory] = state
        async with self._state_writes:
            for directory in dirs:
                newest = self.driver_states[directory]
                try:
                    if self.client is None:
                        return
                    await self.client.write(f"{directory}/state", str(int(newest)))
                except (XsError, ConnectionError, TimeoutError) as exc:
                    log.warning("store: cannot set %s state to %d (%s): %s", directory,
                                int(newest), newest.name, exc)

    def crypt_spec(self, crypt: str) -> dict[str, Any]:
        """What one encryption domain needs to walk its states: directories by guest/disk."""
        guests: dict[str, dict[str, dict[str, str]]] = {}
        replicas: dict[str, dict[str, str]] = {}
        for a in self.attachments:
            if a.kind == "guest" and a.backend == crypt:
                guests.setdefault(a.frontend, {})[a.disk] = {"frontend": a.frontend_dir, "backend": a.backend_dir}
            elif a.kind == "replica" and a.frontend == crypt:
                replicas.setdefault(a.disk, {})[a.backend] = a.frontend_dir
        return {"domid": self.domid("crypt", crypt), "guests": guests, "replicas": replicas}

    # -- status ----------------------------------------------------------------------
    async def status(self, timeout: float | None = None) -> tuple[list[m.AttachmentStatus], bool]:
        """Each attachment's XenBus states as the store has them, and whether the store
        answered: within `timeout` s in all (None: not asked, e.g. it is stopped), else the
        states not read are UNKNOWN (each read alone may wait 10 s: a stopped store held
        `status` past the CLI's patience)."""
        states: dict[str, int] = {}
        answered = timeout is not None
        if answered:
            try:
                async with asyncio.timeout(timeout):
                    for a in self.attachments:
                        for directory in (a.frontend_dir, a.backend_dir):
                            try:
                                assert self.client is not None
                                raw = await self.client.read(f"{directory}/state")
                                states[directory] = int(parse_state(raw))
                            except (XsError, ConnectionError, AssertionError):
                                pass
            except TimeoutError:
                answered = False
        unknown = int(State.UNKNOWN)
        return [m.AttachmentStatus(a.kind, a.frontend, a.backend, a.disk, a.frontend_dir,
                                   a.backend_dir, states.get(a.frontend_dir, unknown),
                                   states.get(a.backend_dir, unknown))
                for a in self.attachments], answered

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.channel is not None:
            self.channel.close()
