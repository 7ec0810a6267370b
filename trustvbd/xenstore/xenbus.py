"""XenBus device states (xen/include/public/io/xenbus.h) and how a state key is written.

A frontend and its backend each keep a `state` key in their directory and walk it:
Initialising (1) while being set up, InitWait (2) when a backend waits for its
frontend, Initialised (3) when a frontend has said what it needs, Connected (4),
Closing (5), Closed (6). The value is the decimal number, as Xen writes it.
"""

from __future__ import annotations

from enum import IntEnum


class State(IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    @property
    def title(self) -> str:
        return {"INIT_WAIT": "InitWait"}.get(self.name, self.name.title())


def parse_state(raw: bytes) -> State:
    """The state a `state` key holds; UNKNOWN for anything that is not one."""
    try:
        return State(int(raw))
    except ValueError:
        return State.UNKNOWN
