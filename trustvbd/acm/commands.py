"""`trustvbd policy ...` and `trustvbd audit ...`: plain functions plus their argparse wiring.

Each function prints for people and returns an exit code: 0 fine, 1 refused or
invalid, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from trustvbd.acm import Policy, PolicyError, load_policy
from trustvbd.acm.audit_read import each_record, follow, verify
from trustvbd.acm.compiled import digest, encode
from trustvbd.acm.decisions import domains_may_communicate, explain, guest_may_use_disk
from trustvbd.acm.toml_loader import to_toml
from trustvbd.acm.xml_loader import to_xml

AUDIT_FILE = "audit.jsonl"  # the audit log's name inside a config's state_dir
NULL_WARNING = ("WARNING: no policy configured (Xen's NULL policy): every guest may use every"
                " disk and every domain may talk to every other")


def _load_or_report(path: str) -> Policy | None:
    """The policy at `path`, or None after printing why it is refused (file:line: reason)."""
    try:
        return load_policy(path)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return None


def check(path: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call, so redirection works
    p = _load_or_report(path)
    if p is None:
        return 1
    print(f'{path}: policy "{p.name}" is valid: {len(p.ste_types)} STE types,'
          f" {len(p.chwall_types)} Chinese Wall types, {len(p.conflict_sets)} conflict sets,"
          f" {len(p.vm_labels)} VM labels, {len(p.resource_labels)} resource labels,"
          f' bootstrap "{p.bootstrap}"', file=out)
    return 0


def show(path: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call, so redirection works
    p = _load_or_report(path)
    if p is None:
        return 1
    w = lambda *a: print(*a, file=out)  # noqa: E731
    w(f'policy "{p.name}" version {p.header.version or "(none)"} from {path}')
    w(f"STE types: {', '.join(p.ste_types) or '(none: STE not enforced)'}")
    w(f"Chinese Wall types: {', '.join(p.chwall_types) or '(none: Chinese Wall not enforced)'}")
    for c in p.conflict_sets:
        w(f"conflict set {c.name}: {', '.join(c.types)}")
    w(f"bootstrap label: {p.bootstrap}")
    w("VM labels:")
    for v in p.vm_labels:
        w(f"  {v.name}: ste [{', '.join(v.ste)}] chwall [{', '.join(v.chwall)}]")
    w("resource labels:")
    for r in p.resource_labels:
        w(f"  {r.name}: ste {r.ste}")
    vms, res = [v.name for v in p.vm_labels], [r.name for r in p.resource_labels]
    width = max((len(n) for n in vms), default=0) + 6

    def matrix(title: str, cols: list[str], allowed: Any) -> None:
        w(f"\n{title}")
        w(" " * width + " ".join(f"{j + 1:>2}" for j in range(len(cols))))
        for i, a in enumerate(vms):
            marks = " ".join(" x" if allowed(a, b) else " ." for b in cols)
            w(f"{i + 1:>3} {a:<{width - 4}}{marks}")
        w("columns: " + ", ".join(f"{j + 1}={c}" for j, c in enumerate(cols)))

    matrix("VM labels that may share (STE: x = share a type):", vms,
           lambda a, b: domains_may_communicate(p, a, b).allowed)
    if res:
        matrix("VM labels that may use resource labels (x = allowed):", res,
               lambda a, b: guest_may_use_disk(p, a, b).allowed)
    return 0


def convert(path: str, output: str | None = None, to: str | None = None,
            out: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call, so redirection works
    p = _load_or_report(path)
    if p is None:
        return 1
    to = to or ("xml" if Path(path).suffix.lower() == ".toml" else "toml")
    text = to_toml(p) if to == "toml" else to_xml(p)
    if output:
        Path(output).write_text(text, encoding="utf-8")
        print(f"{path} -> {output} ({to})", file=sys.stderr)
    else:
        out.write(text)
    return 0


def write_compiled(policy: Policy, output: str | Path) -> bytes:
    """Write `policy`'s compiled form to `output` atomically (a reader sees old or new, whole)."""
    data = encode(policy)
    output = Path(output)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def compile_file(path: str, output: str) -> int:
    """`trustvbd policy compile IN OUT`: validate a policy and write what the domain loads."""
    p = _load_or_report(path)
    if p is None:
        return 1
    try:
        data = write_compiled(p, output)
    except OSError as exc:
        print(f"trustvbd policy compile: cannot write {output}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(f'{path} -> {output}: policy "{p.name}", {len(data)} bytes, sha256'
          f" {digest(data)}", file=sys.stderr)
    return 0


def explain_config(config: str, guest: str, disk: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call, so redirection works
    from trustvbd.config import ConfigError
    from trustvbd.config_file import load_config

    try:
        cfg = load_config(config)
        policy = load_policy(cfg.policy) if cfg.policy else Policy.null()
    except (ConfigError, PolicyError) as exc:
        print(f"trustvbd policy explain: {exc}", file=sys.stderr)
        return 2
    guests = {n: g.label for n, g in cfg.guests.items()}
    disks = {n: d.label for n, d in cfg.disks.items()}
    for kind, name, known in (("guest", guest, guests), ("disk", disk, disks)):
        if name not in known:
            print(f"trustvbd policy explain: {config} has no [[{kind}]] named {name!r};"
                  f" known: {', '.join(sorted(known)) or 'none'}", file=sys.stderr)
            return 2
    if policy.is_null:
        print(NULL_WARNING, file=sys.stderr)
    for line in explain(policy, guests[guest], disks[disk], guest, disk):
        print(line, file=out)
    return 0 if guest_may_use_disk(policy, guests[guest], disks[disk]).allowed else 1


def _line(rec: dict[str, Any]) -> str:
    fields = " ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in rec["fields"].items())
    return f"{rec['seq']:>6} {rec['time']} {rec['kind']:<12} {fields}"


def show_audit(path: str | Path, follow_log: bool = False, as_json: bool = False,
               out: TextIO | None = None) -> int:
    """Exit 0, or 1 when some lines are no record (after printing the others), 2 when the
    log cannot be read."""
    out = out or sys.stdout  # looked up per call, so redirection works
    bad = 0
    try:
        records: Iterable[dict[str, Any] | None] = follow(path) if follow_log else each_record(path)
        for rec in records:  # one at a time: a log of any size is shown in bounded memory
            if rec is None:
                bad += 1
                continue
            print(json.dumps(rec, ensure_ascii=False) if as_json else _line(rec), file=out,
                  flush=follow_log)
    except BrokenPipeError:
        raise  # the reader left (`| head`): the command line ends quietly
    except OSError as exc:
        print(f"trustvbd audit: {exc.filename or path}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    if bad:
        print(f"trustvbd audit: {path}: {bad} line(s) are not audit records (damaged, cut or"
              " edited) and were not shown: `trustvbd audit --verify` says where", file=sys.stderr)
        return 1
    return 0


def verify_audit(path: str | Path, out: TextIO | None = None, key: str | None = None) -> int:
    """Check the chain, signatures and head; `key` pins the public key (hex or a .pub file)."""
    from trustvbd.acm.audit_format import head_path, public_key_path, rotated_files, stored_public_key
    from trustvbd.crypt.sign import fingerprint

    out = out or sys.stdout  # looked up per call, so redirection works
    path = Path(path)
    if not (path.exists() or head_path(path).exists() or rotated_files(path)):
        # Nothing at all: most likely a wrong path, not an attack (a log removed while its
        # head or rotated files stay is still reported as tampered with below).
        print(f"{path}: no audit log here (no log, no head, no rotated files): check the path"
              " (-c CONFIG or --log FILE); if a log was kept here, it was removed", file=out)
        return 1
    if path.exists() and not path.is_file():  # a device or a pipe would be read forever
        print(f"trustvbd audit: {path}: not a regular file (an audit log is one): check the path"
              " (-c CONFIG or --log FILE)", file=sys.stderr)
        return 2
    pinned = None
    if key is not None:
        try:
            pinned = Path(key).read_bytes() if Path(key).is_file() else bytes.fromhex(key)
        except (OSError, ValueError):
            pinned = b""
        if len(pinned) != 32:
            print(f"trustvbd audit: --key {key!r} is neither a 32-byte public key file nor 64 hex"
                  " digits", file=sys.stderr)
            return 2
    problems = verify(path, pinned)
    for p in problems:
        print(p, file=out)
    if problems:
        print(f"{path}: {len(problems)} problem(s): the audit log was tampered with or damaged",
              file=out)
        return 1
    used = pinned or stored_public_key(path) or b""
    files = len(rotated_files(path)) + 1
    count = sum(rec is not None for rec in each_record(path))
    print(f"{path}: {count} records in {files} file(s), chain, signatures and"
          f" head intact; key {fingerprint(used).hex()[:16]}"
          f" ({'pinned' if pinned else public_key_path(path)})", file=out)
    return 0


def _audit_path(args: argparse.Namespace) -> Path:
    if args.log:
        return Path(args.log)
    from trustvbd.config import ConfigError
    from trustvbd.config_file import load_config

    try:
        return load_config(args.config).state_dir / AUDIT_FILE
    except ConfigError as exc:
        print(f"trustvbd audit: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def register(sub: Any, load_policy_into_running: Any = None) -> None:
    """Add `policy` and `audit` command groups to the `trustvbd` parser."""
    pol = sub.add_parser("policy", help="check, show, convert and explain sHype/ACM policies")
    ps = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    p = ps.add_parser("check", help="validate a policy file (Xen XML or .toml)")
    p.add_argument("file", help="policy file: Xen XML or .toml")
    p.set_defaults(func=lambda a: check(a.file))
    p = ps.add_parser("show", help="types, labels, conflict sets and who may share with whom")
    p.add_argument("file", help="policy file: Xen XML or .toml")
    p.set_defaults(func=lambda a: show(a.file))
    p = ps.add_parser("convert", help="Xen XML <-> TOML")
    p.add_argument("file", help="policy file: Xen XML or .toml")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.add_argument("--to", choices=("toml", "xml"), help="default: the other form")
    p.set_defaults(func=lambda a: convert(a.file, a.output, a.to))
    p = ps.add_parser("compile", help="write the compiled form the access-control domain loads",
                      description="Validate FILE (Xen XML or .toml) and write its compiled form"
                      " (docs/policy.md, \"Compiled form\") to OUTPUT. `up` and `policy load`"
                      " compile by themselves; this is for checking and inspecting.")
    p.add_argument("file", help="policy file: Xen XML or .toml")
    p.add_argument("output", help="where to write the compiled policy")
    p.set_defaults(func=lambda a: compile_file(a.file, a.output))
    p = ps.add_parser("explain", help="why a guest may or may not use a disk")
    p.add_argument("-c", "--config", required=True, help="config file (TOML)")
    p.add_argument("--guest", required=True, help="guest name from the config")
    p.add_argument("--disk", required=True, help="disk name from the config")
    p.set_defaults(func=lambda a: explain_config(a.config, a.guest, a.disk))
    if load_policy_into_running is not None:
        p = ps.add_parser("load", help="replace the policy of a running system",
                          description="Validate FILE and make it the running system's policy:"
                          " new connections follow it at once, existing ones it forbids are closed.")
        p.add_argument("-c", "--config", required=True, help="config file (TOML) of the running system")
        p.add_argument("file", help="the new policy: Xen XML or .toml")
        p.add_argument("--timeout", type=float, default=30, metavar="SECONDS",
                       help="wait this long for the launcher's answer (default 30); the load"
                            " goes on in the launcher after it")
        p.set_defaults(func=lambda a: load_policy_into_running(a.config, a.file, a.timeout))

    aud = sub.add_parser("audit", help="show or verify the tamper-evident audit log",
                         description="Print the audit log (every policy decision and integrity"
                         " event), or with --verify check its hash chain and signatures.")
    where = aud.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="config file: its state_dir's audit log")
    where.add_argument("--log", help="audit log file")
    aud.add_argument("-f", "--follow", action="store_true", help="wait for new records")
    aud.add_argument("--json", action="store_true", help="one JSON record per line")
    aud.add_argument("--verify", action="store_true",
                     help="detect edited, removed, reordered or cut records (exit 1 if any)")
    aud.add_argument("--key", help="with --verify: the log's public key (a .pub file kept"
                     " elsewhere, or 64 hex digits), so a replaced key is caught too")
    aud.set_defaults(func=lambda x: verify_audit(_audit_path(x), key=x.key) if x.verify
                     else show_audit(_audit_path(x), x.follow, x.json))
