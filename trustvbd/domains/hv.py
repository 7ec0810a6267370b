"""The launcher (`trustvbd up`): the hypervisor analogue.

It starts every domain as its own process, creates every channel between them
(it connects, then hands the file descriptor over) only when policy allows it,
and stops them all cleanly. It keeps no keys and touches no data: each
encryption domain (one per workload type, domains/placement.py) gets what
unlocks its own disks through a pipe (domains/unlock.py) and the launcher
forgets it. Run as root, every domain but the access-control domain runs under
a user of its own (domains/sandbox.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import json
import logging
import os
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustvbd.acm import Policy, PolicyError, load_policy
from trustvbd.acm.audit import HYPERVISOR, crypt_role
from trustvbd.acm.client import AcmClient
from trustvbd.acm.commands import AUDIT_FILE, write_compiled
from trustvbd.acm.compiled import SUFFIX as COMPILED_SUFFIX
from trustvbd.config import Config, check_paths
from trustvbd.crypt.tls import TLS_DOMAIN_FILES, TlsSetupError, check_tls_dir
from trustvbd.crypt.tokens import new_secret, role_token
from trustvbd.domains import sandbox
from trustvbd.domains.control import ControlChannel, ControlClosed, socket_pair
from trustvbd.domains.hv_store import PairingRefused, StoreLink
from trustvbd.domains.placement import GuestSocket, file_safe, guest_sockets, types_of
from trustvbd.domains.unlock import Unlock, send_unlock
from trustvbd.nbd.uri import parse_uri
from trustvbd.state_dir import UnsafePath, secure_state_dir
from trustvbd.state_lock import StateLock, StateLocked
from trustvbd.xenstore.xenbus import State

log = logging.getLogger("trustvbd.hv")

START_TIMEOUT = 60.0  # per domain, plus START_PER_TIB for each TiB of encrypted disk
START_PER_TIB = 60.0  # opening reads and hashes each disk's leaf table (0.8 % of its size)
STOP_TIMEOUT = 60.0
MAX_DRIVER_RESTARTS = 5  # within RESTART_WINDOW seconds; then the domain stays down
RESTART_WINDOW = 60.0


class StartError(Exception):
    """`up` cannot start; the message says why and what to do."""


class _StoppedEarly(Exception):
    """A signal (or a dying domain) ended `up` before it was ready; the message is out."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


Grant = Callable[[], tuple[list[str], list[int]]]  # made at every start: extra argv, fds


@dataclass
class Domain:
    name: str
    kind: str  # "crypt" | "driver" | "acm"
    trusted: bool
    label: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    state: str = "starting"
    identity: sandbox.Identity = sandbox.AS_LAUNCHER
    env: dict[str, str] | None = None  # None: the launcher's environment minus secrets
    grant: Grant | None = None  # what the hypervisor hands this start: channels, files
    wtype: str | None = None  # an encryption domain's workload type


def physical_size(disk_size: int, encrypt: bool) -> int:
    if not encrypt:
        return disk_size
    from trustvbd.blocks.crypt_layer import physical_size as crypt_physical

    return crypt_physical(disk_size)


def listen_unix(path: Path, owner: int | None = None) -> socket.socket:
    """A listening socket only its owner (`owner`, else us) and root may connect to."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    if owner is not None:
        os.chown(path, owner, -1)
    sock.listen(128)
    return sock


def listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


class Launcher:
    def __init__(self, config: Config, bootstrap: str, policy: Policy | None = None) -> None:
        self.config = config
        self.domains: dict[str, Domain] = {}
        self.crypt_channels: dict[str, ControlChannel] = {}  # encryption domain -> its channel
        self.crypt_ready: dict[str, asyncio.Event] = {}
        self.types = types_of(config, policy)  # workload type -> its disks
        self.listeners: list[tuple[GuestSocket, socket.socket]] = []
        self.driver_listeners: dict[str, socket.socket] = {}
        self.acm_listener: socket.socket | None = None
        self.privileged = sandbox.privileged()
        self.uids: set[int] = set()
        self.trusted_gid: int | None = None
        # Directories closed to other users on the way to the interpreter (a Python under /root).
        self.expose = sandbox.closed_on_the_way(sandbox.python_paths()) if self.privileged else ()
        self.stopping = False
        self.fatal: str | None = None
        self.done = asyncio.Event()
        self.ready = asyncio.Event()
        self.failed_disks: dict[str, str] = {}
        self.failure_kinds: dict[str, str] = {}  # disk -> exception class name in the crypt domain
        self.integrity_events: list[dict[str, Any]] = []
        # Proves each domain's role to the access-control domain (who may record what).
        self.roles_secret = new_secret()
        self.acm = AcmClient(str(config.acm_socket), timeout=float(os.environ.get("TRUSTVBD_ACM_TIMEOUT", "5")),
                             hello=self.role_hello(HYPERVISOR))
        self.started = time.time()
        self.policy_path = str(config.policy) if config.policy else None
        self.bootstrap_label = bootstrap  # the label trusted domains run under
        self.export_tokens: dict[str, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.passphrase: bytearray | None = None  # until every encryption domain has it
        self.store = StoreLink(config, self.types, bootstrap)
        self.store_listener: socket.socket | None = None
        self.had_passphrase = False

    # -- domains ------------------------------------------------------------------
    @property
    def start_timeout(self) -> float:
        """Seconds a domain may take to start: TRUSTVBD_START_TIMEOUT, else scaled by disk size."""
        env = os.environ.get("TRUSTVBD_START_TIMEOUT")
        if env:
            return float(env)
        tib = sum(d.size for d in self.config.disks.values() if d.encrypt) / (1 << 40)
        return START_TIMEOUT + START_PER_TIB * tib

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

    async def spawn(self, domain: Domain) -> None:
        try:
            extra, granted = domain.grant() if domain.grant else ([], [])
        except (OSError, ValueError, sandbox.SandboxError) as exc:
            raise StartError(f"cannot prepare {domain.kind} domain {domain.name!r}: {exc}") from None
        read_end, write_end = os.pipe()
        argv = [*domain.argv, *extra, "--ready-fd", str(write_end)]
        env = domain.env if domain.env is not None else sandbox.without_secrets()
        try:
            domain.process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(write_end, *granted), stdin=asyncio.subprocess.DEVNULL, env=env,
                preexec_fn=sandbox.preexec(domain.identity),
                cwd="/" if domain.identity.uid is not None else None,  # ours may be closed to it
            )
        finally:
            os.close(write_end)
            for fd in granted:  # the domain holds its own copies now
                os.close(fd)
        loop = asyncio.get_running_loop()
        first_line: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(read_end, 64)
            except BlockingIOError:
                return
            if not first_line.done():
                first_line.set_result(data)

        os.set_blocking(read_end, False)
        loop.add_reader(read_end, readable)
        try:
            line = await asyncio.wait_for(first_line, self.start_timeout)
        finally:
            loop.remove_reader(read_end)
            os.close(read_end)
        if line != b"ready\n":
            code = await domain.process.wait()
            raise StartError(f"{domain.kind} domain {domain.name!r} failed to start (exit status {code});"
                             " see its messages above")
        domain.state = "running"
        self.tasks.add(loop.create_task(self.watch(domain)))

    async def watch(self, domain: Domain) -> None:
        assert domain.process is not None
        code = await domain.process.wait()
        if self.stopping:
            domain.state = "stopped"
            return
        domain.state = f"exited ({code})"
        if domain.kind == "store":  # its tree is in memory: everything else would lose its state
            self.fatal = f"the store domain died (exit status {code}); stopping everything"
            log.error("%s", self.fatal)
            self.done.set()
            return
        if domain.kind == "driver":
            await self.store.set_driver_state(domain.name, State.CLOSED)
        # Drivers are untrusted and stateless; the access-control domain reloads its policy,
        # and its clients deny everything until it is back (fail-closed); an encryption
        # domain recovers its disks from the trusted state (what a FLUSH promised is there)
        # and its guests reconnect to the same sockets, which the launcher holds.
        await self.restart(domain, code)

    async def restart(self, domain: Domain, code: int) -> None:
        now = time.monotonic()
        domain.restarts = [t for t in domain.restarts if now - t < RESTART_WINDOW] + [now]
        if len(domain.restarts) > MAX_DRIVER_RESTARTS:
            log.error("%s %s died %d times in a minute; leaving it down", domain.kind, domain.name,
                      len(domain.restarts))
            domain.state = "failed"
            return
        log.warning("%s %s exited (status %s); restarting it", domain.kind, domain.name, code)
        try:
            await self.spawn(domain)
        except StartError as exc:
            log.error("%s", exc)
            domain.state = "failed"
            return
        if domain.kind == "driver":
            await self.store.set_driver_state(domain.name, State.INIT_WAIT)

    def driver_domain(self, name: str) -> Domain:
        drv = self.config.drivers[name]
        argv = [sys.executable, "-m", "trustvbd.domains.driver", "--supervised"]
        # No TRUSTVBD_* settings and no passphrase: a clean environment.
        return Domain(name, "driver", False, drv.label, argv, identity=self.driver_identity(name),
                      env=sandbox.clean_environment(), grant=lambda: self.driver_grant(name))

    def driver_identity(self, name: str) -> sandbox.Identity:
        if not self.privileged:
            return sandbox.AS_LAUNCHER
        user = self.config.drivers[name].user
        if user:
            uid, gid = sandbox.named_user(user, f"{self.config.path}: driver {name!r}")
        else:
            uid = gid = sandbox.dynamic_uid(str(self.config.state_dir), "driver", name, self.uids)
        self.uids.add(uid)
        # It serves local files handed to it: it needs no network at all.
        return sandbox.Identity(uid, gid, new_netns=True, expose=self.expose)

    def driver_grant(self, name: str) -> tuple[list[str], list[int]]:
        """Like a hypervisor granting a device: open each backing file and the driver's
        listening socket here, and hand the descriptors over, so the driver needs no path."""
        drv = self.config.drivers[name]
        assert drv.dir is not None
        if name not in self.driver_listeners:  # bound once: only the launcher connects to it
            self.driver_listeners[name] = listen_unix(self.config.driver_socket(name))
        fds = [os.dup(self.driver_listeners[name].fileno())]
        argv = ["--listen-fd", str(fds[0])]
        try:
            for disk in self.config.disks.values():
                if name in disk.replicas:
                    path = drv.dir / (disk.name + ".img")
                    fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                    size = physical_size(disk.size, disk.encrypt)
                    argv += ["--export-fd", f"{self.export_token(disk.name)}={fds[-1]}:{size}"]
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return argv, fds

    def export_token(self, disk: str) -> str:
        """An opaque export name for our own drivers: the NBD handshake must not tell a
        driver which disk it holds (names can be confidential too)."""
        return self.export_tokens.setdefault(disk, "x" + secrets.token_hex(8))

    # -- channels -----------------------------------------------------------------
    async def open_channel(self, disk_name: str, replica: str,
                           wtype: str | None = None) -> tuple[socket.socket, str]:
        """Check (a), then connect to the replica's driver; the caller hands the fd over.

        An encryption domain gets channels only for its own workload type's disks."""
        disk = self.config.disks.get(disk_name)
        drv = self.config.drivers.get(replica)
        if disk is None or drv is None or replica not in disk.replicas:
            raise PermissionError(f"disk {disk_name!r} has no replica {replica!r}")
        if wtype is not None and disk_name not in self.types.get(wtype, []):
            raise PermissionError(f"disk {disk_name!r} is not of workload type {wtype!r}: this"
                                  " encryption domain holds no keys for it")
        await self.check_channel(disk_name, replica)
        if drv.dir is not None:
            path, export = str(self.config.driver_socket(replica)), self.export_token(disk.name)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = path
        else:
            assert drv.uri is not None
            uri = parse_uri(drv.uri)
            export = uri.export
            if uri.transport == "unix":
                sock, target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), uri.socket_path
            else:
                sock = socket.socket(socket.AF_INET6 if ":" in (uri.host or "") else socket.AF_INET)
                target = (uri.host, uri.port)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), 10)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise ConnectionError(f"cannot reach driver {replica!r} at {target}: {exc}") from None
        return sock, export

    async def check_channel(self, disk_name: str, replica: str) -> None:
        """Policy check (a): may this driver serve this disk? Asked before any channel opens."""
        disk, drv = self.config.disks[disk_name], self.config.drivers[replica]
        decision = await self.acm.driver_may_serve_disk(drv.name, drv.label, disk.name, disk.label)
        if not decision.allowed:
            raise PermissionError(
                f"policy forbids driver {drv.name!r} (label {drv.label}) to serve disk {disk.name!r}"
                f" (label {disk.label}): {decision.reason}")
        # The channel itself runs between the encryption domain, a trusted domain under the
        # policy's bootstrap label (Xen's dom0), and the driver: STE, as Xen's event channels.
        channel = await self.acm.channel("crypt", self.bootstrap_label, drv.name, drv.label)
        if not channel.allowed:
            raise PermissionError(
                f"policy forbids a channel between the encryption domain (label {self.bootstrap_label})"
                f" and driver {drv.name!r} (label {drv.label}): {channel.reason}")

    async def handle_crypt(self, domain: Domain, message: dict[str, Any],
                           fds: list[int]) -> tuple[dict[str, Any], list[int]] | None:
        op, event = message.get("op"), message.get("event")
        assert domain.wtype is not None
        if op == "spec":
            # The channel closes what it sends; the launcher keeps its own copies.
            # The last descriptor is this encryption domain's own connection to the store.
            mine = [(g, s) for g, s in self.listeners if g.wtype == domain.wtype]
            store_fd = await self.store.connection_for("crypt", domain.name)
            return self.crypt_spec(domain, mine), [*(os.dup(s.fileno()) for _, s in mine), store_fd]
        if op == "channel":
            disk, replica = str(message.get("disk")), str(message.get("replica"))
            try:
                sock, export = await self.open_channel(disk, replica, domain.wtype)
            except (PermissionError, ConnectionError) as exc:
                await self.store.set_driver_state(replica, State.CLOSED, disk)
                return {"ok": False, "error": str(exc)}, []
            await self.store.set_driver_state(replica, State.CONNECTED, disk)
            fd = sock.detach()
            uri = self.config.drivers[str(message.get("replica"))].uri
            target = parse_uri(uri) if uri else None
            tls = {"server_name": target.server_name} if target and target.tls else None
            return {"ok": True, "export": export, "tls": tls}, [fd]
        if event == "ready":
            self.crypt_ready[domain.name].set()
            return None
        if event == "disk_failed":
            self.failed_disks[message["disk"]] = message["error"]
            self.failure_kinds[message["disk"]] = str(message.get("kind", ""))
            return None
        if event == "integrity":
            self.integrity_events.append(message)  # the encryption domain records it itself
            return None
        return {"ok": False, "error": f"unknown request {op or event!r}"}, []

    def crypt_spec(self, domain: Domain,
                   listeners: list[tuple[GuestSocket, socket.socket]]) -> dict[str, Any]:
        """One encryption domain's share: its own type's disks and the sockets routed to it."""
        c = self.config
        assert domain.wtype is not None
        wtype = domain.wtype
        return {
            "ok": True,
            "state_dir": str(c.state_dir),
            "request_timeout": float(os.environ.get("TRUSTVBD_REQUEST_TIMEOUT", "30")),
            "disks": [
                {"name": d.name, "label": d.label, "size": d.size, "encrypt": d.encrypt,
                 "replicas": list(d.replicas)}
                for d in (c.disks[name] for name in self.types[wtype])
            ],
            "guests": {g.name: {"label": g.label, "tls_name": g.certificate_name, "uid": g.uid}
                       for g in c.guests.values()},
            "listeners": [
                {"guest": g.guest, "tls": sock.family != socket.AF_UNIX and c.guests[g.guest].tls}
                for g, sock in listeners],
            "tls_dir": str(self.tls_copy(domain)) if c.tls_dir else None,
            "limits": dataclasses.asdict(c.limits),
            "acm_socket": str(c.acm_socket),
            "store": self.store.crypt_spec(domain.name),
            # Other types' disks: names and labels only, so a guest asking for one on the wrong
            # socket gets the policy's answer or the right socket, not "no such disk".
            "elsewhere": {
                d.name: {"label": d.label, "sockets": {
                    g.guest: str(g.path) for g, s in self.listeners
                    if d.name in self.types[g.wtype] and s.family == socket.AF_UNIX}}
                for d in c.disks.values() if d.name not in self.types[wtype]},
            # What it may record: integrity events of its disks, refusals at its guests' sockets.
            "acm_hello": self.role_hello(crypt_role(self.types[wtype],
                                                    [g.guest for g, _ in listeners])),
        }

    def role_hello(self, role: str) -> dict[str, str]:
        return {"role": role, "token": role_token(self.roles_secret, role)}

    def tls_copy(self, domain: Domain) -> Path:
        """The TLS files an encryption domain reads: the configured directory itself, or, when
        it runs under a user of its own, a copy in STATE/tls/TYPE that only it may read."""
        assert self.config.tls_dir is not None
        if domain.identity.uid is None:
            return self.config.tls_dir
        assert domain.wtype is not None
        copy = self.config.state_dir / "tls" / file_safe(domain.wtype)
        copy.mkdir(parents=True, mode=0o700, exist_ok=True)
        for entry in os.scandir(self.config.tls_dir):
            # Never ca-key.pem: whoever holds it can make any guest's certificate.
            if entry.is_file() and entry.name in TLS_DOMAIN_FILES:
                fd = os.open(copy / entry.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                             0o600)
                with open(fd, "wb") as out, open(entry.path, "rb") as src:
                    out.write(src.read())
        sandbox.own_tree(str(copy), domain.identity.uid, domain.identity.uid)
        os.chmod(copy.parent, 0o710)
        os.chown(copy.parent, -1, self.crypt_group())
        return copy

    # -- encryption domains ---------------------------------------------------------
    def crypt_domain(self, wtype: str) -> Domain:
        name = f"crypt-{file_safe(wtype)}"
        identity = sandbox.AS_LAUNCHER
        if self.privileged:
            uid = sandbox.dynamic_uid(str(self.config.state_dir), "crypt", wtype, self.uids)
            self.uids.add(uid)
            identity = sandbox.Identity(uid, uid, groups=(self.crypt_group(),), expose=self.expose)
        argv = [sys.executable, "-m", "trustvbd.domains.crypt"]
        domain = Domain(name, "crypt", True, "", argv, identity=identity, wtype=wtype)
        domain.grant = lambda: self.crypt_grant(domain)
        self.crypt_ready[name] = asyncio.Event()
        return domain

    def crypt_group(self) -> int:
        """The group every trusted domain shares: it may pass through the state directory and
        reach the access-control domain. No driver's uid or gid is ever this number."""
        if self.trusted_gid is None:
            self.trusted_gid = sandbox.dynamic_uid(str(self.config.state_dir), "trusted", "",
                                                   self.uids)
            self.uids.add(self.trusted_gid)
        return self.trusted_gid

    def crypt_grant(self, domain: Domain) -> tuple[list[str], list[int]]:
        """A new control channel, what unlocks its disks (through a pipe), its key directories."""
        assert domain.wtype is not None
        old = self.crypt_channels.pop(domain.name, None)
        if old is not None:
            old.close()
        self.crypt_ready[domain.name].clear()
        fds: list[int] = []
        try:
            if domain.identity.uid is not None:
                self.own_key_dirs(domain)
                state = os.open(self.config.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fds.append(state)
            unlock = self.unlock_for(domain.wtype)
            try:
                fds.append(send_unlock(unlock))
            finally:
                unlock.forget()
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        ours, theirs = socket_pair()
        channel = ControlChannel(ours, lambda m, f: self.handle_crypt(domain, m, f), domain.name)
        channel.start()
        self.crypt_channels[domain.name] = channel
        argv = ["--control-fd", str(theirs.fileno()), "--unlock-fd", str(fds[-1])]
        if domain.identity.uid is not None:
            # The state directory's parents may be closed to this user: it starts from the fd.
            argv += ["--state-dir-fd", str(fds[0])]
        return argv, [*fds, theirs.detach()]

    def own_key_dirs(self, domain: Domain) -> None:
        """Its disks' directories (keys, anchor, intent log) belong to its user, 0700."""
        assert domain.wtype is not None and domain.identity.uid is not None
        for name in self.types[domain.wtype]:
            if self.config.disks[name].encrypt:
                path = self.config.state_dir / "disks" / name
                path.mkdir(mode=0o700, exist_ok=True)
                sandbox.own_tree(str(path), domain.identity.uid, domain.identity.uid)

    def unlock_for(self, wtype: str) -> Unlock:
        """What unlocks this type's disks: the passphrase (only while starting), the key file."""
        from trustvbd.blocks.disk_state import DiskState
        from trustvbd.domains.crypt_disks import needs_passphrase

        unlock = Unlock()
        disks = [n for n in self.types[wtype] if self.config.disks[n].encrypt]
        if not disks:
            return unlock
        if self.passphrase is not None:
            unlock.passphrase = bytearray(self.passphrase)
        state = self.config.state_dir
        if any((DiskState(state, n).keys_path.exists() and not needs_passphrase(state, n))
               or (not DiskState(state, n).keys_path.exists() and self.passphrase is None)
               for n in disks):
            unlock.key_file = read_key_file(state)
        return unlock

    def forget_passphrase(self) -> None:
        if self.passphrase is not None:
            self.passphrase[:] = bytes(len(self.passphrase))
            self.passphrase = None

    def open_state_dir_to_trusted_domains(self) -> None:
        """Encryption domains pass through STATE and STATE/disks to their own directories
        (group x only: they list nothing); everyone else keeps what secure_state_dir allows."""
        for path in (self.config.state_dir, self.config.state_dir / "disks"):
            os.chown(path, -1, self.crypt_group())
            os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) | 0o010)

    # -- start and stop -----------------------------------------------------------
    async def start(self) -> list[str]:
        c = self.config
        for sub in ("guests", "drivers", "disks"):
            (c.state_dir / sub).mkdir(exist_ok=True)
        if self.privileged:
            self.open_state_dir_to_trusted_domains()
        else:
            log.warning("%s", sandbox.WEAK_ISOLATION_WARNING.format(uid=os.geteuid()))
        acm = self.acm_domain()
        self.domains["acm"] = acm
        await self.spawn(acm)
        for disk in c.disks.values():  # check (a) for every replica before any driver starts
            for replica in disk.replicas:
                try:
                    await self.check_channel(disk.name, replica)
                except PermissionError as exc:
                    raise StartError(str(exc)) from None
        self.warn_thin()
        await self.start_store()
        for name, drv in c.drivers.items():
            if drv.dir is not None:
                domain = self.driver_domain(name)
                self.domains[name] = domain
                if not any(name in d.replicas for d in c.disks.values()):
                    domain.state = "idle (no disk uses it)"  # nothing to serve: not started
                    log.warning("driver %s is idle: no [[disk]] lists it in replicas", name)
                    continue
                await self.spawn(domain)
            await self.store.set_driver_state(name, State.INIT_WAIT)
        lines = []
        all_types = list(self.types)
        for guest in c.guests.values():
            allowed = {d: await self.guest_may_see(guest.name, d) for d in c.disks}
            for name in (d for d, ok in allowed.items() if ok):  # a directory pair per attachment
                await self.store.attach_guest(guest.name, name)
            reachable = [t for t in all_types if any(allowed[d] for d in self.types[t])]
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
        for wtype in all_types:
            crypt = self.crypt_domain(wtype)
            self.domains[crypt.name] = crypt
            await self.spawn(crypt)
            await self.wait_ready(crypt.name)
        self.forget_passphrase()  # every encryption domain has what unlocks its disks
        self.ready.set()
        if self.failed_disks:
            wrong = [d for d, kind in self.failure_kinds.items() if kind == "WrongKeyError"]
            if wrong and self.had_passphrase:
                raise StartError(f"wrong passphrase for disk {', '.join(map(repr, wrong))}:"
                                 " nothing was changed; start again with the right one")
            problems = "; ".join(f"disk {d!r}: {e}" for d, e in self.failed_disks.items())
            raise StartError(f"cannot serve every disk: {problems}")
        for guest in c.guests.values():
            for disk in c.disks.values():
                if await self.guest_may_see(guest.name, disk.name):
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

    async def start_store(self) -> None:
        """The store domain, domain 0's connection to it, and the replica directories."""
        self.domains["store"] = Domain("store", "store", True, "", self.store.argv(),
                                       identity=self.store_identity(), grant=self.store_grant)
        await self.spawn(self.domains["store"])
        await self.store.connect()
        try:
            await self.store.attach_replicas()
        except PairingRefused as exc:
            raise StartError(str(exc)) from None

    def store_identity(self) -> sandbox.Identity:
        """A user of its own, in the trusted group (it asks the access-control domain); it
        needs no file: its socket and channels are handed over."""
        if not self.privileged:
            return sandbox.AS_LAUNCHER
        uid = sandbox.dynamic_uid(str(self.config.state_dir), "store", "", self.uids)
        self.uids.add(uid)
        return sandbox.Identity(uid, uid, groups=(self.crypt_group(),), expose=self.expose)

    def store_grant(self) -> tuple[list[str], list[int]]:
        """The public socket, bound here once (root's only, 0600), and a new control channel."""
        if self.store_listener is None:
            self.store_listener = listen_unix(self.config.store_socket)
        return self.store.grant(self.store_listener.fileno())

    async def guest_may_see(self, guest: str, disk: str) -> bool:
        """Check (b) for the start-up listing (the encryption domain enforces it per connection)."""
        g, d = self.config.guests[guest], self.config.disks[disk]
        return (await self.acm.guest_may_use_disk(g.name, g.label, d.name, d.label)).allowed

    def compiled_policy(self, suffix: str = "") -> Path:
        """Where the launcher writes the policy it compiled; the domain reads only this."""
        return self.config.state_dir / f"policy{suffix}{COMPILED_SUFFIX}"

    def acm_domain(self) -> Domain:
        c = self.config
        policy = ["--policy", str(self.compiled_policy())] if c.policy else ["--null"]
        argv = [sys.executable, "-m", "trustvbd.domains.acm", "--supervised", *policy,
                "--audit", str(c.state_dir / AUDIT_FILE)]
        return Domain("acm", "acm", True, "", argv, grant=self.acm_grant)

    def acm_grant(self) -> tuple[list[str], list[int]]:
        """The access-control domain's listening socket, bound here once (a restarted domain
        serves the same one): the trusted domains' group may connect, a driver may not."""
        if self.acm_listener is None:
            self.acm_listener = listen_unix(self.config.acm_socket)
            if self.privileged:
                os.chown(self.config.acm_socket, -1, self.crypt_group())
                os.chmod(self.config.acm_socket, 0o660)
        fd = os.dup(self.acm_listener.fileno())
        # A fresh pipe per start (and restart): the roles secret reaches it and nobody else.
        roles, secret_in = os.pipe()
        os.write(secret_in, self.roles_secret)
        os.close(secret_in)
        return ["--listen-fd", str(fd), "--roles-fd", str(roles)], [fd, roles]

    async def stop(self) -> None:
        self.stopping = True
        self.forget_passphrase()

        async def stop_crypt(channel: ControlChannel) -> None:
            if not channel.closed.is_set():
                with contextlib.suppress(ControlClosed, asyncio.TimeoutError, OSError):
                    await channel.request({"op": "stop"}, timeout=STOP_TIMEOUT)

        await asyncio.gather(*(stop_crypt(ch) for ch in self.crypt_channels.values()))
        order = sorted(self.domains.values(), key=lambda d: {"crypt": 0, "driver": 1}.get(d.kind, 2))
        for domain in order:
            await self.terminate(domain)
        await self.store.close()
        held = [s for _, s in self.listeners] + list(self.driver_listeners.values())
        held += [s for s in (self.acm_listener, self.store_listener) if s is not None]
        for sock in held:
            if sock.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    Path(sock.getsockname()).unlink()
            sock.close()

    async def terminate(self, domain: Domain) -> None:
        proc = domain.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            log.error("%s did not stop in 10 s; killing it", domain.name)
            proc.kill()
            await proc.wait()
        domain.state = "stopped"

    # -- status ---------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        c = self.config
        result: dict[str, Any] = {
            "pid": os.getpid(),
            "state_dir": str(c.state_dir),
            "config": str(c.path),
            "policy": self.policy_path,
            "uptime": round(time.time() - self.started, 1),
            "domains": [{"name": "hv", "kind": "hv", "trusted": True, "pid": os.getpid(),
                         "label": "", "state": "running", "restarts": 0}],
        }
        for d in self.domains.values():
            result["domains"].append({
                "name": d.name, "kind": d.kind, "trusted": d.trusted, "label": d.label,
                "pid": d.process.pid if d.process else None, "state": d.state,
                "restarts": len(d.restarts),
            })
        disks: list[dict[str, Any]] = []
        workers: list[Any] = []
        aead_restarts = 0
        per_guest: dict[str, dict[str, Any]] = {}
        for name, channel in self.crypt_channels.items():
            if channel.closed.is_set():
                continue
            crypt: dict[str, Any] = {}
            with contextlib.suppress(ControlClosed, asyncio.TimeoutError):
                crypt, _ = await channel.request({"op": "status"}, timeout=10)
            disks += [{**d, "domain": name} for d in crypt.get("disks", [])]
            workers += crypt.get("aead_workers", [])
            aead_restarts += int(crypt.get("aead_restarts", 0))
            for g in crypt.get("guests", []):  # a guest may reach several encryption domains
                into = per_guest.setdefault(g["name"], {"connections": []})
                for key, value in g.items():
                    if key == "connections":
                        into["connections"] += value
                    elif isinstance(value, int) and key != "name":
                        into[key] = into.get(key, 0) + value
        order = list(c.disks)
        result["disks"] = sorted(disks, key=lambda d: order.index(d["name"]) if d["name"] in order else 0)
        result["aead_workers"] = workers
        result["aead_restarts"] = aead_restarts
        result["guests"] = [
            {"name": g.name, "label": g.label, "socket": str(c.guest_socket(g.name)),
             "connections": [], **{k: v for k, v in per_guest.get(g.name, {}).items() if k != "name"},
             "sockets": {gs.wtype: str(gs.path) for gs, s in self.listeners
                         if gs.guest == g.name and s.family == socket.AF_UNIX}}
            for g in c.guests.values()
        ]
        result["integrity_events"] = self.integrity_events[-20:]
        result["attachments"] = await self.store.status()  # XenBus states, read from the store
        return result

    async def policy_load(self, path: str) -> dict[str, Any]:
        """Compile, swap the policy in the access-control domain, then close what it now forbids."""
        try:
            write_compiled(load_policy(path), self.compiled_policy(".next"))
        except (PolicyError, OSError) as exc:
            return {"ok": False, "error": str(exc)}
        reply = await self.acm.load_policy(str(self.compiled_policy(".next")))
        if not reply.get("ok"):
            self.compiled_policy(".next").unlink(missing_ok=True)
            return {"ok": False, "error": reply.get("error", "the access-control domain refused it")}
        # A restarted access-control domain loads what the running one holds.
        os.replace(self.compiled_policy(".next"), self.compiled_policy())
        self.policy_path = path
        # What the access-control domain loaded, not a second read of a file that may change.
        summary = reply.get("policy")
        if not isinstance(summary, dict):
            summary = {}
        self.bootstrap_label = bootstrap_label(summary.get("bootstrap"), null=False)
        await self.store.relabel_crypt(self.bootstrap_label)  # for later pairings
        closed = 0
        for channel in list(self.crypt_channels.values()):
            if not channel.closed.is_set():
                answer, _ = await channel.request({"op": "policy_changed"})
                closed += int(answer.get("closed", 0))
        log.warning("policy %s loaded; %d connection(s) closed", path, closed)
        return {"ok": True, "name": summary.get("name") or Path(path).name, "closed": closed}

    async def serve_control(self) -> asyncio.AbstractServer:
        """`trustvbd status` and friends talk to the running launcher over this socket."""

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            rid = None
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                request = json.loads(line or b"{}")
                rid = request.get("id")
                if type(rid) is not int:
                    rid = None
                    raise ValueError('a control request carries its request id, "id"')
                reply = await self.control_request(request)
            except Exception as exc:
                reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps({**reply, "reply_to": rid}).encode() + b"\n")
            with contextlib.suppress(OSError):
                await writer.drain()
                writer.close()

        path = self.config.control_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.start_unix_server(client, str(path), limit=1 << 20)
        os.chmod(path, 0o600)
        return server

    async def control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "status":
            return {"ok": True, **(await self.status())}
        if request.get("op") == "policy_load":
            return await self.policy_load(str(request.get("path")))
        if request.get("op") == "scrub":  # mirroring (h1): the disk's encryption domain runs it
            disk = request.get("disk")
            for channel in self.crypt_channels.values():
                if not channel.closed.is_set():
                    reply, _ = await channel.request({"op": "scrub", "disk": disk}, timeout=10)
                    if reply.get("ok") or reply.get("kind") != "unknown disk":
                        return reply
            return {"ok": False, "error": f"no running encryption domain serves disk {disk!r}"}
        return {"ok": False, "error": f"unknown op {request.get('op')!r}"}


def bootstrap_label(bootstrap: str | None, null: bool) -> str:
    """The label trusted domains run under: the policy's bootstrap label (none: NULL policy)."""
    if null:
        return "__BOOTSTRAP__"
    return bootstrap or "__UNLABELED__"


def read_key_file(state_dir: Path) -> bytearray:
    """The state directory's key file (made on first use), read into a buffer that can be zeroed."""
    from trustvbd.blocks.disk_state import load_kek

    load_kek(state_dir)  # creates it when that is safe; checks its mode and length
    buf = bytearray(32)
    with open(state_dir / "kek.key", "rb", buffering=0) as f:
        if f.readinto(buf) != 32:
            raise ValueError(f"key file {state_dir / 'kek.key'} changed while being read")
    return buf


def passphrase_for_up(config: Config) -> str | None:
    """TRUSTVBD_PASSPHRASE, else asked once on the terminal if an existing disk needs one.

    Without a terminal, a disk that needs a passphrase stops `up` before anything starts.
    """
    env = os.environ.get("TRUSTVBD_PASSPHRASE")
    if env is not None:
        return env
    from trustvbd.crypt.keys import KeyFileError
    from trustvbd.domains.crypt_disks import needs_passphrase

    try:
        locked = [d.name for d in config.disks.values()
                  if d.encrypt and needs_passphrase(config.state_dir, d.name)]
    except (KeyFileError, OSError) as exc:
        raise StartError(str(exc)) from None
    if not locked:
        return None
    names = ("disk " if len(locked) == 1 else "disks ") + ", ".join(map(repr, locked))
    if not (sys.stdin is not None and sys.stdin.isatty()):
        raise StartError(f"{names} {'is' if len(locked) == 1 else 'are'} protected by a passphrase:"
                         " set TRUSTVBD_PASSPHRASE, or start `trustvbd up` from a terminal to be"
                         " asked for it")
    # Ctrl-C at the prompt interrupts it (asyncio's handler would only note it for later).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        passphrase = getpass.getpass(f"Passphrase for disk {', '.join(locked)}: ")
    except EOFError:
        passphrase = ""
    finally:
        signal.signal(signal.SIGINT, previous)
    if not passphrase:
        raise StartError(f"no passphrase given for {names}")
    return passphrase


async def run_up(config: Config) -> int:
    bootstrap = bootstrap_label(None, null=True)
    policy = None
    if config.policy is not None:
        try:
            policy = load_policy(config.policy)  # file:line: reason now, not a dead domain later
        except PolicyError as exc:
            print(f"trustvbd up: policy error: {exc}", file=sys.stderr)
            return 2
        bootstrap = bootstrap_label(policy.bootstrap, null=False)
    check_paths(config)
    try:
        secure_state_dir(config)
        if config.tls_dir is not None:
            check_tls_dir(config.tls_dir,
                          server=any(g.listen and g.tls for g in config.guests.values()),
                          client=any(parse_uri(d.uri).tls for d in config.drivers.values() if d.uri))
    except (UnsafePath, TlsSetupError) as exc:
        print(f"trustvbd up: {exc}", file=sys.stderr)
        return 1
    try:
        lock = StateLock(config.state_dir)
    except StateLocked as exc:
        print(f"trustvbd up: trustvbd up is already running on state directory {exc.state_dir}"
              f" (pid {exc.pid}); stop it first, or use another state_dir", file=sys.stderr)
        return 1
    try:
        passphrase = passphrase_for_up(config)
    except StartError as exc:
        print(f"trustvbd up: {exc}", file=sys.stderr)
        lock.release()
        return 1
    except BaseException:
        lock.release()
        raise
    try:
        launcher = Launcher(config, bootstrap, policy)
    except ValueError as exc:
        print(f"trustvbd up: {exc}", file=sys.stderr)
        lock.release()
        return 1
    if passphrase is not None:  # held as bytes that can be zeroed, and only until start-up ends
        launcher.passphrase, launcher.had_passphrase = bytearray(passphrase.encode()), True
    del passphrase
    os.environ.pop("TRUSTVBD_PASSPHRASE", None)  # no child inherits it
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, launcher.done.set)
    control = None
    code = 0
    try:
        if policy is not None:  # the access-control domain loads only the compiled form
            write_compiled(policy, launcher.compiled_policy())
        if config.policy is None:
            log.warning("NO POLICY CONFIGURED: running Xen's NULL policy — every guest may use every"
                        " disk and every driver may serve every disk. Set `policy = \"FILE\"`.")
        for guest in config.guests.values():
            if guest.listen is not None and not guest.tls:
                log.warning("guest %s's TCP port %s:%d has NO TLS (tls = false): anyone who can"
                            " reach it can claim to be %s and read and write its disks; add"
                            " [tls] and remove tls = false", guest.name, *guest.listen, guest.name)
        for disk in config.disks.values():
            if not disk.encrypt:
                log.warning("disk %s is NOT ENCRYPTED (encrypt = false): its driver sees and may alter"
                            " its data unnoticed; use this only to measure", disk.name)
        starting = loop.create_task(launcher.start())
        stop_asked = loop.create_task(launcher.done.wait())
        await asyncio.wait([starting, stop_asked], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # SIGINT/SIGTERM (or a domain died) before everything ran
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            print(f"trustvbd up: {launcher.fatal or 'stopped during start-up'}", file=sys.stderr)
            raise _StoppedEarly(1)
        stop_asked.cancel()
        lines = starting.result()
        control = await launcher.serve_control()
        for line in lines:
            print(line, flush=True)
        print("ready", flush=True)
        await launcher.done.wait()
        if launcher.fatal:
            print(f"trustvbd up: {launcher.fatal}", file=sys.stderr)
            code = 1
    except _StoppedEarly as early:
        code = early.code
    except (TimeoutError, StartError, OSError) as exc:
        message = str(exc) or ("timed out waiting for a domain to start; a large disk may need "
                               "longer: set TRUSTVBD_START_TIMEOUT=SECONDS")
        print(f"trustvbd up: {message}", file=sys.stderr)
        code = 1
    finally:
        if control is not None:
            control.close()
            with contextlib.suppress(FileNotFoundError):
                config.control_socket.unlink()
        await launcher.stop()
        await launcher.acm.close()
        lock.release()
    return code
