"""What the NBD server serves, and the interface that decides who gets what.

The server knows nothing about policy: for every export a client asks for,
it calls an `ExportProvider` (the encryption domain checks its access-control
decision there; the driver domain just maps a name to a file). A refusal is an
`ExportRefused`, whose message reaches the client as the text of the
NBD_REP_ERR_* reply, so qemu-io and nbdinfo print it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from trustvbd.blockdev import Backend
from trustvbd.nbd.protocol import Rep


@dataclass
class PeerInfo:
    """Who is on the other end of one connection."""

    identity: str  # the guest name the listening socket belongs to
    address: str  # printable transport address
    certificate: str = ""  # the verified TLS client certificate's Common Name, if any


@dataclass
class Export:
    name: str
    backend: Backend
    description: str = ""


class ExportRefused(Exception):
    """The provider will not open an export for this peer.

    kind: "unknown" -> NBD_REP_ERR_UNKNOWN, "policy" -> NBD_REP_ERR_POLICY,
    "unavailable" -> NBD_REP_ERR_SHUTDOWN (the export exists but cannot be
    served now; the client is told to disconnect).
    """

    REPLIES = {
        "unknown": Rep.ERR_UNKNOWN, "policy": Rep.ERR_POLICY, "unavailable": Rep.ERR_SHUTDOWN,
    }

    def __init__(self, kind: str, message: str) -> None:
        if kind not in self.REPLIES:
            raise ValueError(
                f"ExportRefused kind must be one of {sorted(self.REPLIES)}, not {kind!r}"
            )
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def reply(self) -> Rep:
        return self.REPLIES[self.kind]


class ExportProvider(Protocol):
    def list_exports(self, peer: PeerInfo) -> list[tuple[str, str]]:
        """(name, description) of every export this peer may see (NBD_OPT_LIST)."""
        ...

    async def open_export(self, peer: PeerInfo, name: str) -> Export:
        """Open `name` for `peer` (GO, EXPORT_NAME, INFO) or raise ExportRefused."""
        ...

    def knows(self, peer: PeerInfo, name: str) -> bool:
        """Whether `name` ("": the default) names an export `peer` may see: the ones
        LIST and SET_META_CONTEXT may speak of. Decides nothing; opening still may refuse."""
        ...

    def release_export(self, peer: PeerInfo, export: Export) -> None:
        """The connection is done with an export it opened (disconnect, or after INFO)."""
        ...


class StaticExports:
    """An ExportProvider over a fixed dict of exports, visible to everyone (tests, drivers)."""

    def __init__(self, exports: dict[str, Export] | list[Export]) -> None:
        if isinstance(exports, list):
            exports = {e.name: e for e in exports}
        self.exports = exports
        self.open_count: dict[str, int] = {}

    def list_exports(self, peer: PeerInfo) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.exports.values()]

    async def open_export(self, peer: PeerInfo, name: str) -> Export:
        export = self.exports.get(name)
        if export is None:
            raise ExportRefused("unknown", f"no export named {name!r} on this server")
        self.open_count[name] = self.open_count.get(name, 0) + 1
        return export

    def knows(self, peer: PeerInfo, name: str) -> bool:
        return name in self.exports

    def release_export(self, peer: PeerInfo, export: Export) -> None:
        self.open_count[export.name] -= 1
