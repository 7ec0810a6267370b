"""The encryption domain's XenBus states: its guests' attachments and its replica channels.

Directories come from the launcher (`spec["store"]`, see hv_store). The walk:

- a guest's attachment: backend InitWait (2) once the domain serves; on a guest's
  first connection to the disk frontend Initialised (3), backend Connected (4),
  frontend Connected (4); when its last connection closes frontend Closing (5),
  Closed (6) and backend InitWait (2) again, ready for the next one.
- a replica channel (this domain is the frontend): Initialised (3) while asking the
  launcher for it, Connected (4) once the NBD handshake is done, Closed (6) if it
  failed or when the domain stops.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from trustvbd.domains.bus import StateWriter
from trustvbd.xenstore.xenbus import State


class CryptBus:
    def __init__(self, writer: StateWriter, spec: dict[str, Any] | None) -> None:
        self.writer = writer
        spec = spec or {}
        self.guests: dict[str, dict[str, dict[str, str]]] = spec.get("guests", {})
        self.replicas: dict[str, dict[str, str]] = spec.get("replicas", {})
        self.connections: Counter[tuple[str, str]] = Counter()

    def serving(self) -> None:
        for disks in self.guests.values():
            for dirs in disks.values():
                self.writer.set_state(dirs["backend"], State.INIT_WAIT)

    def replica(self, disk: str, replica: str, state: State) -> None:
        directory = self.replicas.get(disk, {}).get(replica)
        if directory is not None:
            self.writer.set_state(directory, state)

    def attached(self, guest: str, disk: str) -> None:
        self.connections[(guest, disk)] += 1
        dirs = self.guests.get(guest, {}).get(disk)
        if dirs is not None and self.connections[(guest, disk)] == 1:
            self.writer.set_state(dirs["frontend"], State.INITIALISED)
            self.writer.set_state(dirs["backend"], State.CONNECTED)
            self.writer.set_state(dirs["frontend"], State.CONNECTED)

    def detached(self, guest: str, disk: str) -> None:
        if self.connections[(guest, disk)] <= 0:
            return
        self.connections[(guest, disk)] -= 1
        dirs = self.guests.get(guest, {}).get(disk)
        if dirs is not None and self.connections[(guest, disk)] == 0:
            self.writer.set_state(dirs["frontend"], State.CLOSING)
            self.writer.set_state(dirs["frontend"], State.CLOSED)
            self.writer.set_state(dirs["backend"], State.INIT_WAIT)

    async def close(self) -> None:
        """The domain stops: every attachment and channel is closed."""
        for guest, disks in self.guests.items():
            for disk, dirs in disks.items():
                if self.connections[(guest, disk)]:
                    self.writer.set_state(dirs["frontend"], State.CLOSED)
                self.writer.set_state(dirs["backend"], State.CLOSED)
        for channels in self.replicas.values():
            for directory in channels.values():
                self.writer.set_state(directory, State.CLOSED)
        await self.writer.close()
