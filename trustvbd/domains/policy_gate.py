"""Check (b) in the encryption domain: may this guest use this disk?

The access-control domain decides (with no policy configured it runs Xen's NULL
policy and allows everything); this module only asks and enforces.

Fail-closed: the AcmClient turns an unreachable, slow or garbled access-control
domain into a deny. LIST needs an answer without waiting, so the guest/disk
matrix is fetched at start and after every policy change; opening a disk always
asks afresh.
"""

from __future__ import annotations

import itertools

from trustvbd.acm.client import AcmClient
from trustvbd.acm.decisions import Decision
from trustvbd.domains.messages import DiskSpec
from trustvbd.nbd.server import PeerInfo


class PolicyGate:
    def __init__(self, client: AcmClient, guest_labels: dict[str, str],
                 disks: list[DiskSpec]) -> None:
        self.client = client
        self.guest_labels, self.disks = guest_labels, disks
        self.visible: set[tuple[str, str]] = set()
        self.attachments: dict[tuple[int, str], str] = {}
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, client: AcmClient, guest_labels: dict[str, str],
                      disks: list[DiskSpec]) -> PolicyGate:
        gate = cls(client, guest_labels, disks)
        await gate.refresh()
        return gate

    async def refresh(self) -> None:
        """Recompute which disks each guest may see (after start and every policy change)."""
        visible = set()
        for guest, label in self.guest_labels.items():
            for d in self.disks:
                if (await self.check(guest, label, d.name, d.label)).allowed:
                    visible.add((guest, d.name))
        self.visible = visible

    def may_list(self, guest: str, guest_label: str, disk: str, disk_label: str) -> bool:
        return (guest, disk) in self.visible

    async def check(self, guest: str, guest_label: str, disk: str, disk_label: str) -> Decision:
        return await self.client.guest_may_use_disk(guest, guest_label, disk, disk_label)

    async def attach(self, peer: PeerInfo, guest: str, guest_label: str, disk: str,
                     disk_label: str) -> Decision:
        decision = await self.check(guest, guest_label, disk, disk_label)
        if not decision.allowed:
            return decision
        cid = f"{guest}/{disk}/{next(self._ids)}"
        wall = await self.client.chw_attach(cid, guest_label, guest)
        if not wall.allowed:
            return wall
        self.attachments[(id(peer), disk)] = cid
        return decision

    async def detach(self, peer: PeerInfo, guest: str, disk: str) -> None:
        cid = self.attachments.pop((id(peer), disk), None)
        if cid is not None:
            await self.client.chw_detach(cid)
