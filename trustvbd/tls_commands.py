"""`trustvbd tls init DIR` and `trustvbd tls guest DIR NAME`: certificates without openssl.

The layout is the one qemu-nbd, nbdkit and libnbd share (crypt/x509.py). Exit 0
done, 1 refused (files exist, CA missing), 2 usage.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Any

from trustvbd.crypt.x509 import DEFAULT_SERVER_NAMES, LEAF_DAYS, CertificateError

_CN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A DNS name the server certificate may carry (letters, digits, '-' between dots).
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _not_a_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return not _HOST.fullmatch(name)


def _cannot_write(exc: OSError, target: Path) -> str:
    """One line for an OSError while making certificates: which path, why, what to do."""
    where = "" if exc.filename in (None, str(target)) else f"{exc.filename}: "
    return (f"cannot write certificates to {target}: {where}{exc.strerror or exc}; give a"
            " directory you may create or write (made mode 0700 if missing)")


def init(directory: str, names: list[str]) -> int:
    from trustvbd.crypt.x509 import init_ca

    target = Path(directory)
    for name in names:
        if _not_a_host(name):
            print(f"trustvbd tls init: --name {name!r} is neither a host name (letters, digits"
                  " and '-' between dots) nor an IP address; nothing written", file=sys.stderr)
            return 2
    try:
        files = init_ca(target, names)
    except CertificateError as exc:
        print(f"trustvbd tls init: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"trustvbd tls init: {_cannot_write(exc, target)}", file=sys.stderr)
        return 1
    for path in files:
        print(f"wrote {path}")
    served = ", ".join([*DEFAULT_SERVER_NAMES, *names])
    print(f"the server certificate is valid for: {served}")
    print(f"next: put [tls] dir = \"{target}\" in the config, give a guest listen = \"HOST:PORT\","
          f" then `trustvbd tls guest {target} GUEST` for that guest's certificate")
    return 0


def guest(directory: str, name: str, out: str | None, days: int) -> int:
    from trustvbd.crypt.x509 import issue_guest

    if not _CN.match(name):
        print(f"trustvbd tls guest: {name!r} is not a guest name (1-64 letters, digits, '.', '_'"
              " or '-')", file=sys.stderr)
        return 2
    if not 1 <= days <= 3650:
        print("trustvbd tls guest: --days must be between 1 and 3650", file=sys.stderr)
        return 2
    try:
        issued = issue_guest(Path(directory), name, Path(out) if out else None, days)
    except CertificateError as exc:
        print(f"trustvbd tls guest: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        target = Path(out) if out else Path(directory) / "guests" / name
        print(f"trustvbd tls guest: {_cannot_write(exc, target)}", file=sys.stderr)
        return 1
    where = issued.cert.parent
    print(f"wrote {issued.cert}\nwrote {issued.key}")
    print(f"give {where} to guest {name}; it connects with"
          f" nbds://HOST:PORT/DISK?tls-certificates={where}")
    return 0


def register(sub: Any) -> None:
    """Add the `tls` command group to the `trustvbd` parser."""
    tls = sub.add_parser("tls", help="make the certificates for NBD over TLS",
                         description="A private CA and its certificates, in the directory"
                         " layout qemu-nbd, nbdkit and libnbd use (ca-cert.pem, server-*.pem,"
                         " client-*.pem). Keys are written 0600; nothing is overwritten.")
    ts = tls.add_subparsers(dest="tls_command", metavar="SUBCOMMAND", required=True)
    p = ts.add_parser("init", help="make a CA, the server and the client certificate",
                      description="Make DIR (0700) with a new CA, the server certificate (for"
                      " localhost, 127.0.0.1, ::1 and every --name) and the encryption domain's"
                      " client certificate for remote drivers.")
    p.add_argument("dir", help="the directory to create (must not hold certificates yet)")
    p.add_argument("--name", action="append", default=[], metavar="HOST_OR_IP",
                   help="another name guests reach the server by (repeatable)")
    p.set_defaults(func=lambda a: init(a.dir, a.name))
    p = ts.add_parser("guest", help="issue a guest's client certificate",
                      description="Issue a client certificate whose Common Name is NAME, signed"
                      " by DIR's CA, into DIR/guests/NAME (or --out): a directory to pass to"
                      " libnbd as tls-certificates=, or to qemu as tls-creds-x509 dir=.")
    p.add_argument("dir", help="the directory `tls init` made (its CA signs the certificate)")
    p.add_argument("name", help="the guest's name (or its tls_name)")
    p.add_argument("--out", metavar="DIR", help="where to write it (default DIR/guests/NAME)")
    p.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity (default {LEAF_DAYS})")
    p.set_defaults(func=lambda a: guest(a.dir, a.name, a.out, a.days))
