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


async def gather_status(hv: Launcher) -> dict[str, Any]:
    c = hv.config
    me = {"name": "hv", "kind": "hv", "trusted": True, "pid": os.getpid(), "label": "",
          "state": "running", "restarts": 0, "last_exit": None, "next_retry": None}
    disks: list[dict[str, Any]] = []
    workers: list[int] = []
    aead_restarts = 0
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
            workers += crypt.aead_workers
            aead_restarts += crypt.aead_restarts
            for g in crypt.guests:  # a guest may reach several encryption domains
                into = per_guest.setdefault(str(g.get("name")), {"connections": []})
                for key, value in g.items():
                    if key == "connections":
                        into["connections"] += value
                    elif isinstance(value, int) and key != "name":
                        into[key] = into.get(key, 0) + value
    order = list(c.disks)
    return {
        "pid": os.getpid(),
        "state_dir": str(c.state_dir),
        "config": str(c.path),
        "policy": hv.policy_path,
        "uptime": round(time.time() - hv.started, 1),
        "domains": [me, *hv.supervisor.status()],
        "disks": sorted(disks, key=lambda d: order.index(d["name"]) if d["name"] in order else 0),
        "aead_workers": workers,
        "aead_restarts": aead_restarts,
        "guests": [{"name": g.name, "label": g.label, "socket": str(c.guest_socket(g.name)),
                    "connections": [], **per_guest.get(g.name, {}),
                    "sockets": {gs.wtype: str(gs.path) for gs, s in hv.listeners
                                if gs.guest == g.name and s.family == socket.AF_UNIX}}
                   for g in c.guests.values()],
        "integrity_events": hv.integrity_events[-20:],
        "attachments": await hv.store.status(),  # XenBus states, read from the store
    }
