"""Confining a running domain from the host filesystem: Landlock, then a seccomp filter.

The launcher's walls (domains/sandbox.py: a user of its own, no_new_privs, namespaces)
still leave a driver every world-readable file of the host: /etc, other users' public
files, the interpreter's tree. A driver needs none of them once it holds its descriptors
(the backing files and its listening socket, handed over by the launcher) and has imported
its code. So it confines itself, after that and before it serves:

- Landlock (Linux 5.13+, unprivileged, kept across fork and exec): a ruleset that handles
  every filesystem access right this kernel knows and allows none, so no path can be
  opened, listed, created, executed or truncated any more; descriptors opened before keep
  working. Where the kernel has them, also no TCP bind or connect (ABI 4) and no abstract
  Unix sockets or signals outside the domain (ABI 6).
- A seccomp filter (x86-64 only) that answers EPERM to the system calls a block server
  never makes and an attacker would want: execve, ptrace, mount and namespace calls,
  kernel keyrings, bpf, module loading, io_uring. A denylist, not an allowlist: Python's
  and uvloop's needs change between versions; these do not.

No root is needed for either (no_new_privs, which every domain has, is what the kernel
asks for), so a driver is confined also when `up` runs as another user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_RESTRICT_SELF = 444, 446  # same on every arch
_LANDLOCK_CREATE_RULESET_VERSION = 1
# Filesystem rights known to each Landlock ABI version (linux/landlock.h).
_FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1, 2
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2

_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
# x86-64 numbers: what a block server never calls.
DENIED_X86_64 = {
    "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "bpf": 321, "keyctl": 250, "add_key": 248,
    "request_key": 249, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "kexec_load": 246, "kexec_file_load": 320, "perf_event_open": 298, "userfaultfd": 323,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163, "quotactl": 179,
    "iopl": 172, "ioperm": 173,
}


class ConfineError(Exception):
    """This kernel cannot confine a domain as asked; the message says what is missing."""


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none or it is turned off."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(abi))


def _fail(what: str) -> ConfineError:
    err = ctypes.get_errno()
    return ConfineError(f"{what}: {os.strerror(err)} (errno {err})")


def deny_filesystem() -> int:
    """Landlock: from now on no path at all (and what else this kernel can take). Returns
    the ABI version used; ConfineError when the kernel has no Landlock."""
    abi = landlock_abi()
    if abi < 1:
        raise ConfineError("this kernel has no Landlock (Linux 5.13+ with lsm=landlock)")
    fs = _FS_RIGHTS[max(v for v in _FS_RIGHTS if v <= abi)]
    if abi >= 6:
        attr = struct.pack("=QQQ", fs, _NET_BIND_TCP | _NET_CONNECT_TCP,
                           _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs, _NET_BIND_TCP | _NET_CONNECT_TCP)
    else:
        attr = struct.pack("=Q", fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = int(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)),
                                ctypes.c_uint32(0)))
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:  # no rule added: nothing under any path is allowed
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
            raise _fail("landlock_restrict_self (needs no_new_privs)")
    finally:
        os.close(ruleset)
    return abi


def _filter(denied: list[int]) -> bytes:
    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    prog = [op(_LD_W_ABS, 4),  # seccomp_data.arch
            op(_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0), op(_RET_K, _RET_KILL_PROCESS),
            op(_LD_W_ABS, 0),  # seccomp_data.nr
            op(_JGE_K, _X32_SYSCALL_BIT, len(denied) + 1, 0)]  # x32 calls: denied as well
    for i, nr in enumerate(denied):
        prog.append(op(_JEQ_K, nr, len(denied) - i, 0))
    prog += [op(_RET_K, _RET_ALLOW), op(_RET_K, _RET_ERRNO | errno.EPERM)]
    return b"".join(prog)


def deny_syscalls() -> int:
    """The seccomp denylist; returns how many calls it denies. ConfineError off x86-64."""
    if platform.machine() != "x86_64":
        raise ConfineError(f"the seccomp filter is written for x86-64, not {platform.machine()}")
    denied = sorted(DENIED_X86_64.values())
    code = _filter(denied)
    program = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(program))
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0):
        raise _fail("prctl(PR_SET_SECCOMP)")
    return len(denied)


def confine() -> tuple[list[str], list[str]]:
    """Both walls, each where this kernel allows it: (what was applied, what was not and why)."""
    done, missing = [], []
    try:
        done.append(f"Landlock ABI {deny_filesystem()}: no path can be opened")
    except ConfineError as exc:
        missing.append(f"Landlock: {exc}")
    try:
        done.append(f"seccomp: {deny_syscalls()} system calls answer EPERM")
    except ConfineError as exc:
        missing.append(f"seccomp: {exc}")
    return done, missing
