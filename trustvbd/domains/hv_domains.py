"""What the hypervisor starts each domain with: its user, its environment, the descriptors it
is granted (channels, listening sockets, open backing files) and, for an encryption domain,
what unlocks its own disks.

Like a hypervisor granting devices, the launcher opens what a domain needs and hands the
descriptors over, so no domain needs a path. Run as root, every domain but the access-control
domain runs under a user of its own (domains/sandbox.py); an encryption domain, one per
workload type (domains/placement.py), gets the passphrase or key file through a pipe
(domains/unlock.py) and the launcher forgets it once all have started.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from trustvbd.acm.commands import AUDIT_FILE
from trustvbd.acm.compiled import SUFFIX as COMPILED_SUFFIX
from trustvbd.config import Config
from trustvbd.crypt.tls import TLS_DOMAIN_FILES, TlsSetupError, read_tls_file
from trustvbd.crypt.tokens import new_secret, role_token
from trustvbd.domains import sandbox
from trustvbd.domains.control import ControlChannel, Handler, socket_pair
from trustvbd.domains.hv_store import StoreLink
from trustvbd.domains.listeners import close_listeners, listen_unix
from trustvbd.domains.placement import file_safe
from trustvbd.domains.supervisor import Domain, Launch
from trustvbd.domains.unlock import Unlock, send_unlock
from trustvbd.fileops import make_dirs


def physical_size(disk_size: int, encrypt: bool) -> int:
    if not encrypt:
        return disk_size
    from trustvbd.blocks.crypt_layer import physical_size as crypt_physical

    return crypt_physical(disk_size)


def _grow(fd: int, path: Path, size: int, disk: str) -> None:
    """Extend a backing file to `size` here, where a refusal can be said in one line
    (the driver would only die with a traceback)."""
    if os.fstat(fd).st_size >= size:
        return
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        hint = (" (larger than one file may be here: ext4 stops below 16 TiB, and `ulimit -f`"
                " may set a limit; give the disk a smaller size, or put the driver's dir on XFS)"
                if exc.errno == errno.EFBIG else "")
        raise OSError(f"disk {disk}: cannot make its backing file {path} {size} bytes:"
                      f" {exc.strerror}{hint}") from None


def read_key_file(state_dir: Path) -> bytearray:
    """The state directory's key file (made on first use), read into a buffer that can be zeroed."""
    from trustvbd.blocks.disk_state import load_kek

    load_kek(state_dir)  # creates it when that is safe; checks its mode and length
    buf = bytearray(32)
    with open(state_dir / "kek.key", "rb", buffering=0) as f:
        if f.readinto(buf) != 32:
            raise ValueError(f"key file {state_dir / 'kek.key'} changed while being read")
    return buf


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class DomainGrants:
    """The domains of one `up`, and what each start of each is granted."""

    def __init__(self, config: Config, types: dict[str, list[str]]) -> None:
        self.config, self.types = config, types  # workload type -> its disks
        self.privileged = sandbox.privileged()
        self.uids: set[int] = set()
        self.trusted_gid: int | None = None
        # Directories closed to other users on the way to the interpreter (a Python under /root).
        self.expose = sandbox.closed_on_the_way(sandbox.python_paths()) if self.privileged else ()
        self.export_tokens: dict[str, str] = {}
        self.driver_listeners: dict[str, socket.socket] = {}
        self.acm_listener: socket.socket | None = None
        self.store_listener: socket.socket | None = None
        self.passphrase: bytearray | None = None  # until every encryption domain has it
        # Proves each domain's role to the access-control domain (who may record what).
        self.roles_secret = new_secret()

    def role_hello(self, role: str) -> dict[str, str]:
        return {"role": role, "token": role_token(self.roles_secret, role)}

    def export_token(self, disk: str) -> str:
        """An opaque export name for our own drivers: the NBD handshake must not tell a
        driver which disk it holds (names can be confidential too)."""
        return self.export_tokens.setdefault(disk, "x" + secrets.token_hex(8))

    def compiled_policy(self, suffix: str = "") -> Path:
        """Where the launcher writes the policy it compiled; the domain reads only this."""
        return self.config.state_dir / f"policy{suffix}{COMPILED_SUFFIX}"

    # -- the access-control domain ------------------------------------------------------
    def acm_domain(self, restoring: Callable[[], list[str]] = list) -> Domain:
        """`restoring`: the roles of the encryption domains running when it (re)starts; a
        restarted domain waits for each to restore its Chinese Wall counts (domains/acm.py)."""
        c = self.config
        policy = ["--policy", str(self.compiled_policy())] if c.policy else ["--null"]
        argv = [sys.executable, "-m", "trustvbd.domains.acm", "--supervised", *policy,
                "--audit", str(c.state_dir / AUDIT_FILE)]
        if wait := os.environ.get("TRUSTVBD_ACM_RESTORE_WAIT"):
            argv += ["--restore-wait", wait]

        def launch() -> Launch:
            # Its listening socket is bound here once (a restarted domain serves the same one);
            # only the launcher connects to it, and hands the connections over.
            if self.acm_listener is None:
                self.acm_listener = listen_unix(self.config.acm_socket)
            fds = [os.dup(self.acm_listener.fileno())]
            # A fresh pipe per start (and restart): the roles secret reaches it and nobody else.
            roles, secret_in = os.pipe()
            with os.fdopen(secret_in, "wb") as pipe:  # read at once; far below a pipe's buffer
                pipe.write(self.roles_secret + json.dumps(restoring()).encode())
            fds.append(roles)
            return Launch([*argv, "--listen-fd", str(fds[0]), "--roles-fd", str(roles)],
                          tuple(fds), lambda: _close(fds))

        return Domain("acm", "acm", True, "", launch)

    # -- the store ------------------------------------------------------------------------
    def store_domain(self, link: StoreLink) -> Domain:
        """A user of its own, in the trusted group; it opens no path: its public socket (bound
        here once, root's only), its channels and the directory it saves its tree in
        (STATE/store, its own) are handed over. Restarted like any domain, it goes on with
        the tree it saved."""
        identity = sandbox.AS_LAUNCHER
        if self.privileged:
            uid = sandbox.dynamic_uid(str(self.config.state_dir), "store", "", self.uids)
            self.uids.add(uid)
            identity = sandbox.Identity(uid, uid, groups=(self.crypt_group(),), expose=self.expose)
            link.tree_owner = uid

        def launch() -> Launch:
            if self.store_listener is None:
                self.store_listener = listen_unix(self.config.store_socket)
            extra, fds = link.grant(self.store_listener.fileno())
            return Launch([*link.argv(), *extra], tuple(fds), lambda: _close(fds))

        return Domain("store", "store", True, "", launch, identity=identity)

    # -- drivers ------------------------------------------------------------------------
    def driver_domain(self, name: str, handler: Handler,
                      channels: dict[str, ControlChannel]) -> Domain:
        drv = self.config.drivers[name]
        # Confined once it holds its descriptors: no path of the host at all (confine.py).
        argv = [sys.executable, "-m", "trustvbd.domains.driver", "--supervised", "--confine"]

        def launch() -> Launch:
            extra, fds = self.driver_grant(name)
            ours, theirs = socket_pair()
            if (old := channels.pop(name, None)) is not None:
                old.close()
            channels[name] = channel = ControlChannel(ours, handler, name, untrusted=True)
            channel.start()
            fds.append(theirs.detach())
            return Launch([*argv, *extra, "--control-fd", str(fds[-1])], tuple(fds),
                          lambda: _close(fds))

        # No TRUSTVBD_* settings and no passphrase: a clean environment.
        cpus = self.config.disk_cpus([d.name for d in self.config.disks.values()
                                      if name in d.replicas])
        return Domain(name, "driver", False, drv.label, launch,
                      identity=self.driver_identity(name), env=sandbox.clean_environment(),
                      cpus=cpus)

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
        """Open each backing file and the driver's listening socket here, to hand over."""
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
                    _grow(fds[-1], path, size, disk.name)
                    argv += ["--export-fd", f"{self.export_token(disk.name)}={fds[-1]}:{size}"]
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return argv, fds

    # -- encryption domains ---------------------------------------------------------------
    def crypt_domain(self, wtype: str, handler: Callable[[Domain], Handler],
                     channels: dict[str, ControlChannel], ready: asyncio.Event) -> Domain:
        name = f"crypt-{file_safe(wtype)}"
        identity = sandbox.AS_LAUNCHER
        if self.privileged:
            uid = sandbox.dynamic_uid(str(self.config.state_dir), "crypt", wtype, self.uids)
            self.uids.add(uid)
            identity = sandbox.Identity(uid, uid, groups=(self.crypt_group(),), expose=self.expose)

        def launch() -> Launch:
            """A new control channel, what unlocks its disks (a pipe), its key directories."""
            ready.clear()
            fds: list[int] = []
            try:
                if identity.uid is not None:
                    self.own_key_dirs(wtype, identity.uid)
                    fds.append(os.open(self.config.state_dir,
                                       os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                unlock = self.unlock_for(wtype)
                try:
                    fds.append(send_unlock(unlock))
                finally:
                    unlock.forget()
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            ours, theirs = socket_pair()
            if (old := channels.pop(name, None)) is not None:
                old.close()
            channels[name] = channel = ControlChannel(ours, handler(domain), name)
            channel.start()
            argv = [sys.executable, "-m", "trustvbd.domains.crypt", "--control-fd",
                    str(theirs.fileno()), "--unlock-fd", str(fds[-1])]
            if identity.uid is not None:
                # The state directory's parents may be closed to this user: it starts from the fd.
                argv += ["--state-dir-fd", str(fds[0])]
            fds.append(theirs.detach())
            return Launch(argv, tuple(fds), lambda: _close(fds))

        domain = Domain(name, "crypt", True, "", launch, identity=identity, wtype=wtype,
                        cpus=self.config.disk_cpus(self.types[wtype]))
        return domain

    def crypt_group(self) -> int:
        """The group every trusted domain shares: it may pass through the state directory.
        No driver's uid or gid is ever this number."""
        if self.trusted_gid is None:
            self.trusted_gid = sandbox.dynamic_uid(str(self.config.state_dir), "trusted", "",
                                                   self.uids)
            self.uids.add(self.trusted_gid)
        return self.trusted_gid

    def own_key_dirs(self, wtype: str, uid: int) -> None:
        """Its disks' directories (keys, anchor, intent log) belong to its user, 0700."""
        for name in self.types[wtype]:
            if self.config.disks[name].encrypt:
                path = self.config.state_dir / "disks" / name
                make_dirs(path)  # synced: the keys and anchor in it must outlive a power cut
                sandbox.own_tree(str(path), uid, uid)

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

    def tls_copy(self, domain: Domain) -> Path:
        """The TLS files an encryption domain reads: the configured directory itself, or, when
        it runs under a user of its own, a copy in STATE/tls/TYPE that only it may read."""
        assert self.config.tls_dir is not None
        if domain.identity.uid is None:
            return self.config.tls_dir
        assert domain.wtype is not None
        copy = self.config.state_dir / "tls" / file_safe(domain.wtype)
        copy.mkdir(parents=True, mode=0o700, exist_ok=True)
        for name in sorted(TLS_DOMAIN_FILES):  # never ca-key.pem: it makes any guest's certificate
            try:  # a FIFO in a file's place must not hold the hypervisor in open()
                data = read_tls_file(self.config.tls_dir / name)
            except (FileNotFoundError, TlsSetupError):
                continue  # as before: `up` refused a needed one at start (check_tls_dir)
            fd = os.open(copy / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as out:
                out.write(data)
        sandbox.own_tree(str(copy), domain.identity.uid, domain.identity.uid)
        os.chmod(copy.parent, 0o710)
        os.chown(copy.parent, -1, self.crypt_group())
        return copy

    def close(self) -> None:
        """Close (and unlink) the listening sockets bound for the domains."""
        close_listeners([*self.driver_listeners.values(),
                         *(s for s in (self.acm_listener, self.store_listener) if s is not None)])
