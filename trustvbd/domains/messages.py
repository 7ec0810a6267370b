"""Typed messages between domains, and the error codes that cross processes.

Every message on a control channel (domains/control.py) and on the CLI's control
socket is one of the dataclasses below. On the wire it is one JSON object:
{"type": NAME, ...its fields}, plus the channel's own "id"/"reply_to". `decode`
checks everything: an unknown type, a missing or unexpected field, or a field of
the wrong type is a MessageError that says which message and which field. Errors
cross as an ErrorCode (a closed set, stable on the wire), never as a class name.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, ClassVar, TypeVar

M = TypeVar("M", bound="Message")


class MessageError(ValueError):
    """A message that is not one of ours, or not well formed."""


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
    INTERNAL = "internal"  # anything else: a bug; the message says what


class Message:
    """Base of every message; subclasses are dataclasses registered with @message."""

    TYPE: ClassVar[str]

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, **_plain(dataclasses.asdict(self))}  # type: ignore[call-overload]


_REGISTRY: dict[str, type[Message]] = {}


@typing.dataclass_transform()
def message(name: str) -> typing.Callable[[type[M]], type[M]]:
    """Register a message dataclass under its wire name."""

    def register(cls: type[M]) -> type[M]:
        if name in _REGISTRY:
            raise ValueError(f"message type {name!r} registered twice")
        cls.TYPE = name
        _REGISTRY[name] = cls
        return dataclasses.dataclass(frozen=True)(cls)

    return register


def decode(data: object, *expected: type[M]) -> M:
    """The message in `data` (a decoded JSON object); MessageError if it is none of `expected`
    (any registered message when none are given)."""
    if not isinstance(data, dict):
        raise MessageError(f"a message is a JSON object, not {type(data).__name__}")
    name = data.get("type")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or (expected and cls not in expected):
        wanted = ", ".join(c.TYPE for c in expected) if expected else "a known message type"
        raise MessageError(f"unexpected message type {name!r}; expected {wanted}")
    fields = {k: v for k, v in data.items() if k not in ("type", "id", "reply_to")}
    return typing.cast(M, _build(cls, fields, cls.TYPE))


def _build(cls: type, fields: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    unknown = set(fields) - set(hints)
    if unknown:
        raise MessageError(f"{where}: unexpected field(s) {', '.join(sorted(unknown))}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{where}: field {f.name!r} is missing")
            continue
        values[f.name] = _check(hints[f.name], fields[f.name], f"{where}.{f.name}")
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(arg, value, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {value!r:.60} is not {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            return [_check(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: _check(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            pass
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return _build(hint, value, where)  # type: ignore[arg-type]
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if type(value) is int:
            return value
    elif isinstance(value, hint):
        return value
    raise MessageError(f"{where}: {value!r:.60} is not {getattr(hint, '__name__', hint)}")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


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
