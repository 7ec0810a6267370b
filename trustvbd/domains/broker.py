"""The hypervisor's channel broker: every channel between domains, created only once allowed.

As Xen's grant-map and event-channel hooks asked sHype before a channel existed,
the broker asks the access-control domain first — STE: the two domains' labels
must share a type; for a driver and a disk, check (a) too — and only then
connects and hands the descriptor over (SCM_RIGHTS, by the caller). No domain
reaches another by a path. Every decision, refusals included, is in the audit
log (the access-control domain writes it before it answers).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustvbd.acm.client import AcmClient
from trustvbd.config import Config
from trustvbd.nbd.uri import parse_uri

CONNECT_TIMEOUT = 10.0


class ChannelRefused(PermissionError):
    """The access-control domain said no; the message names both sides and the reason."""


@dataclass
class Endpoint:
    """One side of a channel as policy sees it."""

    name: str
    label: str
    what: str = ""  # how messages name it: "the encryption domain", "driver 'a'"

    def __str__(self) -> str:
        return self.what or f"domain {self.name!r}"


class ChannelBroker:
    def __init__(self, config: Config, acm: AcmClient, trusted_label: str,
                 export_token: Callable[[str], str]) -> None:
        self.config, self.acm = config, acm
        self.trusted_label = trusted_label  # the policy's bootstrap label (Xen's dom0)
        self.export_token = export_token  # a disk's opaque export name on our own drivers

    @property
    def crypt(self) -> Endpoint:
        return Endpoint("crypt", self.trusted_label, "the encryption domain")

    async def allow(self, a: Endpoint, b: Endpoint) -> None:
        """STE between two domains, as Xen's event channels; ChannelRefused if they share no type."""
        decision = await self.acm.channel(a.name, a.label, b.name, b.label)
        if not decision.allowed:
            raise ChannelRefused(f"policy forbids a channel between {a} (label {a.label})"
                                 f" and {b} (label {b.label}): {decision.reason}")

    async def check_replica(self, disk_name: str, replica: str) -> None:
        """Check (a): may this driver serve this disk, and talk to the encryption domain?"""
        disk, drv = self.config.disks.get(disk_name), self.config.drivers.get(replica)
        if disk is None or drv is None or replica not in disk.replicas:
            raise KeyError(f"disk {disk_name!r} has no replica {replica!r}")
        decision = await self.acm.driver_may_serve_disk(drv.name, drv.label, disk.name,
                                                        disk.label)
        if not decision.allowed:
            raise ChannelRefused(
                f"policy forbids driver {drv.name!r} (label {drv.label}) to serve disk"
                f" {disk.name!r} (label {disk.label}): {decision.reason}")
        await self.allow(self.crypt, Endpoint(drv.name, drv.label, f"driver {drv.name!r}"))

    async def replica_channel(self, disk_name: str,
                              replica: str) -> tuple[socket.socket, str, str | None]:
        """Check (a), then a connected socket to the replica's driver, the export to ask for,
        and the name its TLS certificate must carry (None: no TLS)."""
        await self.check_replica(disk_name, replica)
        drv = self.config.drivers[replica]
        target: Any
        tls_name = None
        if drv.dir is not None:
            export, target = self.export_token(disk_name), str(self.config.driver_socket(replica))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            assert drv.uri is not None
            uri = parse_uri(drv.uri)
            export = uri.export
            tls_name = uri.server_name if uri.tls else None
            if uri.transport == "unix":
                sock, target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), uri.socket_path
            else:
                family = socket.AF_INET6 if ":" in (uri.host or "") else socket.AF_INET
                sock, target = socket.socket(family, socket.SOCK_STREAM), (uri.host, uri.port)
        return await self._connect(sock, target, f"driver {replica!r}"), export, tls_name

    async def acm_channel(self, requester: Endpoint) -> socket.socket:
        """A connection to the access-control domain, for a domain allowed to talk to it."""
        await self.allow(requester, Endpoint("acm", self.trusted_label,
                                             "the access-control domain"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return await self._connect(sock, str(self.config.acm_socket), "the access-control domain")

    @staticmethod
    async def _connect(sock: socket.socket, target: Any, what: str) -> socket.socket:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, target)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise ConnectionError(f"cannot reach {what} at {target}: {exc or 'timed out'}"
                                  ) from None
        return sock
