"""`trustvbd scrub -c CONFIG DISK`: verify every block of every replica of a running disk.

The encryption domain does the work (ReplicaSet.scrub: read, verify, repair from a
good replica); this command starts it through the launcher and follows its progress
in `status`: a progress bar on a terminal, one JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

POLL = 0.2  # seconds between status polls
EXIT_FOUND = 2  # blocks that no replica holds correctly


def _scrub_of(config: Any, disk: str) -> dict[str, Any] | None:
    from trustvbd.cli import ask_running
    from trustvbd.domains.messages import HvStatus, StatusQuery

    reply = ask_running(config, StatusQuery(), paused_fails=False)
    for d in reply.disks if isinstance(reply, HvStatus) else []:
        if d["name"] == disk:
            scrub: dict[str, Any] | None = d.get("scrub")
            return scrub
    return None


def _summary(result: dict[str, dict[str, Any]]) -> tuple[int, int, int]:
    checked = sum(r["checked"] for r in result.values())
    bad = sum(r["bad"] for r in result.values())
    repaired = sum(r["repaired"] for r in result.values())
    return checked, bad, repaired


def cmd_scrub(args: argparse.Namespace) -> int:
    from trustvbd.cli import EXIT_NOT_RUNNING, NoAnswer, NotRunning, _config

    config = _config(args.config)
    if args.disk not in config.disks:  # said before asking `up` (which may not run)
        return _failed(args, f"no disk {args.disk!r} in {config.path} (its disks:"
                       f" {', '.join(config.disks) or 'none'})")  # exit 1: 2 is bad blocks
    try:
        return _scrub(args, config)
    except NotRunning as exc:  # before or during the scrub: --json still says why
        _failed(args, str(exc))
        return EXIT_NOT_RUNNING
    except NoAnswer as exc:
        return _failed(args, str(exc))


def _scrub(args: argparse.Namespace, config: Any) -> int:
    from trustvbd.cli import NotRunning, ask_running
    from trustvbd.domains.messages import ScrubQuery, ScrubStarted, refusal

    reply = ask_running(config, ScrubQuery(args.disk))
    if not isinstance(reply, ScrubStarted):
        return _failed(args, refusal(reply, "unexpected reply"))
    show = sys.stdout.isatty() and not args.json
    lost = None
    try:
        scrub = _follow(config, args.disk, show)
    except NotRunning as exc:  # refused, or the connection broke while `up` was asked
        scrub, lost = None, exc
    if scrub is None:
        return _cut_short(args, config, lost)
    if scrub.get("error"):
        return _failed(args, str(scrub["error"]))
    result = scrub.get("result", {})
    checked, bad, repaired = _summary(result)
    if args.json:
        print(json.dumps({"disk": args.disk, "seconds": scrub.get("seconds"), "replicas": result,
                          "checked": checked, "bad": bad, "repaired": repaired}, indent=2))
    else:
        print(f"disk {args.disk}: scrubbed in {scrub.get('seconds')} s")
        for name, r in result.items():
            print(f"  replica {name}: {r['checked']} blocks checked, {r['bad']} bad,"
                  f" {r['repaired']} repaired"
                  + (f"; NOT SCRUBBED: {r['not_scrubbed']}" if r.get("not_scrubbed") else ""))
    return EXIT_FOUND if bad > repaired else 0


def _cut_short(args: argparse.Namespace, config: Any, lost: Exception | None) -> int:
    """The scrub vanished: its encryption domain stopped, or `up` did (taking its domains with
    it: PDEATHSIG). Which of the two the polls noticed first is a race under load (`up`'s
    answer without the domain, or a broken connection), so the words come from whether `up`
    still holds the state directory's lock, not from which symptom came first."""
    from trustvbd.cli import EXIT_NOT_RUNNING
    from trustvbd.state_lock import holder

    pid = holder(config.state_dir)
    deadline = time.monotonic() + 2
    while lost is not None and pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # a killed `up` may not have closed all its files yet
        pid = holder(config.state_dir)
    if pid is None:
        _failed(args, f"the scrub of disk {args.disk!r} was cut short: `trustvbd up` stopped"
                f" while it ran; start it again (trustvbd up -c {config.path}) and run the"
                " scrub again")
        return EXIT_NOT_RUNNING
    if lost is not None:  # alive, but it would not answer
        return _failed(args, f"the scrub of disk {args.disk!r} was not followed to its end:"
                       f" {lost}; `trustvbd up` (pid {pid}) still runs: see `trustvbd status`")
    return _failed(args, f"the scrub of disk {args.disk!r} did not finish: the encryption"
                   f" domain serving it stopped or was restarted meanwhile (`trustvbd up`, pid"
                   f" {pid}, is still running and restarts it: see `trustvbd status`); run the"
                   " scrub again")


def _failed(args: argparse.Namespace, why: str) -> int:
    """A scrub that could not run or finish: the reason on stderr, and with --json also as
    JSON on stdout, so a script reading stdout learns why instead of reading nothing."""
    print(f"trustvbd scrub: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps({"disk": args.disk, "error": why}, indent=2))
    return 1


def _follow(config: Any, disk: str, show: bool) -> dict[str, Any] | None:
    """Poll `status` until the scrub is over; draw a progress bar on a terminal."""
    if not show:
        while (scrub := _scrub_of(config, disk)) is not None and scrub.get("running"):
            time.sleep(POLL)
        return scrub
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"scrub {disk}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("scrub", total=None)
        while (scrub := _scrub_of(config, disk)) is not None:
            bar.update(task, completed=scrub.get("done", 0), total=scrub.get("total"))
            if not scrub.get("running"):
                return scrub
            time.sleep(POLL)
    return None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "scrub", help="read every block of every replica of a disk, verify it, repair it",
        description="While `trustvbd up` runs: read each written block from every current"
        " replica, verify it against the trusted leaves, and rewrite bad copies from a good"
        " one. Exit status 2 if some block is good on no replica.")
    p.add_argument("-c", "--config", required=True, help="config file (TOML)")
    p.add_argument("disk", help="disk name")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(func=cmd_scrub)
