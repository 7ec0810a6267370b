"""The encryption domain's view of policy: check (b), may this guest use this disk.

The decisions themselves are made by the access-control domain; this module only
asks and enforces. With no policy configured (Xen's NULL policy) everything is
allowed and `up` has already warned loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from trustvbd.domains.control import ControlChannel
from trustvbd.nbd.server import PeerInfo


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str


class PolicyGate(Protocol):
    def may_list(self, guest: str, guest_label: str, disk: str, disk_label: str) -> bool: ...

    async def check(self, guest: str, guest_label: str, disk: str, disk_label: str) -> Decision: ...

    async def attach(self, peer: PeerInfo, guest: str, guest_label: str, disk: str,
                     disk_label: str) -> Decision: ...

    async def detach(self, peer: PeerInfo, guest: str, disk: str) -> None: ...


class NullGate:
    """No policy: every guest may use every disk."""

    def may_list(self, guest: str, guest_label: str, disk: str, disk_label: str) -> bool:
        return True

    async def check(self, guest: str, guest_label: str, disk: str, disk_label: str) -> Decision:
        return Decision(True, "null-policy", "no policy configured: everything is allowed")

    async def attach(self, peer: PeerInfo, guest: str, guest_label: str, disk: str,
                     disk_label: str) -> Decision:
        return await self.check(guest, guest_label, disk, disk_label)

    async def detach(self, peer: PeerInfo, guest: str, disk: str) -> None:
        return None


async def gate_from_spec(spec: dict[str, Any], control: ControlChannel) -> PolicyGate:
    if spec.get("acm_socket"):
        from trustvbd.domains.acm_gate import AcmGate

        return await AcmGate.connect(spec, control)
    return NullGate()
