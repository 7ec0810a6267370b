"""`trustvbd verify`, `trustvbd disk pubkey` and `trustvbd disk rekey`: keys and offline checks.

Each command prints for people and returns an exit code: 0 fine, 1 refused or
problems found, 2 usage, config or I/O error. The public-key text form and the
key commands are described in docs/keys.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import getpass
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from trustvbd.blocks.ranges import describe_blocks
from trustvbd.config import Config, ConfigError
from trustvbd.config_file import load_config
from trustvbd.regular_file import NotRegularFile, read_regular
from trustvbd.state_lock import StateLock, StateLocked, StateLockUnwritable

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

PUBKEY_PREFIX = "trustvbd-ed25519"
PUBLIC_KEY_SIZE = 32


class CommandError(Exception):
    """A message for the user and the exit code to leave with."""

    def __init__(self, message: str, code: int = EXIT_PROBLEMS) -> None:
        super().__init__(message)
        self.code = code


def _fail(prog: str, exc: CommandError) -> int:
    print(f"trustvbd {prog}: {exc}", file=sys.stderr)
    return exc.code


def _config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CommandError(f"config error: {exc}", EXIT_USAGE) from None


# -- public keys: text form ----------------------------------------------------------
def format_public_key(public_key: bytes, comment: str = "") -> str:
    """One line, like an SSH public key: `trustvbd-ed25519 BASE64 [COMMENT]`."""
    line = f"{PUBKEY_PREFIX} {base64.b64encode(public_key).decode()}"
    return f"{line} {comment}" if comment else line


def parse_public_key(data: bytes, where: str) -> bytes:
    """The raw 32-byte key from `disk.pub` (raw) or the text form `disk pubkey` prints.

    Also accepted: one line of 64 hex digits. Blank lines and `#` comments are skipped.
    """
    if len(data) == PUBLIC_KEY_SIZE:
        return data
    hint = (f"{where} is not a trustvbd public key: give the raw 32-byte disk.pub of the"
            f" disk's state directory, or the line `{PUBKEY_PREFIX} BASE64` that"
            " `trustvbd disk pubkey -c CONFIG DISK` prints")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError(f"{hint} (it is {len(data)} bytes of binary)", EXIT_USAGE) from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) != 1:
        raise CommandError(f"{hint} (expected one key line, found {len(lines)})", EXIT_USAGE)
    words = lines[0].split()
    key: bytes | None = None
    if words[0] == PUBKEY_PREFIX and len(words) >= 2:
        try:
            key = base64.b64decode(words[1], validate=True)
        except (binascii.Error, ValueError):
            raise CommandError(f"{hint} (bad base64 after {PUBKEY_PREFIX})", EXIT_USAGE) from None
    elif len(words) == 1 and len(words[0]) == 2 * PUBLIC_KEY_SIZE:
        with contextlib.suppress(ValueError):
            key = bytes.fromhex(words[0])
    if key is None or len(key) != PUBLIC_KEY_SIZE:
        raise CommandError(hint, EXIT_USAGE)
    return key


MAX_PUBLIC_KEY_FILE = 64 * 1024  # a key's text form is a line; more is no key file


def read_public_key_file(path: str) -> bytes:
    """A public key file's bytes (`-`: standard input). Only a regular file, and at most
    MAX_PUBLIC_KEY_FILE bytes: a FIFO held the command in open(), /dev/zero read on until
    memory ran out."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_PUBLIC_KEY_FILE + 1)
        else:
            data = read_regular(path, "a public key", MAX_PUBLIC_KEY_FILE)
    except NotRegularFile:
        raise CommandError(f"public key {path} is not a regular file; give the file"
                           " `trustvbd disk pubkey` wrote", EXIT_USAGE) from None
    except OSError as exc:
        raise CommandError(f"cannot read public key {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    where = "standard input" if path == "-" else path
    if len(data) > MAX_PUBLIC_KEY_FILE:
        raise CommandError(f"public key {where} is longer than {MAX_PUBLIC_KEY_FILE} bytes: no"
                           " key file", EXIT_USAGE)
    return parse_public_key(data, where)


# -- verify --------------------------------------------------------------------------
async def _open_replica(replica: str) -> Any:
    from trustvbd.blockdev import BlockError
    from trustvbd.blocks.file import FileBackend
    from trustvbd.nbd.client import NbdClient
    from trustvbd.nbd.uri import parse_uri

    if "://" in replica:
        try:
            parse_uri(replica)
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        try:
            return await NbdClient.open_uri(replica)
        except BlockError as exc:
            raise CommandError(f"cannot open replica: {exc}", EXIT_USAGE) from None
    try:
        st = os.stat(replica)
    except OSError as exc:
        raise CommandError(f"cannot open replica {replica}: {exc.strerror}", EXIT_USAGE) from None
    if stat.S_ISDIR(st.st_mode):
        raise CommandError(f"replica {replica} is a directory; give the backing file in it"
                           " (a driver's dir holds one DISK.img per disk)", EXIT_USAGE)
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(
            f"replica {replica} is not a regular file; for a block device, serve it read-only"
            f" (qemu-nbd -r -f raw -k SOCK {replica}) and give nbd+unix:///?socket=SOCK",
            EXIT_USAGE)
    try:
        return FileBackend(replica, read_only=True)
    except OSError as exc:
        raise CommandError(f"cannot open replica {replica}: {exc.strerror}", EXIT_USAGE) from None


async def _verify(replica: str, public_key: bytes) -> Any:
    from trustvbd.blockdev import BlockError
    from trustvbd.blocks.crypt_verify import verify_replica

    backend = await _open_replica(replica)
    try:
        return await verify_replica(backend, public_key)
    except BlockError as exc:
        raise CommandError(f"reading replica {replica} failed: {exc}", EXIT_USAGE) from None
    finally:
        with contextlib.suppress(Exception):
            await backend.close()


def print_report(report: Any, replica: str) -> None:
    print(f"replica {replica}")
    print(report)
    # The lists hold the first entries only (bounded for any disk size); the counts are whole.
    if report.bad_pages:
        print(f"  bad leaf pages: {_listed(report.bad_pages, report.bad_page_count)}")
    if report.bad_blocks:
        print(f"  bad blocks ({report.bad_block_count}):"
              f" {_listed(report.bad_blocks, report.bad_block_count)}")
    if report.poisoned_blocks:
        print(f"  blocks marked lost ({report.poisoned_count}):"
              f" {_listed(report.poisoned_blocks, report.poisoned_count)}")


def _listed(items: list[int], count: int) -> str:
    more = count - len(items)
    return describe_blocks(items, limit=None) + (f" and {more} more" if more > 0 else "")


def verify(public_key_file: str, replica: str, as_json: bool = False) -> int:
    try:
        key = read_public_key_file(public_key_file)
        report = asyncio.run(_verify(replica, key))
    except CommandError as exc:
        return _fail("verify", exc)
    if as_json:
        print(json.dumps({"replica": replica, **dataclasses.asdict(report)}, indent=2))
    else:
        print_report(report, replica)
    return 0 if report.ok else EXIT_PROBLEMS


# -- disk pubkey / rekey -------------------------------------------------------------
def _disk_keys(config: Config, disk: str) -> Path:
    """The disk's keys file; CommandError if the disk is unknown or was never started."""
    from trustvbd.blocks.disk_state import DiskState

    try:
        state = DiskState(config.state_dir, disk)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    known = config.disks.get(disk)
    if known is None and not state.keys_path.exists():
        names = ", ".join(config.disks) or "none"
        raise CommandError(f"no disk {disk!r} in {config.path} (its disks: {names})", EXIT_USAGE)
    if known is not None and not known.encrypt:
        raise CommandError(f"disk {disk!r} is not encrypted (encrypt = false in {config.path}):"
                           " it has no keys")
    if not state.keys_path.exists():
        raise CommandError(
            f"disk {disk!r} has no keys yet in {config.state_dir}: it was never started;"
            f" run `trustvbd up -c {config.path}` once to create them")
    return state.keys_path


def _read_keys(keys: Path, disk: str) -> tuple[bytes, int]:
    """(public key, KEK kind) without any secret."""
    from trustvbd.crypt.keys import KeyFileError, read_public

    try:
        _, public_key, kind = read_public(keys.read_bytes(), f"disk {disk!r}")
    except (KeyFileError, OSError) as exc:
        raise CommandError(f"{keys}: {exc}") from None
    return public_key, kind


def pubkey(config_path: str, disk: str, output: str | None = None) -> int:
    from trustvbd.blocks.disk_state import DiskState

    try:
        config = _config(config_path)
        public_key, _ = _read_keys(_disk_keys(config, disk), disk)
        pub = DiskState(config.state_dir, disk).pub_path
        with contextlib.suppress(OSError):
            if pub.read_bytes() != public_key:
                print(f"trustvbd disk pubkey: warning: {pub} differs from the key in the disk's"
                      " keys file; printing the keys file's (it is the one superblocks are"
                      " signed with)", file=sys.stderr)
        line = format_public_key(public_key, disk) + "\n"
        if output is None:
            sys.stdout.write(line)
        else:
            try:
                Path(output).write_text(line)
            except OSError as exc:
                raise CommandError(f"cannot write {output}: {exc.strerror or exc}", EXIT_USAGE) from None
            print(f"public key of disk {disk!r} written to {output}", file=sys.stderr)
    except CommandError as exc:
        return _fail("disk pubkey", exc)
    return 0


def _tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _ask(prompt: str) -> str:
    try:
        return getpass.getpass(prompt)
    except EOFError:
        raise CommandError("no passphrase given") from None


def _old_passphrase(disk: str) -> str:
    env = os.environ.get("TRUSTVBD_PASSPHRASE")
    if env is not None:
        return env
    if not _tty():
        raise CommandError(f"disk {disk!r} is protected by a passphrase: set TRUSTVBD_PASSPHRASE"
                           " to its current passphrase, or run this from a terminal to be asked",
                           EXIT_USAGE)
    return _ask(f"Current passphrase for disk {disk}: ")


def _new_passphrase(disk: str) -> str:
    env = os.environ.get("TRUSTVBD_NEW_PASSPHRASE")
    if env is not None:
        if not env:
            raise CommandError("TRUSTVBD_NEW_PASSPHRASE is empty; an empty passphrase cannot"
                               " protect a disk", EXIT_USAGE)
        return env
    if not _tty():
        raise CommandError("set TRUSTVBD_NEW_PASSPHRASE to the new passphrase, or run this from"
                           " a terminal to be asked", EXIT_USAGE)
    first = _ask(f"New passphrase for disk {disk}: ")
    if not first:
        raise CommandError("an empty passphrase cannot protect a disk; nothing was changed")
    if _ask(f"New passphrase for disk {disk} (again): ") != first:
        raise CommandError("the two passphrases differ; nothing was changed")
    return first


def rekey_disk(config_path: str, disk: str, to_passphrase: bool) -> int:
    """Rewrap the disk's data and signing keys under a new KEK; replicas are not touched."""
    from trustvbd.blocks.disk_state import load_kek, rekey
    from trustvbd.crypt.keys import KEK_FILE, KEK_PASSPHRASE, KeyFileError, WrongKeyError
    from trustvbd.domains.crypt_disks import PassphraseNeeded

    try:
        config = _config(config_path)
        keys = _disk_keys(config, disk)
        try:
            lock = StateLock(config.state_dir)
        except StateLocked as exc:
            raise CommandError(
                f"trustvbd up is running on state directory {exc.state_dir} (pid {exc.pid}) and holds"
                " the disk's keys; stop it first, then rekey") from None
        except StateLockUnwritable as exc:  # full or read-only
            raise CommandError(f"{exc} and try again; nothing was changed") from None
        try:
            _, kind = _read_keys(keys, disk)
            default_key = config.state_dir / "kek.key"
            if not to_passphrase and kind == KEK_FILE:
                print(f"disk {disk!r} is already protected by the key file {default_key};"
                      " nothing changed", file=sys.stderr)
                return 0
            old_passphrase = _old_passphrase(disk) if kind == KEK_PASSPHRASE else None
            new_passphrase = _new_passphrase(disk) if to_passphrase else None
            try:
                old = (load_kek(config.state_dir, passphrase=old_passphrase)
                       if kind == KEK_PASSPHRASE else load_kek(config.state_dir))
                new = (load_kek(config.state_dir, passphrase=new_passphrase) if to_passphrase
                       else load_kek(config.state_dir))
                rekey(config.state_dir, disk, old, new)
            except WrongKeyError as exc:
                if kind == KEK_PASSPHRASE and "does not unlock" in str(exc):
                    raise CommandError(f"wrong passphrase for disk {disk!r}; nothing was changed"
                                       ) from None
                raise CommandError(f"{exc}; nothing was changed") from None
            except (KeyFileError, PassphraseNeeded) as exc:
                raise CommandError(f"{exc}; nothing was changed") from None
            except OSError as exc:  # the keys are replaced atomically: the old ones stand
                where = exc.filename or config.state_dir
                raise CommandError(f"cannot write {where}: {exc.strerror or exc}; nothing was"
                                   " changed") from None
        finally:
            lock.release()
    except CommandError as exc:
        return _fail("disk rekey", exc)
    was = "its passphrase" if kind == KEK_PASSPHRASE else f"the key file {default_key}"
    if to_passphrase:
        print(f"disk {disk!r}: keys rewrapped under the new passphrase (was {was}); no data was"
              " rewritten. Start it with TRUSTVBD_PASSPHRASE set, or from a terminal.")
        _warn_other_passphrases(config, disk)
    else:
        print(f"disk {disk!r}: keys rewrapped under the key file {default_key} (was {was});"
              " no data was rewritten. Back that key file up: it alone unlocks the disk now.")
    return 0


def _warn_other_passphrases(config: Config, disk: str) -> None:
    """`up` has one passphrase for all disks: say which others must share it."""
    from trustvbd.domains.crypt_disks import needs_passphrase

    others = []
    for d in config.disks.values():
        if d.name != disk and d.encrypt:
            with contextlib.suppress(Exception):
                if needs_passphrase(config.state_dir, d.name):
                    others.append(d.name)
    if others:
        print(f"note: `trustvbd up` uses one passphrase for all disks; disks {', '.join(others)}"
              " are passphrase-protected too and must use the same one", file=sys.stderr)


# -- argparse wiring -----------------------------------------------------------------
def register(sub: Any) -> None:
    """Add `verify` and the `disk` command group to the `trustvbd` parser."""
    v = sub.add_parser(
        "verify", help="check a replica offline with only the disk's public key",
        description="Check an encrypted disk's replica (a backing file, or any NBD server) with"
        " the disk's public key only: superblock signatures, the leaf table against the signed"
        " hash tree, every leaf's shape. No secret and no state directory is needed. Exit 0 if"
        " it verifies, 1 if problems were found, 2 for usage or I/O errors.")
    v.add_argument("--public-key", required=True, metavar="FILE",
                   help="disk.pub (raw 32 bytes) or the output of `trustvbd disk pubkey`; - for stdin")
    v.add_argument("--replica", required=True, metavar="PATH_OR_URI",
                   help="backing file (opened read-only), or nbd+unix:///EXPORT?socket=PATH,"
                   " nbd://HOST[:PORT]/EXPORT")
    v.add_argument("--json", action="store_true", help="machine-readable report")
    v.set_defaults(func=lambda a: verify(a.public_key, a.replica, a.json))

    disk = sub.add_parser("disk", help="an encrypted disk's keys: public key, rekey")
    ds = disk.add_subparsers(dest="disk_command", metavar="SUBCOMMAND", required=True)
    p = ds.add_parser("pubkey", help="print the disk's public key (for `trustvbd verify`)",
                      description="Print the disk's Ed25519 public key as one line"
                      f" `{PUBKEY_PREFIX} BASE64 DISK`. Needs no secret; works while `up` runs.")
    p.add_argument("-c", "--config", required=True, help="config file (TOML)")
    p.add_argument("disk", help="disk name from the config")
    p.add_argument("-o", "--output", metavar="FILE", help="write the line to FILE instead")
    p.set_defaults(func=lambda a: pubkey(a.config, a.disk, a.output))

    p = ds.add_parser(
        "rekey", help="protect the disk's keys with a new passphrase or the key file",
        description="Rewrap the disk's data key and signing key under a new key-encryption key."
        " No data is re-encrypted and replicas are not touched. The current passphrase comes"
        " from TRUSTVBD_PASSPHRASE (or a prompt), the new one from TRUSTVBD_NEW_PASSPHRASE (or"
        " a prompt, asked twice). Refused while `trustvbd up` runs on the state directory.")
    p.add_argument("-c", "--config", required=True, help="config file (TOML)")
    p.add_argument("disk", help="disk name from the config")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-passphrase", action="store_true",
                    help="a (new) passphrase; also changes an existing passphrase")
    to.add_argument("--to-key-file", action="store_true",
                    help="the state directory's key file STATE_DIR/kek.key (made if missing)")
    p.set_defaults(func=lambda a: rekey_disk(a.config, a.disk, a.to_passphrase))


__all__ = ["format_public_key", "parse_public_key", "pubkey", "register", "rekey_disk", "verify"]
