"""The `trustvbd` command."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from trustvbd import __version__
from trustvbd.config import Config, ConfigError, format_size, parse_size
from trustvbd.config_file import load_config
from trustvbd.domains.messages import (
    HvStatus,
    Message,
    MessageError,
    PolicyLoad,
    PolicyLoaded,
    StatusQuery,
    decode,
    refusal,
)

EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
MAX_PASSPHRASE = 4096


def _config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"trustvbd: config error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


class NotRunning(Exception):
    """No `trustvbd up` runs for this config's state directory."""


class ConnectionLost(NotRunning):
    """`trustvbd up` closed the connection before it answered: it died while asked."""


class NoAnswer(Exception):
    """`trustvbd up` runs but did not answer in time. `asked`: the request was sent (so it
    may still be carried out), not refused before it (paused, backlog full)."""

    def __init__(self, message: str, asked: bool = False) -> None:
        super().__init__(message)
        self.asked = asked


def control_request(config: Config, request: Message, timeout: float = 30,
                    fds: list[int] | None = None) -> Message:
    """Ask the running `trustvbd up` (its launcher) something; exit 3 if none runs."""
    try:
        return ask_running(config, request, timeout, fds)
    except NotRunning as exc:
        print(f"trustvbd: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_NOT_RUNNING) from None
    except NoAnswer as exc:
        raise SystemExit(f"trustvbd: {exc}") from None


def _not_paused(config: Config) -> None:
    """NoAnswer at once if the running `up` is stopped by a signal: it would answer nothing."""
    from trustvbd.domains.supervisor import paused, signal_stopped
    from trustvbd.state_lock import holder

    pid = holder(config.state_dir)
    if pid is not None and signal_stopped(pid):
        raise NoAnswer(f"`trustvbd up` (pid {pid}, state directory {config.state_dir}) is"
                       f" {paused(pid)}")


def ask_running(config: Config, request: Message, timeout: float = 30,
                fds: list[int] | None = None, *, paused_fails: bool = True) -> Message:
    """Ask the running `trustvbd up` something; raise NotRunning if none runs, NoAnswer
    if it did not answer within `timeout` seconds.

    One request per connection; its id comes back with the reply all the same, as on
    every request/reply channel (trustvbd/replies.py). `fds` go with the request.
    """
    if paused_fails:  # (a poll in a loop waits through a pause, as long as `timeout`)
        _not_paused(config)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    rid = secrets.randbelow(1 << 62) + 1
    asked = False
    try:
        sock.connect(str(config.control_socket))
        socket.send_fds(sock, [json.dumps({**request.encode(), "id": rid}).encode() + b"\n"],
                        fds or [])
        asked = True
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"not running for state directory {config.state_dir}"
                         f" (start it with: trustvbd up -c {config.path})") from None
    except (ConnectionResetError, BrokenPipeError):
        data = b""  # it died (or closed the socket) with our request unanswered
    except BlockingIOError:  # connect: the socket's backlog is full, nobody takes from it
        raise NoAnswer(f"`trustvbd up` (state directory {config.state_dir}) takes no more"
                       f" connections on {config.control_socket} (its backlog is full): it is"
                       " stuck, or something else opens connections to it in a loop (its log"
                       " says which); try again") from None
    except TimeoutError:
        try:
            _not_paused(config)  # paused meanwhile
        except NoAnswer as exc:
            exc.asked = asked
            raise
        raise NoAnswer(f"`trustvbd up` (state directory {config.state_dir}) did not answer"
                       f" within {timeout:g} s: it runs but is stuck or overloaded (its log"
                       " says why; stopping it and starting it again is safe)", asked) from None
    finally:
        sock.close()
    if not data:
        raise ConnectionLost(f"`trustvbd up` (state directory {config.state_dir}) closed the"
                             " connection without answering: it stopped or was killed meanwhile"
                             f" (start it with: trustvbd up -c {config.path})")
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict) or reply.get("reply_to") != rid:
            raise MessageError(f"it does not answer this request: {str(reply)[:200]}")
        return decode(reply)
    except ValueError as exc:
        raise SystemExit(f"trustvbd: bad reply from the launcher ({config.control_socket}):"
                         f" {exc}") from None


# -- up / driver / status ------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from trustvbd.domains.common import run, setup_logging
    from trustvbd.domains.up import run_up

    config = _config(args.config)
    setup_logging("hv", forks=True)
    try:
        return run(run_up(config))
    except ConfigError as exc:
        print(f"trustvbd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_driver(args: argparse.Namespace) -> int:
    from trustvbd.domains.driver import run_standalone

    try:
        size = parse_size(args.size)
    except ValueError as exc:
        print(f"trustvbd driver: --size: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if size <= 0 or size % 512:
        print(f"trustvbd driver: --size {args.size} is {size} bytes: give a positive multiple of"
              " 512 bytes (a block device's sector), e.g. 1GiB", file=sys.stderr)
        return EXIT_USAGE
    if args.listen is not None and (problem := listen_problem(args.listen)):
        print(f"trustvbd driver: --listen {args.listen!r}: {problem}; write HOST:PORT,"
              " e.g. 127.0.0.1:10809 or [::1]:0 (port 0: any free port)", file=sys.stderr)
        return EXIT_USAGE
    return run_standalone(args.file, size, args.socket, args.listen)


def listen_problem(address: str) -> str | None:
    """What is wrong with a HOST:PORT to listen on, or None."""
    _, colon, port = address.rpartition(":")
    if not colon:
        return "no :PORT"
    if not port.isascii() or not port.isdigit():
        return f"the port {port!r} is not a number"
    if int(port) > 65535:
        return f"the port {port} is above 65535"
    return None


def cmd_store(args: argparse.Namespace) -> int:
    if args.store_command == "path":
        print(_config(args.config).store_socket)
        return 0
    from trustvbd.domains.store import run

    return run(args)


def print_status(status: dict[str, Any]) -> None:
    policy = status.get("policy") or "none (NULL policy: everything allowed)"
    print(f"trustvbd running: pid {status['pid']}, state {status['state_dir']}, policy {policy}")
    if status.get("policy_loading"):
        load = status["policy_loading"]
        print(f"policy load in progress: {load['path']} (asked {load['since']}, {load['seconds']:.0f}"
              " s ago; a new load is refused until it ends)")
    print("domains:")
    width = max([12, *(len(d["name"]) for d in status["domains"])])  # crypt-TYPE names run long
    for d in status["domains"]:
        trust = "trusted" if d["trusted"] else "untrusted"
        label = f" label {d['label']}" if d["label"] else ""
        restarts = f" restarts {d['restarts']}" if d.get("restarts") else ""
        if d.get("last_exit"):
            restarts += f" (last: {d['last_exit']})"
        if d.get("next_retry") is not None:
            restarts += f", next try in {d['next_retry']} s"
        if d.get("cpus"):
            restarts += f", on CPUs {','.join(map(str, d['cpus']))}"
        if len(d.get("pids") or []) > 1:  # a driver's worker processes
            restarts += f", child pids {' '.join(str(p) for p in d['pids'][1:])}"
        print(f"  {d['name']:<{width}} {d['kind']:<7} pid {d['pid']!s:<8} {trust:<9}{label}"
              f" {d['state']}{restarts}")
    if status.get("aead_threads"):
        print(f"  AES-GCM of big requests: {status['aead_threads']} thread(s) inside the encryption"
              " domains")
    print("disks:")
    for disk in status["disks"]:
        epoch = f" epoch {disk['epoch']}" if "epoch" in disk else ""
        mode = "encrypted" if disk["encrypt"] else "PLAIN (not encrypted)"
        held_by = f" in {disk['domain']}" if disk.get("domain") else ""
        events = disk.get("integrity_events")
        events_text = f" integrity-events {events}" if events is not None else ""
        print(f"  {disk['name']:<12} {format_size(disk['size']):<8} label {disk['label']} {mode}"
              f" {disk['state']}{epoch}{events_text}{held_by}")
        for r in disk["replicas"]:
            print(f"    replica {r['name']}: {describe_replica(r)}")
        if disk.get("scrub"):
            print(f"    last scrub: {describe_scrub(disk['scrub'])}")
    print("guests:")
    for g in status["guests"]:
        conns = ", ".join(c["export"] or "-" for c in g["connections"]) or "none"
        held = (f" memory {g['memory'] / 2**20:.1f} MiB (peak {g['memory_peak'] / 2**20:.1f})"
                if g.get("memory") is not None else "")
        print(f"  {g['name']:<12} label {g['label']} socket {g['socket']} connections: {conns}"
              f"{held}")
        for wtype, path in g.get("sockets", {}).items():  # one per workload type it may use
            if path != g["socket"]:
                print(f"    socket for workload type {wtype}: {path}")
    attachments = status.get("attachments") or []
    if attachments:
        from trustvbd.xenstore.xenbus import parse_state

        print("attachments (XenBus states in the store, frontend/backend):")
        for a in attachments:
            fe, be = (parse_state(str(a[k]).encode()) for k in ("frontend_state", "backend_state"))
            print(f"  {a['kind']:<8} {a['frontend']} -> {a['backend']} disk {a['disk']}:"
                  f" {int(fe)} {fe.title} / {int(be)} {be.title}  ({a['frontend_dir']})")


def describe_replica(r: dict[str, Any]) -> str:
    parts = [r["state"], f"reconnects {r['reconnects']}"]
    if r.get("space") == "full":
        parts.append("OUT OF SPACE: its writes fail with ENOSPC")
    if r.get("repaired_blocks"):
        parts.append(f"repaired {r['repaired_blocks']} blocks")
    if r.get("dirty_blocks"):
        parts.append(f"{r['dirty_blocks']} blocks behind")
    if r.get("lag_cutoffs"):
        parts.append(f"cut off {r['lag_cutoffs']} time(s) for lagging")
    resync = r.get("resync")
    if resync and r["state"] == "resyncing":
        parts.append(f"resync {resync['done']}/{resync['total']} at {resync['blocks_per_s']} blocks/s")
        if resync.get("waiting_for_source"):
            parts.append(f"resync waits for a replica to copy from: {resync['waiting_for_source']}")
    text = ", ".join(parts)
    if not r.get("last_error"):
        return text
    # A current replica's error is history (it was brought back since): say so.
    past = "last error: " if r["state"] == "current" else ""
    return text + f" ({past}{r['last_error']})"


def describe_scrub(scrub: dict[str, Any]) -> str:
    if scrub.get("running"):
        return f"running, {scrub.get('done', 0)}/{scrub.get('total')} blocks"
    if scrub.get("error"):
        return f"failed: {scrub['error']}"
    result = scrub.get("result", {})
    bad = sum(r["bad"] for r in result.values())
    repaired = sum(r["repaired"] for r in result.values())
    skipped = [name for name, r in result.items() if r.get("not_scrubbed")]
    return (f"{bad} bad, {repaired} repaired, {scrub.get('seconds')} s"
            + (f"; not scrubbed (not current): {', '.join(skipped)}" if skipped else ""))


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args.config)
    try:
        reply = ask_running(config, StatusQuery())
    except NotRunning as exc:
        if args.json:  # scripts get JSON whatever the answer
            print(json.dumps({"running": False, "state_dir": str(config.state_dir),
                              "error": str(exc)}, indent=2))
        else:
            print(f"trustvbd: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except NoAnswer as exc:
        if args.json:
            print(json.dumps({"running": True, "answering": False,
                              "state_dir": str(config.state_dir), "error": str(exc)}, indent=2))
        print(f"trustvbd: {exc}", file=sys.stderr)
        return 1
    if not isinstance(reply, HvStatus):
        print(f"trustvbd status: {refusal(reply, 'unexpected reply')}", file=sys.stderr)
        return 1
    status = {**reply.plain(), "running": True}
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0


def cmd_policy_load(config_path: str, policy_file: str, timeout: float = 30) -> int:
    from trustvbd.acm import PolicyError, load_policy

    config = _config(config_path)
    path = Path(policy_file).resolve()
    try:
        load_policy(path)  # a clear file:line message here, before bothering the running system
    except (PolicyError, OSError) as exc:
        print(f"trustvbd policy load: {exc}", file=sys.stderr)
        return 1
    try:
        reply = ask_running(config, PolicyLoad(str(path)), timeout)
    except NotRunning as exc:
        print(f"trustvbd: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except NoAnswer as exc:
        if not exc.asked:
            print(f"trustvbd: {exc}", file=sys.stderr)
            return 1
        # Asked, so it goes on in the launcher (hv_policy.load) and holds off any other load.
        print(f"trustvbd policy load: no answer within {timeout:g} s, but the load of {path}"
              " goes on in the launcher (it, or a domain it asks, is paused or overloaded);"
              f" `trustvbd status -c {config.path}` shows the policy in force, and this load"
              " while it is in progress; a new load is refused until it ends", file=sys.stderr)
        return 1
    if not isinstance(reply, PolicyLoaded):
        print(f"trustvbd policy load: {refusal(reply, 'unexpected reply')}", file=sys.stderr)
        return 1
    print(f"policy {reply.name} loaded; {reply.closed} connection(s) the new policy forbids"
          f" were closed; {reply.torn_down} pairing(s) in the store torn down")
    for note in reply.notes:
        print(f"note: {note}")
    return 0


def read_passphrase(source: str | None) -> bytearray:
    """The passphrase, as bytes that can be zeroed: from a file (`-`: standard input; its
    first line), else TRUSTVBD_PASSPHRASE (as `up` and `rekey` read it), else asked
    without echo on a terminal, else standard input's first line."""
    import getpass

    env = os.environ.get("TRUSTVBD_PASSPHRASE")
    if source is None and env:
        if len(env.encode()) > MAX_PASSPHRASE:
            raise ValueError(f"TRUSTVBD_PASSPHRASE is longer than {MAX_PASSPHRASE} bytes")
        return bytearray(env.encode())
    if source is None and sys.stdin is not None and sys.stdin.isatty():
        return bytearray(getpass.getpass("Passphrase: ").encode())
    if source is None or source == "-":
        raw = bytearray(sys.stdin.buffer.readline(MAX_PASSPHRASE + 2))
    else:
        with open(source, "rb", buffering=0) as f:
            raw = bytearray(f.read(MAX_PASSPHRASE + 2))
    line = bytearray(raw.split(b"\n", 1)[0].rstrip(b"\r"))
    raw[:] = bytes(len(raw))
    if len(line) > MAX_PASSPHRASE:
        line[:] = bytes(len(line))
        raise ValueError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes")
    return line


def cmd_unlock(args: argparse.Namespace) -> int:
    """Hand the running system the passphrase of its locked disks (a restarted encryption
    domain's): as a pipe, so it is in no message, argument or environment."""
    from trustvbd.domains.messages import Unlocked, UnlockQuery
    from trustvbd.domains.unlock import Unlock, send_unlock

    config = _config(args.config)
    if not config.control_socket.exists():  # before asking for a passphrase nobody can use
        control_request(config, StatusQuery())
    try:
        passphrase = read_passphrase(args.passphrase_file)
    except (OSError, ValueError, EOFError) as exc:
        print(f"trustvbd unlock: cannot read the passphrase: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    if not passphrase:
        where = "the file" if args.passphrase_file not in (None, "-") else "standard input"
        print(f"trustvbd unlock: no passphrase given ({where} had an empty first line); give it"
              " with --passphrase-file FILE, TRUSTVBD_PASSPHRASE or on a terminal; nothing was"
              " changed", file=sys.stderr)
        return EXIT_USAGE
    secret = Unlock(passphrase=passphrase)
    try:
        fd = send_unlock(secret)
    finally:
        secret.forget()  # zeroes `passphrase` (send_unlock zeroes only its own encoding)
    try:
        reply = control_request(config, UnlockQuery(list(args.disks)), timeout=600, fds=[fd])
    finally:
        os.close(fd)
    if not isinstance(reply, Unlocked):
        print(f"trustvbd unlock: {refusal(reply, 'unexpected reply')}", file=sys.stderr)
        return 1
    for disk in reply.unlocked:
        print(f"disk {disk!r} unlocked: serving; its guests may connect again")
    for disk, why in reply.failed.items():
        print(f"trustvbd unlock: disk {disk!r} was unlocked but cannot be served: {why}",
              file=sys.stderr)
    for disk in reply.wrong:
        print(f"trustvbd unlock: wrong passphrase for disk {disk!r}: it stays locked, nothing"
              " was changed (the attempt is in the audit log)", file=sys.stderr)
    for disk, why in reply.unanswered.items():
        print(f"trustvbd unlock: disk {disk!r}: {why}", file=sys.stderr)
    return 0 if not (reply.wrong or reply.failed or reply.unanswered) else 1


# -- parser --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trustvbd",
        description="Virtual disks over untrusted storage drivers, served over NBD.",
    )
    parser.add_argument("--version", action="version", version=f"trustvbd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="start the system described by a config file (foreground)",
                        description="Start every domain of the config; print one line per guest"
                        " and disk it may use, then 'ready'. SIGINT/SIGTERM stops it cleanly.")
    up.add_argument("-c", "--config", required=True, help="config file (TOML)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="show domains, disks, replicas and connected guests",
                            description="Ask the running `trustvbd up` for its state.")
    status.add_argument("-c", "--config", required=True, help="config file (TOML)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    unlock = sub.add_parser(
        "unlock", help="unlock passphrase-protected disks of a restarted encryption domain",
        description="A restarted encryption domain starts with its passphrase-protected disks"
        " locked (the launcher keeps no secret): give the passphrase here. It is read from"
        " --passphrase-file, else TRUSTVBD_PASSPHRASE, else asked without echo on a terminal,"
        " else read from standard input's first line,"
        " and reaches only the encryption domains holding those disks. A wrong passphrase"
        " changes nothing; every attempt is audited.")
    unlock.add_argument("-c", "--config", required=True, help="config file (TOML)")
    unlock.add_argument("disks", nargs="*", metavar="DISK",
                        help="disks to unlock (default: every locked disk)")
    unlock.add_argument("--passphrase-file", metavar="FILE",
                        help="read the passphrase from FILE's first line (-: standard input)")
    unlock.set_defaults(func=cmd_unlock)

    driver = sub.add_parser(
        "driver", help="run an untrusted driver domain alone: a plain NBD server over a sparse file",
        description="Serve one sparse file as one NBD export (named after the file, also the"
        " default export). Prints the export's URI, then 'ready'.")
    driver.add_argument("--file", required=True, help="backing file (created sparse if missing)")
    driver.add_argument("--size", required=True,
                        help="export size, a multiple of 512 bytes, e.g. 1GiB (suffixes as in the config)")
    where = driver.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="Unix socket path to listen on")
    where.add_argument("--listen", metavar="HOST:PORT", help="TCP address to listen on (port 0: any)")
    driver.set_defaults(func=cmd_driver)

    store = sub.add_parser("store", help="the XenStore-protocol store: its socket, or run one alone",
                           description="The store speaks the XenStore wire protocol: point"
                           " xenstore-utils at it with XENSTORED_PATH=$(trustvbd store path -c CONFIG).")
    store_sub = store.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    store_path = store_sub.add_parser("path", help="print the running store's socket path")
    store_path.add_argument("-c", "--config", required=True, help="config file (TOML)")
    serve = store_sub.add_parser("serve", help="run a store alone (foreground), e.g. for tests",
                                 description="Serve an empty store on SOCKET; root and this user"
                                 " are domain 0. Prints 'ready'.")
    serve.add_argument("--socket", required=True, help="Unix socket path to listen on")
    serve.add_argument("--acm-socket", help="ask this access-control domain before pairing"
                       " frontend and backend directories (default: allow, with a warning)")
    serve.set_defaults(control_fd=None, listen_fd=None, tree_dir_fd=None, ready_fd=None,
                       supervised=False)
    store.set_defaults(func=cmd_store)

    from trustvbd.acm.commands import register as register_policy

    register_policy(sub, load_policy_into_running=cmd_policy_load)
    from trustvbd.crypt_commands import register as register_crypt

    register_crypt(sub)
    from trustvbd.tls_commands import register as register_tls

    register_tls(sub)
    from trustvbd.scrub_command import register as register_scrub

    register_scrub(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`trustvbd audit | head`): stop quietly, as `cat` does.
        # Point stdout at /dev/null so the flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # the status of a process ended by SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(main())

