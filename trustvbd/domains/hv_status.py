"""What `trustvbd status` shows: the hypervisor's view of every domain, plus the disks and
guests as the encryption domain reports them."""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from trustvbd.domains import messages as m
from trustvbd.domains.control import ControlChannel, ControlClosed
from trustvbd.domains.placement import file_safe

if TYPE_CHECKING:
    from trustvbd.domains.hv import Launcher

CRYPT_STATUS_TIMEOUT = 10.0
STORE_STATUS_TIMEOUT = 5.0
COUNTERS = ("memory", "memory_peak", "decisions_waited")  # summed over encryption domains


async def _ask_crypt(channel: ControlChannel | None, state: str) -> m.CryptStatus | str:
    """An encryption domain's status, or why there is none (said in place of its disks).
    `state`: the domain's in the supervisor's list; one paused by a signal is not asked
    (it cannot answer: the whole `status` would wait the timeout)."""
    if channel is None or channel.closed.is_set():
        return "is not running (see domains)"
    if state.startswith("paused"):
        return f"is {state}"
    try:
        crypt, _ = await channel.ask(m.StatusQuery(), m.CryptStatus, timeout=CRYPT_STATUS_TIMEOUT)
    except TimeoutError:
        return f"did not answer within {CRYPT_STATUS_TIMEOUT:g} s (stopped or overloaded?)"
    except (ControlClosed, ValueError):
        return "is not running (see domains)"
    return crypt if isinstance(crypt, m.CryptStatus) else "gave no status"


async def gather_status(hv: Launcher) -> m.HvStatus:
    c = hv.config
    me = m.DomainStatus("hv", "hv", True, "", os.getpid(), "running", 0, None, None, [os.getpid()])
    disks: list[dict[str, Any]] = []
    aead_threads = 0
    per_guest: dict[str, dict[str, Any]] = {}
    # Every encryption domain at once: one that does not answer costs the timeout once.
    names = {wtype: f"crypt-{file_safe(wtype)}" for wtype in hv.types}
    domains = hv.supervisor.status()
    states = {d["name"]: d for d in domains}
    answers = await asyncio.gather(*(
        _ask_crypt(hv.crypt_channels.get(name), states[name]["state"] if name in states else "")
        for name in names.values()))
    for (wtype, name), crypt in zip(names.items(), answers, strict=True):
        told = [] if isinstance(crypt, str) else crypt.disks
        disks += [{**d, "domain": name} for d in told]
        # Its disks are listed even when it does not say, with why: a hung or restarting
        # domain left them out, as if the config had none.
        why = crypt if isinstance(crypt, str) else "is starting"
        disks += [{"name": d.name, "size": d.size, "label": d.label, "encrypt": d.encrypt,
                   "state": f"unknown: its encryption domain {name} {why}",
                   "integrity_events": None, "replicas": [], "domain": name}
                  for d in (c.disks[n] for n in hv.types[wtype])
                  if all(t.get("name") != d.name for t in told)]
        if isinstance(crypt, str):
            if crypt.startswith("did not answer") and name in states:
                states[name]["state"] += f", but {crypt}"  # not only in its disks' lines
            continue
        aead_threads += crypt.aead_threads
        for g in crypt.guests:  # a guest may reach several encryption domains
            into = per_guest.setdefault(str(g.get("name")), {"connections": []})
            into["connections"] += g.get("connections") or []
            for key in COUNTERS:
                if type(g.get(key)) is int:
                    into[key] = into.get(key, 0) + g[key]
    # The store's view, bounded as an encryption domain's: one stopped answers nothing.
    store_state = states["store"]["state"] if "store" in states else ""
    attachments, answered = await hv.store.status(
        None if store_state.startswith("paused") else STORE_STATUS_TIMEOUT)
    if not answered and hv.store.attachments and "store" in states \
            and not store_state.startswith("paused"):
        states["store"]["state"] += (f", but did not answer within {STORE_STATUS_TIMEOUT:g} s"
                                     " (stopped or overloaded?)")
    order = list(c.disks)
    return m.HvStatus(
        pid=os.getpid(),
        state_dir=str(c.state_dir),
        config=str(c.path),
        policy=hv.policy_path,
        uptime=round(time.time() - hv.started, 1),
        domains=[me, *(m.DomainStatus(**d) for d in domains)],
        disks=sorted(disks, key=lambda d: order.index(d["name"]) if d["name"] in order else 0),
        aead_threads=aead_threads,
        guests=[m.GuestStatus(
            name=g.name, label=g.label, socket=str(c.guest_socket(g.name)),
            sockets={gs.wtype: str(gs.path) for gs, s in hv.listeners
                     if gs.guest == g.name and s.family == socket.AF_UNIX},
            **per_guest.get(g.name, {"connections": []})) for g in c.guests.values()],
        integrity_events=hv.integrity_events[-20:],
        attachments=attachments,  # XenBus states, read from the store
        policy_loading=loading(hv.policy_loading),
    )


def loading(policy_loading: tuple[str, float] | None) -> dict[str, Any] | None:
    """The policy load in progress (its file, asked when: monotonic time), as status says it."""
    if policy_loading is None:
        return None
    path, since = policy_loading
    seconds = time.monotonic() - since
    asked = datetime.datetime.fromtimestamp(time.time() - seconds, datetime.UTC)
    return {"path": path, "since": asked.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "seconds": round(seconds, 1)}
