"""A policy loaded into the running system (`trustvbd policy load`).

Compiled and swapped in the access-control domain, then kept: what the new policy
forbids is closed (each encryption domain rechecks its connections, the store its
pairings), each guest's sockets follow the workload types it may now reach, and a disk
the policy moves to another type is said to stay where its keys are until the next
start of `up`. The functions take the hypervisor (hv.Launcher), whose state they change.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from trustvbd.acm import Policy, PolicyError, load_policy
from trustvbd.acm.commands import write_compiled
from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlClosed
from trustvbd.domains.hv_store import crypt_name
from trustvbd.domains.listeners import close_listeners, listen_unix
from trustvbd.domains.placement import GuestSocket, further_socket, types_of

if TYPE_CHECKING:
    from trustvbd.domains.hv import Launcher

log = logging.getLogger("trustvbd.hv")


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
    await hv.store.relabel_crypt(hv.broker.trusted_label)  # for later pairings
    closed = 0
    for channel in list(hv.crypt_channels.values()):
        if not channel.closed.is_set():
            answer, _ = await channel.ask(m.PolicyChanged(), m.Rechecked)
            closed += answer.closed if isinstance(answer, m.Rechecked) else 0
    try:  # check (a) again for every pairing in the store
        torn = await hv.store.recheck()
    except ConnectionError as exc:
        log.error("%s", exc)
        torn = []
    for t in torn:
        log.warning("the new policy forbids pairing %s with %s: torn down (%s)",
                    t.frontend_dir, t.backend_dir, t.reason)
    log.warning("policy %s loaded; %d connection(s) closed, %d pairing(s) torn down", path,
                closed, len(torn))
    for note in moved:
        log.warning("%s", note)
    await follow_guest_sockets(hv)
    return m.PolicyLoaded(str(summary.get("name") or Path(path).name), closed, len(torn),
                          moved)


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


async def follow_guest_sockets(hv: Launcher) -> None:
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
        return
    for wtype in hv.types:
        channel = hv.crypt_channels.get(crypt_name(wtype))
        if channel is None or channel.closed.is_set():
            continue  # a restarted domain asks for its sockets anew (SpecQuery)
        new = add.get(wtype, [])
        fds = [os.dup(s.fileno()) for _, s in new]
        try:
            await channel.ask(m.GuestSockets([m.ListenerSpec(g.guest, False) for g, _ in new],
                                             remove.get(wtype, []), hv.elsewhere(wtype)),
                              m.Done, fds=fds)
        except (ControlClosed, TimeoutError, ValueError) as exc:
            log.error("%s did not take its new guest sockets: %s", crypt_name(wtype), exc)
        finally:
            for fd in fds:
                os.close(fd)
    for wtype, pairs in add.items():
        for gs, _ in pairs:
            log.warning("guest %s may now use disks of workload type %s: on %s", gs.guest,
                        wtype, gs.path)
    for wtype, names in remove.items():
        for name in names:
            log.warning("guest %s may no longer use disks of workload type %s: its socket"
                        " for them is gone", name, wtype)
