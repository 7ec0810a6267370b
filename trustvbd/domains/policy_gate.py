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
        self.generation = 0  # policy loads seen: a decision made across one is made again

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

    def policy_changed(self) -> None:
        """A new policy is loaded: decisions still in flight are taken again under it."""
        self.generation += 1

    async def attach(self, peer: PeerInfo, guest: str, guest_label: str, disk: str,
                     disk_label: str) -> Decision:
        """Check (b), then the Chinese Wall; both under the policy in force when it returns
        (a handshake still deciding when a policy is loaded is decided again)."""
        while True:
            generation = self.generation
            decision = await self.check(guest, guest_label, disk, disk_label)
            if decision.allowed:
                cid = f"{guest}/{disk}/{next(self._ids)}"
                wall = await self.client.chw_attach(cid, guest_label, guest)
                if generation == self.generation:
                    if wall.allowed:
                        self.attachments[(id(peer), disk)] = cid
                    return decision if wall.allowed else wall
                if wall.allowed:
                    await self.client.chw_detach(cid)
            elif generation == self.generation:
                return decision

    def wall_lost(self, peer: PeerInfo, disk: str) -> bool:
        """Its Chinese Wall attachment could not be restored on a restarted access-control
        domain (another type of its conflict set runs now): it must not go on."""
        cid = self.attachments.get((id(peer), disk))
        return cid is not None and cid in self.client.lost

    async def detach(self, peer: PeerInfo, guest: str, disk: str) -> None:
        cid = self.attachments.pop((id(peer), disk), None)
        if cid in self.client.lost:  # never restored: nothing to detach
            self.client.lost.remove(cid)
        elif cid is not None:
            await self.client.chw_detach(cid)
