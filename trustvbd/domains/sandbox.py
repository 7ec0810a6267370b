"""The walls the operating system keeps around a domain process.

Run as root (the normal case for a storage service), the launcher starts every
untrusted driver domain under its own unprivileged uid and gid, with no
supplementary groups, `no_new_privs`, a clean environment and, since it serves
local files, its own empty network namespace. Each encryption domain runs under
the uid of its workload type, which owns that type's key directories (0700) and
nothing else. The drop happens in the child between fork and exec, so the new
program never runs with the launcher's privileges.

By default a domain's uid is fixed per (state directory, role, name) and picked
the way systemd's DynamicUser picks one: a hash into a range no account uses
(DYNAMIC_FIRST..DYNAMIC_LAST, inside the range systemd documents as unused), so
no account is created. A driver may name an existing account instead
(`user = "..."` in its [[driver]] table).

A domain's user must still reach the Python interpreter and trustvbd itself. Where
a directory on that way is closed to other users (a Python under /root, mode
0700), the domain gets its own mount namespace in which that directory is an
empty tmpfs holding read-only bind mounts of just the entries on the way: it
sees the interpreter and nothing else that was behind the closed directory.

Run as another user, nothing can be dropped: every domain runs as that user and
the launcher warns once that isolation is weaker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import pwd
import stat
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# 0x7C000000..0x7C00FFFF: systemd's UIDS-GIDS.md lists 1879048192..2147483647 as unused.
DYNAMIC_FIRST = 0x7C000000
DYNAMIC_LAST = 0x7C00FFFF
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"

_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_SLAVE = (
    1, 2, 4, 32, 4096, 16384, 1 << 19)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

WEAK_ISOLATION_WARNING = (
    "running as uid {uid}, not root: every domain runs as this same user, so the operating"
    " system does not keep them apart (a driver domain could read keys, the anchor and the"
    " audit log, and connect to every socket); isolation is weaker. Run `trustvbd up` as root"
    " for per-domain users, no_new_privs and network namespaces")


class SandboxError(Exception):
    """A domain cannot be confined as asked: what, and what to do."""


@dataclass(frozen=True)
class Identity:
    """Who a domain runs as. `uid is None`: as the launcher itself (not root)."""

    uid: int | None
    gid: int | None
    new_netns: bool = False
    groups: tuple[int, ...] = ()  # supplementary groups (none by default)
    # closed directory -> the entries below it this domain must reach (see closed_on_the_way)
    expose: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def describe(self) -> str:
        if self.uid is None:
            return "the launcher's own user"
        return f"uid {self.uid} gid {self.gid}" + (", own network namespace" if self.new_netns else "")


AS_LAUNCHER = Identity(None, None)  # not root: every domain runs as the launcher's user


def privileged() -> bool:
    """Can the launcher give domains their own users? Only as root."""
    return os.geteuid() == 0


def dynamic_uid(state_dir: str, role: str, name: str, taken: Iterable[int] = ()) -> int:
    """A fixed, unused uid for (state directory, role, name): the same on every start.

    Probing from a hash skips uids that belong to an account or to another domain of
    this system (`taken`), as systemd's DynamicUser does.
    """
    span = DYNAMIC_LAST - DYNAMIC_FIRST + 1
    seed = hashlib.sha256(f"{os.path.realpath(state_dir)}\0{role}\0{name}".encode()).digest()
    start = int.from_bytes(seed[:4], "big") % span
    avoid = set(taken)
    for step in range(span):
        uid = DYNAMIC_FIRST + (start + step) % span
        if uid in avoid:
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise SandboxError(f"no unused uid left in {DYNAMIC_FIRST}..{DYNAMIC_LAST}")


def named_user(user: str, where: str) -> tuple[int, int]:
    """The uid and primary gid of an existing account; refuses root, which would be no wall."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(f"{where}: user {user!r} does not exist; create it, or remove `user`"
                           " to get a dynamic uid") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SandboxError(f"{where}: user {user!r} is root or in group root; an untrusted"
                           " domain needs an unprivileged user")
    return entry.pw_uid, entry.pw_gid


def clean_environment(keep: Iterable[str] = ()) -> dict[str, str]:
    """A minimal environment: PATH, a UTF-8 locale and only the names in `keep`."""
    env = {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8"}
    for name in keep:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def without_secrets(env: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment minus every passphrase (what trusted domains inherit)."""
    source = dict(os.environ if env is None else env)
    return {k: v for k, v in source.items() if "PASSPHRASE" not in k}


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def no_new_privs() -> None:
    """Neither this process nor anything it executes can gain privileges (setuid bits, caps)."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def closed_on_the_way(paths: Iterable[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Directories other users cannot pass on the way to `paths`, each with the entries needed."""
    need: dict[str, set[str]] = {}
    for path in paths:
        parts = os.path.realpath(path).split("/")[1:]
        here = "/"
        for part in parts:
            if not part:
                continue
            try:
                mode = os.stat(here).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH:
                need.setdefault(here, set()).add(part)
            here = os.path.join(here, part)
    return tuple((d, tuple(sorted(need[d]))) for d in sorted(need, key=len))


def python_paths() -> list[str]:
    """What a domain process needs to start: the interpreter, its library, trustvbd."""
    return [sys.executable, os.path.realpath(sys.executable), sys.base_prefix, sys.prefix,
            *(p for p in sys.path if p and os.path.isdir(p))]


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None) -> None:
    def enc(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


def _expose(closed: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
    """In a mount namespace of our own: each closed directory becomes an empty tmpfs holding
    read-only bind mounts of just the entries on the way."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Slave, not private: nothing mounted here leaks back to the host, and the host's unmounts
    # reach the copies of its mounts this namespace took. A private copy kept every mount that
    # existed when the domain started (a guest's FUSE filesystem: its daemon then never exits
    # after `fusermount -u`) alive for as long as the domain ran.
    _mount(None, "/", None, _MS_REC | _MS_SLAVE, None)
    for directory, entries in closed:
        held = {e: os.open(os.path.join(directory, e), os.O_PATH | os.O_CLOEXEC) for e in entries}
        try:
            _mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
            for entry, fd in held.items():
                target = os.path.join(directory, entry)
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.mkdir(target, 0o755)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC, None)
                _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)
        finally:
            for fd in held.values():
                os.close(fd)


def enter(identity: Identity) -> None:
    """Confine the calling process: namespaces, groups, gid, uid, no_new_privs.

    Runs in the child between fork and exec (subprocess's preexec_fn); the order
    matters: namespaces and mounts need root, so they come before the uid drop.
    """
    if identity.new_netns:
        _check(_libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    if identity.expose:
        _expose(identity.expose)
    if identity.uid is not None and identity.gid is not None:
        os.setgroups(list(identity.groups))
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    no_new_privs()


def preexec(identity: Identity, cpus: frozenset[int] | None = None) -> Callable[[], None]:
    """In the child before exec: its CPUs (inherited by every thread and worker it makes),
    then its identity."""
    def run() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        enter(identity)
    return run


def own_tree(path: str, uid: int, gid: int) -> None:
    """Give a directory tree to one domain's user: the directory 0700, files 0600, no symlinks."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
        for entry in os.scandir(fd):
            if entry.is_symlink():
                raise SandboxError(f"{path}/{entry.name} is a symbolic link; trusted state"
                                   " holds none: remove it")
            if entry.is_dir():
                own_tree(os.path.join(path, entry.name), uid, gid)
            else:
                os.chown(entry.name, uid, gid, dir_fd=fd, follow_symlinks=False)
                os.chmod(entry.name, 0o600, dir_fd=fd)  # not a link: checked above
    finally:
        os.close(fd)
