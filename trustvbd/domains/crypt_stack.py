"""A disk's stack in the encryption domain, built at start (or at unlock): a channel to
each replica's driver, asked of the launcher (which checks policy and hands over a
connected socket); a link per replica (a mirror connects every driver at once and
starts degraded without one that does not answer in time); and, for an encrypted
disk, the CryptDisk over the links (crypt_disks.open_crypt_disk). The functions take
the domain (domains/crypt.py), whose channels, limits and records they use.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustvbd.acm.audit_fields import compact_fields
from trustvbd.blockdev import Backend, BlockError
from trustvbd.blocks import write_ring
from trustvbd.blocks.aead_pool import AeadPool, default_threads
from trustvbd.blocks.crypt_layer import Kek, physical_size
from trustvbd.blocks.limits import SizeLimit
from trustvbd.blocks.reconnect import ReplicaLink, Unreachable
from trustvbd.blocks.replica_set import ReplicaSet
from trustvbd.blocks.space import SpaceWatch
from trustvbd.blocks.write_ring import WriteRing
from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlClosed
from trustvbd.domains.crypt_disks import DEFAULT_LEAF_CACHE
from trustvbd.nbd.client import NbdClient
from trustvbd.xenstore.xenbus import State

if TYPE_CHECKING:
    from trustvbd.domains.crypt import CryptDomain, Disk

log = logging.getLogger("trustvbd.crypt")


async def open_channel(domain: CryptDomain, disk: Disk, replica: str) -> Backend:
    """Ask the launcher for a connected socket to `replica`'s export of this disk."""
    domain.bus.replica(disk.name, replica, State.INITIALISED)
    try:
        reply, fds = await domain.control.ask(m.ChannelQuery(disk.name, replica), m.ChannelGranted)
        sock = domain.granted(reply, fds)
        assert isinstance(reply, m.ChannelGranted)
        tls = None
        if reply.tls_server_name is not None and domain.tls_dir is not None:
            from trustvbd.crypt.tls import client_context

            tls = client_context(domain.tls_dir)
        offer = disk.ring.offer() if disk.ring is not None else None
        try:
            client = await NbdClient.connect(sock, reply.export,
                                             request_timeout=domain.spec.request_timeout, tls=tls,
                                             server_hostname=reply.tls_server_name, ring=offer)
        finally:
            if offer is not None:
                os.close(offer[0])
    except BaseException:
        domain.bus.replica(disk.name, replica, State.CLOSED)
        raise
    domain.bus.replica(disk.name, replica, State.CONNECTED)
    return client


async def open_disk(domain: CryptDomain, disk: Disk) -> None:
    if not disk.encrypt:
        replica = disk.replica_names[0]
        first = await open_channel(domain, disk, replica)
        link = ReplicaLink(first, replica, lambda: open_channel(domain, disk, replica))
        watch = SpaceWatch(link, disk.name, replica)  # logs and shows a driver out of space
        disk.links, disk.space = [link], [watch]
        if link.size < disk.size:
            raise ValueError(
                f"replica {replica!r} offers {link.size} bytes, smaller than disk {disk.name!r}"
                f" ({disk.size} bytes); give the driver a larger export"
            )
        disk.backend = SizeLimit(watch, disk.size)
        return
    if len(disk.replica_names) > 1 and write_ring.enabled():
        disk.ring = WriteRing()
    disk.links = await open_links(domain, disk)
    mirrored = len(disk.links) > 1  # a full driver degrades its replica; writes go on
    disk.space = [SpaceWatch(link, disk.name, link.name, mirrored) for link in disk.links]
    disk.backend = await open_encrypted(domain, disk)
    replicas = getattr(disk.backend, "replicas", None)
    if disk.ring is not None and isinstance(replicas, ReplicaSet):
        replicas.set_ring(disk.ring)


async def open_links(domain: CryptDomain, disk: Disk) -> list[ReplicaLink]:
    """A link to each replica. With one replica a broken link is retried inline (there
    is nowhere else to go). In a mirror every driver is connected at once; a link
    fails at once and the replica set brings it back in the background, so a driver
    unreachable at start starts degraded, and so does one whose handshake is not done
    `replica_lag` s after another driver's (rather than holding the disk for its
    handshake timeout)."""
    def connector(replica: str) -> Callable[[], Awaitable[Backend]]:
        return lambda: open_channel(domain, disk, replica)

    names = disk.replica_names
    if len(names) == 1:
        connect = connector(names[0])
        return [ReplicaLink(await connect(), names[0], connect)]
    tasks = [asyncio.ensure_future(connector(name)()) for name in names]
    try:
        pending: set[asyncio.Future[Backend]] = set(tasks)
        while pending and not any(t.done() and not t.cancelled() and t.exception() is None
                                  for t in tasks):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:  # one driver is ready: the others get replica_lag
            _, pending = await asyncio.wait(pending, timeout=domain.spec.limits["replica_lag"])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    links = []
    for name, task in zip(names, tasks, strict=True):
        first: Backend
        if task.cancelled():
            why = (f"no handshake within replica_lag ({domain.spec.limits['replica_lag']:g} s)"
                   " of the other drivers'")
        elif isinstance(exc := task.exception(), (ConnectionError, OSError, BlockError)):
            why = str(exc)
        elif exc is not None:
            raise exc
        else:
            links.append(ReplicaLink(task.result(), name, connector(name), retry_window=0))
            continue
        log.error("disk %s: replica %s unreachable at start: %s", disk.name, name, why)
        first = Unreachable(physical_size(disk.size), f"unreachable at start: {why}")
        links.append(ReplicaLink(first, name, connector(name), retry_window=0))
    return links


async def open_encrypted(domain: CryptDomain, disk: Disk, kek: Kek | None = None) -> Backend:
    from trustvbd.domains.crypt_disks import open_crypt_disk

    def on_event(event: dict[str, Any]) -> None:
        disk.integrity_events += 1
        out = disk.event_windows.add(event)
        if out is not None:  # logged as audited: the first at once, then a window's summary
            log.error("integrity: %s", out["message"])
            send_event(domain, disk, out)
        schedule_summaries(domain, disk)

    if domain.aead is None and (threads := default_threads()):
        domain.aead = AeadPool(threads)
        log.info("AEAD threads: %d", threads)
    opened = await open_crypt_disk(domain.state_dir, disk.name, disk.size,
                                   [(watch.driver, watch) for watch in disk.space],
                                   domain.unlock, on_event, domain.aead, kek,
                                   domain.spec.limits.get("leaf_cache", DEFAULT_LEAF_CACHE),
                                   domain.spec.limits["replica_lag"], Path(domain.spec.state_dir),
                                   domain.name_disk)
    return opened


def send_event(domain: CryptDomain, disk: Disk, event: dict[str, Any]) -> None:
    """An integrity event (or a window's summary) to the launcher's status and the audit log."""
    # Any size fits: block lists become counts and ranges.
    fields = compact_fields({**event, "disk": disk.name})
    fields.pop("event", None)
    try:
        domain.control.tell(m.Integrity(disk.name, fields))
    except ControlClosed as exc:  # (ControlFull too) never into the read or write it came from
        log.error("disk %s: an integrity event not told to the launcher (status misses it;"
                  " the audit log below does not): %s", disk.name, exc)

    async def record() -> None:
        reply = await domain.gate.client.record("integrity", **fields)
        if reply.get("ok") is not True:  # said here at least (a timed-out one may come late)
            log.error("disk %s: %d integrity event(s) (%s) of replica %s may be missing from "
                      "the audit log: %s", disk.name, fields.get("events", 1), fields.get("what"),
                      fields.get("replica"), reply.get("error"))

    task = asyncio.get_running_loop().create_task(record())
    domain.records.add(task)
    task.add_done_callback(domain.records.discard)


def schedule_summaries(domain: CryptDomain, disk: Disk) -> None:
    """A timer for the next window with held events (one per disk at a time)."""
    when = disk.event_windows.next_due()
    if when is None or disk.summary_timer is not None:
        return
    loop = asyncio.get_running_loop()

    def fire() -> None:
        disk.summary_timer = None
        send_summaries(domain, disk)
        schedule_summaries(domain, disk)

    disk.summary_timer = loop.call_later(max(0.0, when - disk.event_windows.clock()), fire)


def send_summaries(domain: CryptDomain, disk: Disk, everything: bool = False) -> None:
    """The summaries of the windows that ended (all of them with `everything`, at stop)."""
    for summary in disk.event_windows.due(disk.name, everything):
        log.error("integrity: %s", summary["message"])
        send_event(domain, disk, summary)
