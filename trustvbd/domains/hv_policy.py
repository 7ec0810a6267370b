"""A policy loaded into the running system (`trustvbd policy load`).

Compiled and swapped in the access-control domain, then kept: what the new policy
forbids is closed (each encryption domain rechecks its connections, the store its
pairings), each guest's sockets follow the workload types it may now reach, and a disk
the policy moves to another type is said to stay where its keys are until the next
start of `up`. The functions take the hypervisor (hv.Launcher), whose state they change.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustvbd.acm import Policy, PolicyError, load_policy
from trustvbd.acm.commands import write_compiled
from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlChannel, ControlClosed, ControlFull
from trustvbd.domains.hv_store import StoreFull, crypt_name, log_torn_down
from trustvbd.domains.listeners import close_listeners, listen_unix
from trustvbd.domains.placement import GuestSocket, further_socket, types_of
from trustvbd.domains.supervisor import paused, signal_stopped

if TYPE_CHECKING:
    from trustvbd.domains.hv import Launcher

log = logging.getLogger("trustvbd.hv")
RECHECK_TIMEOUT = 10.0  # the encryption domains (and the store) following a new policy
SOCKETS_TIMEOUT = 5.0  # the encryption domains taking their guests' new sockets, at once
RETELL_INTERVAL = 2.0  # a domain whose channel is full (it reads nothing) is told again


def bootstrap_label(bootstrap: str | None, null: bool) -> str:
    """The label trusted domains run under: the policy's bootstrap label (none: NULL policy)."""
    if null:
        return "__BOOTSTRAP__"
    return bootstrap or "__UNLABELED__"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def load(hv: Launcher, path: str) -> m.Message:
    """One load at a time; a second asked meanwhile is refused. Two at once shared
    policy.next: the access-control domain could swap in the second's policy for the first's
    request while `status` named the first's file, the second failing on a vanished file,
    and their rechecks and guests' sockets interleaved."""
    if hv.policy_loading is not None:
        loading, since = hv.policy_loading
        return m.Failed(m.ErrorCode.BUSY, f"a policy load is already in progress ({loading},"
                        f" asked {time.monotonic() - since:.0f} s ago); wait for its answer,"
                        f" then load {path} again if it is still wanted")
    hv.policy_loading = (path, time.monotonic())
    try:
        return await _load(hv, path)
    finally:
        hv.policy_loading = None


async def _load(hv: Launcher, path: str) -> m.Message:
    """Compile, swap the policy in the access-control domain, then close what it now forbids."""
    nxt, current = hv.compiled_policy(".next"), hv.compiled_policy()
    try:
        policy = load_policy(path)
        moved = moved_disks(hv, policy)
        write_compiled(policy, nxt)  # fsynced
    except (PolicyError, OSError, ValueError) as exc:
        return m.Failed(m.ErrorCode.INVALID, str(exc))
    reply = await hv.acm.load_policy(str(nxt))
    if not reply.get("ok"):
        nxt.unlink(missing_ok=True)
        return m.Failed(m.ErrorCode.POLICY_DENIED,
                        str(reply.get("error", "the access-control domain refused it")))
    # A restarted access-control domain loads what the running one holds: no await between
    # its yes and the rename, so no restart can come between them.
    os.replace(nxt, current)
    fsync_dir(current.parent)
    hv.policy_path = path
    # What the access-control domain loaded, not a second read of a file that may change.
    summary = reply.get("policy")
    summary = summary if isinstance(summary, dict) else {}
    hv.broker.trusted_label = bootstrap_label(summary.get("bootstrap"), null=False)
    # Every encryption domain is told at once and may take RECHECK_TIMEOUT to confirm,
    # while the store rechecks its pairings: told one after another (60 s each), one
    # stopped held the others' revocations past the CLI's 30 s, and they never came.
    enforcing = {name: tell_crypt(hv, name, channel)
                 for name, channel in list(hv.crypt_channels.items())
                 if not channel.closed.is_set()}
    store = tell_store(hv)
    await settle([*enforcing.values(), store], RECHECK_TIMEOUT)
    closed, notes, torn = 0, [], []
    for name, task in enforcing.items():
        if task.cancelled():  # `up` is stopping: no other load runs meanwhile
            continue
        if not task.done():
            notes.append(unconfirmed(hv, name))
            task.add_done_callback(functools.partial(confirmed_late, name))
            continue
        outcome = task.result()
        if isinstance(outcome, int):
            closed += outcome
        elif outcome is not None:
            notes.append(outcome)
    if not store.done():
        notes.append(f"the store did not confirm within {RECHECK_TIMEOUT:g} s that it rechecked"
                     " its pairings against the new policy (stopped or overloaded? `trustvbd"
                     " status` shows it): those it now forbids stay until it runs again; it has"
                     " been told and tears them down then (the launcher logs when)")
        store.add_done_callback(store_late)
    elif not store.cancelled():
        followed = store.result()
        if isinstance(followed, str):
            notes.append(followed)
        else:
            torn = followed
    log_torn_down(torn)
    log.warning("policy %s loaded; %d connection(s) closed, %d pairing(s) torn down", path,
                closed, len(torn))
    for note in [*moved, *notes]:
        log.warning("%s", note)
    notes += await follow_guest_sockets(hv)
    return m.PolicyLoaded(str(summary.get("name") or Path(path).name), closed, len(torn),
                          [*moved, *notes])


def tell_crypt(hv: Launcher, name: str, channel: ControlChannel) -> asyncio.Task[int | str | None]:
    """Tell an encryption domain of the new policy until it confirms, in the background (a
    later load supersedes it): the connections it closed, or what the administrator must
    know (None: it is gone; its next process checks every connection under the new policy)."""
    if (old := hv.enforcing.get(name)) is not None:
        old.cancel()  # its message was sent (or not): this one comes after it
    hv.enforcing[name] = task = hv.supervisor.spawn_task(enforce(name, channel))
    return task


async def settle(tasks: Collection[asyncio.Task[Any]], timeout: float) -> None:
    """Until every task is done, `timeout` s at most (none is cancelled)."""
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


async def enforce(name: str, channel: ControlChannel) -> int | str | None:
    while True:
        try:
            # No timeout: a stopped domain reads the message once it runs again, then closes
            # what the policy forbids; the launcher waits for its word as long as it lives.
            answer, _ = await channel.ask(m.PolicyChanged(), m.Rechecked, timeout=None)
        except ControlFull:  # not sent: it reads nothing now (stopped?); told once it does
            await asyncio.sleep(RETELL_INTERVAL)
            continue
        except ControlClosed:
            return None
        except m.MessageError as exc:
            answer = m.Failed(m.ErrorCode.BAD_MESSAGE, str(exc))
        if isinstance(answer, m.Rechecked):
            return answer.closed
        assert isinstance(answer, m.Failed)
        return (f"encryption domain {name} could not check its connections against the new"
                f" policy: {answer.message}; the connections it forbids may stay open: load the"
                " policy again once that is fixed")


def unconfirmed(hv: Launcher, name: str) -> str:
    """What the administrator must know of an encryption domain that did not confirm in time."""
    domain = hv.supervisor.domains.get(name)
    pid = hv.supervisor.pid(name)
    disks = ", ".join(hv.types.get(domain.wtype or "", []) if domain is not None else [])
    if pid is not None and signal_stopped(pid):
        why, fix = paused(pid), f"`kill -CONT {pid}`"
    else:
        why = f"stopped or overloaded? pid {pid}; `kill -USR1 {pid}` shows where it waits"
        fix = "give it time"
    return (f"encryption domain {name} did not confirm the new policy within"
            f" {RECHECK_TIMEOUT:g} s ({why}): the connections to its disks ({disks}) that the"
            f" policy now forbids stay open until it runs again; it has been told and closes"
            f" them then (the launcher logs when). {fix}, or kill it: restarted, it serves"
            f" under the new policy")


def confirmed_late(name: str, task: asyncio.Task[int | str | None]) -> None:
    if task.cancelled():
        return  # a later policy load told it again, or `up` is stopping
    outcome = task.result()
    if isinstance(outcome, int):
        log.warning("encryption domain %s confirmed the new policy late: %d connection(s) it"
                    " forbids closed", name, outcome)
    elif outcome is not None:
        log.error("%s", outcome)


def tell_store(hv: Launcher) -> asyncio.Task[list[m.TornDown] | str]:
    """The store follows the new policy (StoreLink.follow_policy), in the background until it
    does (a later load supersedes it): the pairings torn down, or what the administrator
    must know."""
    if hv.store_following is not None:
        hv.store_following.cancel()
    hv.store_following = task = hv.supervisor.spawn_task(store_follow(hv))
    return task


async def store_follow(hv: Launcher) -> list[m.TornDown] | str:
    while True:
        channel = hv.store.channel
        try:
            return await hv.store.follow_policy(hv.broker.trusted_label)
        except StoreFull:  # not sent: it reads nothing now (stopped?); told once it does
            await asyncio.sleep(RETELL_INTERVAL)
        except ConnectionError as exc:
            log.error("the store did not recheck its pairings against the new policy: %s", exc)
            now = hv.store.channel
            if now is None or now is not channel or now.closed.is_set():
                return ("the store is restarting: it rechecks its pairings against the new"
                        " policy when it starts")
            return (f"the store did not recheck its pairings against the new policy: {exc};"
                    " pairings it now forbids stay until the policy is loaded again")


def store_late(task: asyncio.Task[list[m.TornDown] | str]) -> None:
    if task.cancelled():
        return
    outcome = task.result()
    if isinstance(outcome, str):
        log.error("%s", outcome)
        return
    log.warning("the store rechecked its pairings against the new policy late: %d torn down",
                len(outcome))
    log_torn_down(outcome)


def moved_disks(hv: Launcher, policy: Policy) -> list[str]:
    """What a new policy moves to another workload type, said for the administrator.

    Such a disk stays where its keys are: each encryption domain runs under a user
    that owns only its own disks' keys, and a running system hands no keys from one
    domain to another. Every decision follows the new policy at once (check (b) per
    connection, the guests' sockets below); only the process holding the disk changes
    at the next start of `up` with this policy.
    """
    new = types_of(hv.config, policy)  # ValueError: two types with one file name
    now = {d: t for t, disks in hv.types.items() for d in disks}
    return [f"disk {d!r} is now of workload type {t!r} (was {now[d]!r}): it stays in"
            f" {crypt_name(now[d])}, which holds its keys, until `trustvbd up` starts again"
            f" with this policy as the config's `policy`"
            for t, disks in new.items() for d in disks if now.get(d) != t]


async def follow_guest_sockets(hv: Launcher) -> list[str]:
    """After a policy load: each guest gets a socket for every workload type it may now
    reach, and loses the further sockets (GUEST@TYPE.sock) of types it no longer may.
    Its own GUEST.sock stays whatever it may reach (check (b) refuses per connection)."""
    c = hv.config
    add: dict[str, list[tuple[GuestSocket, socket.socket]]] = {}
    remove: dict[str, list[str]] = {}
    for guest in c.guests.values():
        for d in c.disks:
            hv.allowed[guest.name, d] = await hv.guest_may_see(guest.name, d)
        reachable = {t for t in hv.types
                     if any(hv.allowed[guest.name, d] for d in hv.types[t])}
        have = {g.wtype: (g, s) for g, s in hv.listeners
                if g.guest == guest.name and s.family == socket.AF_UNIX}
        for wtype in sorted(reachable - set(have)):
            gs = further_socket(c, guest.name, wtype)
            pair = (gs, listen_unix(gs.path, guest.uid))
            hv.listeners.append(pair)
            add.setdefault(wtype, []).append(pair)
        for wtype, (gs, sock) in have.items():
            if not gs.primary and wtype not in reachable:
                hv.listeners.remove((gs, sock))
                close_listeners([sock])
                remove.setdefault(wtype, []).append(guest.name)
    if not (add or remove):
        return []
    told = [give_sockets(hv, wtype, channel, add.get(wtype, []), remove.get(wtype, []))
            for wtype in hv.types
            if (channel := hv.crypt_channels.get(crypt_name(wtype))) is not None
            and not channel.closed.is_set()]  # a restarted domain asks anew (SpecQuery)
    notes = [note for note in await asyncio.gather(*told) if note]
    for wtype, pairs in add.items():
        for gs, _ in pairs:
            log.warning("guest %s may now use disks of workload type %s: on %s", gs.guest,
                        wtype, gs.path)
    for wtype, names in remove.items():
        for name in names:
            log.warning("guest %s may no longer use disks of workload type %s: its socket"
                        " for them is gone", name, wtype)
    return notes


async def give_sockets(hv: Launcher, wtype: str, channel: ControlChannel,
                       new: list[tuple[GuestSocket, socket.socket]], gone: list[str]) -> str | None:
    """An encryption domain's new guest sockets (and those it loses), in SOCKETS_TIMEOUT at
    most (told all at once: one stopped holds up no other); else what the administrator must
    know."""
    name = crypt_name(wtype)
    fds = [os.dup(s.fileno()) for _, s in new]
    try:
        reply, _ = await channel.ask(m.GuestSockets([m.ListenerSpec(g.guest, False) for g, _ in new],
                                                    gone, hv.elsewhere(wtype)),
                                     m.Done, fds=fds, timeout=SOCKETS_TIMEOUT)
    except TimeoutError:  # sent: it takes them once it reads again
        reply = m.Failed(m.ErrorCode.UNREACHABLE, f"no answer within {SOCKETS_TIMEOUT:g} s"
                         " (stopped or overloaded?); it takes them once it reads its messages")
    except ControlFull as exc:
        reply = m.Failed(m.ErrorCode.UNREACHABLE, f"{exc}; restart it (kill it: the launcher"
                         " starts it again with them)")
    except (ControlClosed, ValueError) as exc:  # gone: its next process asks anew
        log.error("%s did not take its new guest sockets: %s", name, exc)
        return None
    finally:
        for fd in fds:
            os.close(fd)
    if not isinstance(reply, m.Failed):
        return None
    log.error("%s did not take its guests' new sockets: %s", name, reply.message)
    return f"encryption domain {name} did not take its guests' new sockets: {reply.message}"
