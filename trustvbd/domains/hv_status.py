"""What `trustvbd status` shows: the hypervisor's view of every domain, plus the disks and
guests as the encryption domain reports them."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlClosed

if TYPE_CHECKING:
    from trustvbd.domains.hv import Launcher

CRYPT_STATUS_TIMEOUT = 10.0
COUNTERS = ("memory", "memory_peak", "decisions_waited")  # summed over encryption domains


async def gather_status(hv: Launcher) -> m.HvStatus:
    c = hv.config
    me = m.DomainStatus("hv", "hv", True, "", os.getpid(), "running", 0, None, None, [os.getpid()])
    disks: list[dict[str, Any]] = []
    aead_threads = 0
    per_guest: dict[str, dict[str, Any]] = {}
    for name, channel in list(hv.crypt_channels.items()):
        if channel.closed.is_set():
            continue
        with contextlib.suppress(ControlClosed, TimeoutError, ValueError):
            crypt, _ = await channel.ask(m.StatusQuery(), m.CryptStatus,
                                         timeout=CRYPT_STATUS_TIMEOUT)
            if not isinstance(crypt, m.CryptStatus):
                continue
            disks += [{**d, "domain": name} for d in crypt.disks]
            aead_threads += crypt.aead_threads
            for g in crypt.guests:  # a guest may reach several encryption domains
                into = per_guest.setdefault(str(g.get("name")), {"connections": []})
                into["connections"] += g.get("connections") or []
                for key in COUNTERS:
                    if type(g.get(key)) is int:
                        into[key] = into.get(key, 0) + g[key]
    order = list(c.disks)
    return m.HvStatus(
        pid=os.getpid(),
        state_dir=str(c.state_dir),
        config=str(c.path),
        policy=hv.policy_path,
        uptime=round(time.time() - hv.started, 1),
        domains=[me, *(m.DomainStatus(**d) for d in hv.supervisor.status())],
        disks=sorted(disks, key=lambda d: order.index(d["name"]) if d["name"] in order else 0),
        aead_threads=aead_threads,
        guests=[m.GuestStatus(
            name=g.name, label=g.label, socket=str(c.guest_socket(g.name)),
            sockets={gs.wtype: str(gs.path) for gs, s in hv.listeners
                     if gs.guest == g.name and s.family == socket.AF_UNIX},
            **per_guest.get(g.name, {"connections": []})) for g in c.guests.values()],
        integrity_events=hv.integrity_events[-20:],
        attachments=await hv.store.status(),  # XenBus states, read from the store
    )
