"""The launcher (`trustvbd up`): the hypervisor analogue.

It starts every domain as its own process, creates every channel between them
(it connects, then hands the file descriptor over) only when policy allows it,
and stops them all cleanly. It keeps no keys and touches no data.
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustvbd.acm import PolicyError, load_policy
from trustvbd.acm.client import AcmClient
from trustvbd.acm.commands import AUDIT_FILE, write_compiled
from trustvbd.acm.compiled import SUFFIX as COMPILED_SUFFIX
from trustvbd.config import Config, check_paths
from trustvbd.crypt.tls import TlsSetupError, check_tls_dir
from trustvbd.domains.control import ControlChannel, ControlClosed, socket_pair
from trustvbd.nbd.uri import parse_uri
from trustvbd.state_dir import UnsafePath, secure_state_dir
from trustvbd.state_lock import StateLock, StateLocked

log = logging.getLogger("trustvbd.hv")

START_TIMEOUT = 60.0  # per domain, plus START_PER_TIB for each TiB of encrypted disk
START_PER_TIB = 60.0  # opening reads and hashes each disk's leaf table (0.8 % of its size)
STOP_TIMEOUT = 60.0
MAX_DRIVER_RESTARTS = 5  # within RESTART_WINDOW seconds; then the driver stays down
RESTART_WINDOW = 60.0


class StartError(Exception):
    """`up` cannot start; the message says why and what to do."""


class _StoppedEarly(Exception):
    """A signal (or a dying domain) ended `up` before it was ready; the message is out."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


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
    def __init__(self, config: Config, bootstrap: str) -> None:
        self.config = config
        self.domains: dict[str, Domain] = {}
        self.crypt_channel: ControlChannel | None = None
        self.listeners: list[tuple[str, socket.socket]] = []
        self.stopping = False
        self.fatal: str | None = None
        self.done = asyncio.Event()
        self.ready = asyncio.Event()
        self.failed_disks: dict[str, str] = {}
        self.failure_kinds: dict[str, str] = {}  # disk -> exception class name in the crypt domain
        self.integrity_events: list[dict[str, Any]] = []
        self.acm = AcmClient(str(config.acm_socket), timeout=float(os.environ.get("TRUSTVBD_ACM_TIMEOUT", "5")))
        self.started = time.time()
        self.policy_path = str(config.policy) if config.policy else None
        self.bootstrap_label = bootstrap  # the label trusted domains run under
        self.export_tokens: dict[str, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.passphrase: str | None = os.environ.get("TRUSTVBD_PASSPHRASE")

    # -- domains ------------------------------------------------------------------
    @property
    def start_timeout(self) -> float:
        """Seconds a domain may take to start: TRUSTVBD_START_TIMEOUT, else scaled by disk size."""
        env = os.environ.get("TRUSTVBD_START_TIMEOUT")
        if env:
            return float(env)
        tib = sum(d.size for d in self.config.disks.values() if d.encrypt) / (1 << 40)
        return START_TIMEOUT + START_PER_TIB * tib

    async def wait_ready(self) -> None:
        """Wait for the encryption domain to open every disk, saying so every 10 s."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(
                    f"the encryption domain did not finish opening the disks within "
                    f"{self.start_timeout:.0f} s; a large disk may need longer: set "
                    "TRUSTVBD_START_TIMEOUT=SECONDS")
            try:
                await asyncio.wait_for(self.ready.wait(), min(10.0, left))
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

    async def spawn(self, domain: Domain, pass_fds: tuple[int, ...] = ()) -> None:
        read_end, write_end = os.pipe()
        argv = [*domain.argv, "--ready-fd", str(write_end)]
        domain.process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(write_end, *pass_fds), stdin=asyncio.subprocess.DEVNULL,
        )
        os.close(write_end)
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
        if domain.kind in ("driver", "acm"):
            # Drivers are untrusted and stateless; the access-control domain reloads its
            # policy, and its clients deny everything until it is back (fail-closed).
            await self.restart(domain, code)
            return
        self.fatal = f"{domain.kind} domain {domain.name!r} died (exit status {code}); stopping everything"
        log.error("%s", self.fatal)
        self.done.set()

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

    def driver_domain(self, name: str) -> Domain:
        drv = self.config.drivers[name]
        assert drv.dir is not None
        exports = []
        for disk in self.config.disks.values():
            if name in disk.replicas:
                size = physical_size(disk.size, disk.encrypt)
                token = self.export_token(disk.name)
                exports += ["--export", f"{token}={drv.dir / (disk.name + '.img')}:{size}"]
        argv = [sys.executable, "-m", "trustvbd.domains.driver", "--supervised",
                "--socket", str(self.config.driver_socket(name)), *exports]
        return Domain(name, "driver", False, drv.label, argv)

    def export_token(self, disk: str) -> str:
        """An opaque export name for our own drivers: the NBD handshake must not tell a
        driver which disk it holds (names can be confidential too)."""
        return self.export_tokens.setdefault(disk, "x" + secrets.token_hex(8))

    # -- channels -----------------------------------------------------------------
    async def open_channel(self, disk_name: str, replica: str) -> tuple[socket.socket, str]:
        """Check (a), then connect to the replica's driver; the caller hands the fd over."""
        disk = self.config.disks.get(disk_name)
        drv = self.config.drivers.get(replica)
        if disk is None or drv is None or replica not in disk.replicas:
            raise PermissionError(f"disk {disk_name!r} has no replica {replica!r}")
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

    async def handle_crypt(self, message: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]] | None:
        op, event = message.get("op"), message.get("event")
        if op == "spec":
            # The channel closes what it sends; the launcher keeps its own copies.
            return self.crypt_spec(), [os.dup(s.fileno()) for _, s in self.listeners]
        if op == "channel":
            try:
                sock, export = await self.open_channel(str(message.get("disk")), str(message.get("replica")))
            except (PermissionError, ConnectionError) as exc:
                return {"ok": False, "error": str(exc)}, []
            fd = sock.detach()
            uri = self.config.drivers[str(message.get("replica"))].uri
            target = parse_uri(uri) if uri else None
            tls = {"server_name": target.server_name} if target and target.tls else None
            return {"ok": True, "export": export, "tls": tls}, [fd]
        if event == "ready":
            self.ready.set()
            return None
        if event == "disk_failed":
            self.failed_disks[message["disk"]] = message["error"]
            self.failure_kinds[message["disk"]] = str(message.get("kind", ""))
            return None
        if event == "integrity":
            self.integrity_events.append(message)
            fields = {k: v for k, v in message.items() if k != "event"}
            await self.acm.record("integrity", **fields)
            return None
        return {"ok": False, "error": f"unknown request {op or event!r}"}, []

    def crypt_spec(self) -> dict[str, Any]:
        c = self.config
        return {
            "ok": True,
            "state_dir": str(c.state_dir),
            "request_timeout": float(os.environ.get("TRUSTVBD_REQUEST_TIMEOUT", "30")),
            "disks": [
                {"name": d.name, "label": d.label, "size": d.size, "encrypt": d.encrypt,
                 "replicas": list(d.replicas)}
                for d in c.disks.values()
            ],
            "guests": {g.name: {"label": g.label, "tls_name": g.certificate_name, "uid": g.uid}
                       for g in c.guests.values()},
            "listeners": [
                {"guest": guest, "tls": sock.family != socket.AF_UNIX and c.guests[guest].tls}
                for guest, sock in self.listeners],
            "tls_dir": str(c.tls_dir) if c.tls_dir else None,
            "limits": dataclasses.asdict(c.limits),
            "passphrase": self.passphrase,
            "acm_socket": str(c.acm_socket),
        }

    # -- start and stop -----------------------------------------------------------
    async def start(self) -> list[str]:
        c = self.config
        for sub in ("guests", "drivers", "disks"):
            (c.state_dir / sub).mkdir(exist_ok=True)
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
        for name, drv in c.drivers.items():
            if drv.dir is not None:
                domain = self.driver_domain(name)
                self.domains[name] = domain
                if not any(name in d.replicas for d in c.disks.values()):
                    domain.state = "idle (no disk uses it)"  # nothing to serve: not started
                    log.warning("driver %s is idle: no [[disk]] lists it in replicas", name)
                    continue
                await self.spawn(domain)
        lines = []
        for guest in c.guests.values():
            self.listeners.append((guest.name, listen_unix(c.guest_socket(guest.name), guest.uid)))
            if guest.listen:
                tcp = listen_tcp(*guest.listen)
                self.listeners.append((guest.name, tcp))
        ours, theirs = socket_pair()
        crypt = Domain("crypt", "crypt", True, "", [
            sys.executable, "-m", "trustvbd.domains.crypt", "--control-fd", str(theirs.fileno())])
        self.domains["crypt"] = crypt
        self.crypt_channel = ControlChannel(ours, self.handle_crypt, "crypt")
        self.crypt_channel.start()
        await self.spawn(crypt, (theirs.fileno(),))
        theirs.close()
        await self.wait_ready()
        if self.failed_disks:
            wrong = [d for d, kind in self.failure_kinds.items() if kind == "WrongKeyError"]
            if wrong and self.passphrase is not None:
                raise StartError(f"wrong passphrase for disk {', '.join(map(repr, wrong))}:"
                                 " nothing was changed; start again with the right one")
            problems = "; ".join(f"disk {d!r}: {e}" for d, e in self.failed_disks.items())
            raise StartError(f"cannot serve every disk: {problems}")
        for guest in c.guests.values():
            for disk in c.disks.values():
                if await self.guest_may_see(guest.name, disk.name):
                    lines.append(f"guest {guest.name} disk {disk.name} "
                                 f"nbd+unix:///{disk.name}?socket={c.guest_socket(guest.name)}")
                    for name, sock in self.listeners:
                        if name == guest.name and sock.family != socket.AF_UNIX:
                            host, port = sock.getsockname()[:2]
                            host = f"[{host}]" if ":" in host else host
                            scheme = "nbds" if guest.tls else "nbd"
                            lines.append(f"guest {guest.name} disk {disk.name}"
                                         f" {scheme}://{host}:{port}/{disk.name}")
        return lines

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
                "--audit", str(c.state_dir / AUDIT_FILE), "--socket", str(c.acm_socket)]
        return Domain("acm", "acm", True, "", argv)

    async def stop(self) -> None:
        self.stopping = True
        if self.crypt_channel is not None and not self.crypt_channel.closed.is_set():
            with contextlib.suppress(ControlClosed, asyncio.TimeoutError, OSError):
                await self.crypt_channel.request({"op": "stop"}, timeout=STOP_TIMEOUT)
        order = sorted(self.domains.values(), key=lambda d: {"crypt": 0, "driver": 1}.get(d.kind, 2))
        for domain in order:
            await self.terminate(domain)
        for _, sock in self.listeners:
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
        crypt: dict[str, Any] = {"disks": [], "guests": []}
        if self.crypt_channel is not None and not self.crypt_channel.closed.is_set():
            with contextlib.suppress(ControlClosed, asyncio.TimeoutError):
                crypt, _ = await self.crypt_channel.request({"op": "status"}, timeout=10)
        result["disks"] = crypt.get("disks", [])
        result["aead_workers"] = crypt.get("aead_workers", [])
        result["aead_restarts"] = crypt.get("aead_restarts", 0)
        guests = {g["name"]: g for g in crypt.get("guests", [])}
        result["guests"] = [
            {"name": g.name, "label": g.label, "socket": str(c.guest_socket(g.name)),
             **{k: v for k, v in guests.get(g.name, {}).items() if k != "name"},
             "connections": guests.get(g.name, {}).get("connections", [])}
            for g in c.guests.values()
        ]
        result["integrity_events"] = self.integrity_events[-20:]
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
        closed = 0
        if self.crypt_channel is not None:
            answer, _ = await self.crypt_channel.request({"op": "policy_changed"})
            closed = int(answer.get("closed", 0))
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
        return {"ok": False, "error": f"unknown op {request.get('op')!r}"}


def bootstrap_label(bootstrap: str | None, null: bool) -> str:
    """The label trusted domains run under: the policy's bootstrap label (none: NULL policy)."""
    if null:
        return "__BOOTSTRAP__"
    return bootstrap or "__UNLABELED__"


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
    launcher = Launcher(config, bootstrap)
    launcher.passphrase = passphrase
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
