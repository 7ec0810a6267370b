"""`trustvbd up` from the command line: checks, the state lock, the passphrase, then the
hypervisor until a signal or a fatal exit."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import signal
import sys

from trustvbd.acm import PolicyError, load_policy
from trustvbd.acm.commands import write_compiled
from trustvbd.config import Config
from trustvbd.config_file import check_paths
from trustvbd.crypt.tls import TlsSetupError, check_tls_dir
from trustvbd.domains.hv import Launcher
from trustvbd.domains.hv_control import serve_control
from trustvbd.domains.hv_policy import bootstrap_label
from trustvbd.domains.supervisor import StartError
from trustvbd.domains.unlock import erase_from_environment
from trustvbd.nbd.uri import parse_uri
from trustvbd.state_dir import UnsafePath, secure_state_dir
from trustvbd.state_lock import StateLock, StateLocked, StateLockUnwritable

log = logging.getLogger("trustvbd.hv")


class StoppedEarly(Exception):
    """A signal (or a dying domain) ended `up` before it was ready; the message is out."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def passphrase_for_up(config: Config) -> str | None:
    """TRUSTVBD_PASSPHRASE, else asked once on the terminal if an existing disk needs one.

    Without a terminal, a disk that needs a passphrase stops `up` before anything starts.
    """
    env = os.environ.get("TRUSTVBD_PASSPHRASE")
    if env == "":  # an empty one protects nothing, and was taken for a wrong one
        raise StartError("TRUSTVBD_PASSPHRASE is set but empty: set it to the disks' passphrase,"
                         " or unset it (new disks then get the key file, and a disk that needs a"
                         " passphrase is asked for on a terminal)")
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


def warn_about(config: Config) -> None:
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
    except StateLockUnwritable as exc:  # full or read-only: one line, not a traceback
        print(f"trustvbd up: {exc} and start again", file=sys.stderr)
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
        launcher.grants.passphrase, launcher.had_passphrase = bytearray(passphrase.encode()), True
    del passphrase
    erase_from_environment("TRUSTVBD_PASSPHRASE")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, launcher.done.set)
    control = None
    code = 0
    try:
        if policy is not None:  # the access-control domain loads only the compiled form
            write_compiled(policy, launcher.compiled_policy())
        warn_about(config)
        starting = loop.create_task(launcher.start())
        stop_asked = loop.create_task(launcher.done.wait())
        await asyncio.wait([starting, stop_asked], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # SIGINT/SIGTERM (or a domain died) before everything ran
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            print(f"trustvbd up: {launcher.fatal or 'stopped during start-up'}", file=sys.stderr)
            raise StoppedEarly(1)
        stop_asked.cancel()
        lines = starting.result()
        control = await serve_control(config.control_socket, launcher)
        for line in lines:
            print(line, flush=True)
        print("ready", flush=True)
        await launcher.done.wait()
        if launcher.fatal:
            print(f"trustvbd up: {launcher.fatal}", file=sys.stderr)
            code = 1
    except StoppedEarly as early:
        code = early.code
    except (TimeoutError, StartError, OSError) as exc:
        message = str(exc) or ("timed out waiting for a domain to start; a large disk may need "
                               "longer: set TRUSTVBD_START_TIMEOUT=SECONDS")
        print(f"trustvbd up: {message}", file=sys.stderr)
        code = 1
    finally:
        if control is not None:
            control.close()
        await launcher.stop()
        await launcher.acm.close()
        lock.release()
    return code
