"""Typed messages between domains, and the error codes that cross processes.

Every message on a control channel (domains/control.py) and on the CLI's control
socket is one of the dataclasses below, checked field by field when it is read
(`decode`, message_codec.py). Errors cross as an ErrorCode (a closed set, stable on
the wire), never as a class name.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from trustvbd.domains.message_codec import M as M
from trustvbd.domains.message_codec import Message as Message
from trustvbd.domains.message_codec import MessageError as MessageError
from trustvbd.domains.message_codec import decode as decode
from trustvbd.domains.message_codec import message as message


class ErrorCode(enum.Enum):
    BAD_MESSAGE = "bad-message"  # the request could not be read, or is not known
    POLICY_DENIED = "policy-denied"  # the access-control domain said no
    UNREACHABLE = "unreachable"  # a peer or driver cannot be reached
    UNKNOWN = "unknown"  # no such disk, replica or domain
    WRONG_KEY = "wrong-key"  # the passphrase or key file does not unlock the disk
    KEY_FILE = "key-file"  # a key file is missing or damaged
    STALE_REPLICA = "stale-replica"  # older than the trusted anchor
    FOREIGN_REPLICA = "foreign-replica"  # another disk's replica
    TRUSTED_STATE = "trusted-state"  # the trusted state directory is damaged
    INVALID = "invalid"  # a size, config value or argument is wrong
    BUSY = "busy"  # another such request is in progress: ask again once it is answered
    INTERNAL = "internal"  # anything else: a bug; the message says what


# -- replies any request may get ------------------------------------------------------
@message("done")
class Done(Message):
    pass


@message("failed")
class Failed(Message):
    code: ErrorCode
    message: str


def refusal(reply: Message, fallback: str) -> str:
    """What a reply other than the one asked for says: a Failed's message, else the fallback
    and the reply's type (a peer that answered with something else entirely)."""
    if isinstance(reply, Failed):
        return reply.message
    return f"{fallback} (the reply was {reply.TYPE!r})"


# -- hypervisor -> encryption domain -----------------------------------------------------
@message("status?")
class StatusQuery(Message):
    pass


@message("crypt-status")
class CryptStatus(Message):
    disks: list[dict[str, Any]]
    guests: list[dict[str, Any]]
    aead_threads: int


@message("scrub?")
class ScrubQuery(Message):
    """Scrub a disk (the CLI asks the hypervisor, which asks the disk's encryption domain)."""

    disk: str


@message("scrub-started")
class ScrubStarted(Message):
    already_running: bool


@message("stop")
class Stop(Message):
    pass


@message("policy-changed")
class PolicyChanged(Message):
    pass


@message("acm-restarted")
class AcmRestarted(Message):
    """The access-control domain was restarted: reconnect (restoring the Chinese Wall
    attachments), then check everything again."""


@message("rechecked")
class Rechecked(Message):
    closed: int  # connections the new policy forbids, now closed


@message("guest-sockets")
class GuestSockets(Message):
    """After a policy load: serve these new guest sockets too (their listening sockets come
    as fds, in order), stop serving the named guests' sockets, and the new `elsewhere`."""

    add: list[ListenerSpec]
    remove: list[str]
    elsewhere: dict[str, ElsewhereSpec]


# -- encryption domain -> hypervisor ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiskSpec:
    name: str
    label: str
    size: int
    encrypt: bool
    replicas: list[str]


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    label: str
    tls_name: str  # the Common Name its client certificate must carry
    uid: int | None  # only this uid (and root) may use its Unix socket


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    guest: str  # the guest a handed-over listening socket belongs to
    tls: bool  # TLS required on it


@dataclasses.dataclass(frozen=True)
class ElsewhereSpec:
    """A disk of another workload type: its label, and each guest's socket that reaches it."""

    label: str
    sockets: dict[str, str]


@message("spec?")
class SpecQuery(Message):
    pass


@message("spec")
class Spec(Message):
    """What an encryption domain serves; its listeners (one per guest) come as fds, in order."""

    state_dir: str
    request_timeout: float
    disks: list[DiskSpec]
    guests: dict[str, GuestSpec]
    listeners: list[ListenerSpec]
    tls_dir: str | None
    limits: dict[str, Any]  # config.Limits as a dict
    elsewhere: dict[str, ElsewhereSpec]  # other types' disks (names and labels only)
    store: dict[str, Any] | None = None  # its XenStore directories (domains/hv_store.py)
    # Its connection to the store did not come with the spec (the store did not answer in
    # time): it asks for one (StoreChannelQuery) until it gets it, and writes its states then.
    store_later: bool = False
    acm_hello: dict[str, str] | None = None  # its role and token for the access-control domain


@message("channel?")
class ChannelQuery(Message):
    """A channel to a replica's driver for a disk; granted with its fd, or Failed."""

    disk: str
    replica: str


@message("acm-channel?")
class AcmChannelQuery(Message):
    """A (new) channel to the access-control domain; granted with its fd, or Failed."""


@message("store-channel?")
class StoreChannelQuery(Message):
    """A (new) connection to the store, after a restart of it; granted as StoreConnected
    with its fd, or Failed."""


@message("domain-channel?")
class DomainChannelQuery(Message):
    """Any domain's request for a channel to another domain (check: STE shares a type)."""

    target: str


@message("channel")
class ChannelGranted(Message):
    export: str  # the NBD export name to ask for on it ("" when not NBD)
    tls_server_name: str | None = None  # NBD over TLS to a driver with this certificate name


@message("ready")
class Ready(Message):
    pass


@message("disk-failed")
class DiskFailed(Message):
    disk: str
    code: ErrorCode
    message: str


@message("integrity")
class Integrity(Message):
    disk: str
    event: dict[str, Any]


@message("unlock?")
class UnlockQuery(Message):
    """Unlock passphrase-protected disks that are locked (none named: every locked one).

    The passphrase never travels in a message: it comes with the request as the read end of
    a pipe (domains/unlock.py format), from the CLI to the hypervisor, and from there, in a
    new pipe, to each encryption domain holding one of the disks."""

    disks: list[str]


@message("unlocked")
class Unlocked(Message):
    unlocked: list[str]  # now serving
    wrong: list[str]  # the passphrase does not unlock them: still locked, nothing changed
    failed: dict[str, str]  # unlocked, but opening failed for another reason (the message)
    # its encryption domain did not answer (stopped, hung, gone): why, and what to do
    unanswered: dict[str, str] = dataclasses.field(default_factory=dict)


# -- hypervisor <-> store (domains/store.py, domains/hv_store.py) -------------------------
@message("store-introduce")
class StoreIntroduce(Message):
    """A domain that speaks no XenStore itself (a guest, a peer's server): its home, and
    the name and label pairings are checked under."""

    domid: int
    name: str
    label: str


@message("store-connect")
class StoreConnect(Message):
    """As StoreIntroduce, and a connection of its own: granted as StoreConnected + its fd."""

    domid: int
    name: str
    label: str


@message("store-connected")
class StoreConnected(Message):
    domid: int


@message("store-release")
class StoreRelease(Message):
    domid: int


@message("recheck-pairings")
class RecheckPairings(Message):
    """A new policy is loaded: ask again for every frontend/backend pairing in the tree."""


@dataclasses.dataclass(frozen=True)
class TornDown:
    frontend_dir: str
    backend_dir: str
    reason: str


@message("pairings-rechecked")
class PairingsRechecked(Message):
    kept: int
    torn_down: list[TornDown]


# -- the CLI -> hypervisor --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DomainStatus:
    name: str
    kind: str  # "hv" | "acm" | "store" | "crypt" | "driver"
    trusted: bool
    label: str
    pid: int | None
    state: str
    restarts: int
    last_exit: str | None
    next_retry: float | None  # seconds to the next start, when restarting
    pids: list[int] = dataclasses.field(default_factory=list)  # its pid and its children's
    cpus: list[int] | None = None  # the CPUs it is placed on (config `cpus`); None: any


@dataclasses.dataclass(frozen=True)
class GuestStatus:
    name: str
    label: str
    socket: str
    sockets: dict[str, str]  # workload type -> the guest's socket for it
    connections: list[dict[str, Any]]  # as its encryption domains report them
    memory: int | None = None  # held for it in encryption domains (None: none reported)
    memory_peak: int | None = None
    decisions_waited: int | None = None


@dataclasses.dataclass(frozen=True)
class AttachmentStatus:
    kind: str  # "guest" | "replica"
    frontend: str
    backend: str
    disk: str
    frontend_dir: str
    backend_dir: str
    frontend_state: int  # XenBus state read from the store (0: unknown)
    backend_state: int


@message("hv-status")
class HvStatus(Message):
    """`trustvbd status`. Disks and integrity events are as the encryption domains report
    them (CryptStatus)."""

    pid: int
    state_dir: str
    config: str
    policy: str | None
    uptime: float
    domains: list[DomainStatus]
    disks: list[dict[str, Any]]
    aead_threads: int
    guests: list[GuestStatus]
    integrity_events: list[dict[str, Any]]
    attachments: list[AttachmentStatus]
    # The policy load in progress: {"path", "since" (UTC, ISO 8601), "seconds"}; None: none.
    policy_loading: dict[str, Any] | None = None

    def plain(self) -> dict[str, Any]:
        """As `status --json` prints it: the fields, without the message type."""
        out = self.encode()
        del out["type"]
        return out


@message("policy-load")
class PolicyLoad(Message):
    path: str


@message("policy-loaded")
class PolicyLoaded(Message):
    name: str
    closed: int
    torn_down: int = 0  # frontend/backend pairings in the store the new policy forbids
    notes: list[str] = dataclasses.field(default_factory=list)  # what else the admin should know


def error_code(exc: BaseException) -> ErrorCode:
    """The code for an exception raised in a domain, for the other side of a channel."""
    from trustvbd.acm.model import PolicyError
    from trustvbd.blocks.disk_state import TrustedStateError
    from trustvbd.blocks.integrity import ForeignReplicaError, StaleReplicaError
    from trustvbd.crypt.keys import KeyFileError, WrongKeyError

    table: list[tuple[type[BaseException], ErrorCode]] = [
        (WrongKeyError, ErrorCode.WRONG_KEY), (KeyFileError, ErrorCode.KEY_FILE),
        (StaleReplicaError, ErrorCode.STALE_REPLICA),
        (ForeignReplicaError, ErrorCode.FOREIGN_REPLICA),
        (TrustedStateError, ErrorCode.TRUSTED_STATE), (PolicyError, ErrorCode.INVALID),
        (PermissionError, ErrorCode.POLICY_DENIED), (ConnectionError, ErrorCode.UNREACHABLE),
        (TimeoutError, ErrorCode.UNREACHABLE), (OSError, ErrorCode.UNREACHABLE),
        (MessageError, ErrorCode.BAD_MESSAGE), (KeyError, ErrorCode.UNKNOWN),
        (ValueError, ErrorCode.INVALID),
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return ErrorCode.INTERNAL
