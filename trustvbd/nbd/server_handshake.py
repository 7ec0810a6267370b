"""The server's side of option haggling: answer options until the client picks an export.

Runs as one coroutine per connection (options are strictly one at a time, so
there is nothing to pipeline). It talks to the connection only through a few
callables, so it can be driven in memory by tests.

TLS is the spec's FORCEDTLS mode: until NBD_OPT_STARTTLS every option but ABORT
is answered NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot carry an error, is
hung up on). After the TLS handshake the client certificate's Common Name must
be the guest this port serves. A connection whose identity is refused (another
guest's certificate, another uid on a Unix socket) gets NBD_REP_ERR_POLICY with
the reason for every option, and the first one that would open or list an
export ends it.

Metadata contexts: the one offered is `base:allocation` (holes and zeros, for
NBD_CMD_BLOCK_STATUS), only with structured replies. LIST_META_CONTEXT names it for
no query, `base:` or itself; SET_META_CONTEXT selects it for the export named there,
and the export then chosen by GO or EXPORT_NAME gets it only if it is that one (each
SET replaces the last). Other queries are ignored, as the spec says; an export name the
client could not open is NBD_REP_ERR_UNKNOWN.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.checks import export_flags
from trustvbd.nbd.core import ProtocolCore
from trustvbd.nbd.exports import Export, ExportProvider, ExportRefused, PeerInfo

log = logging.getLogger("trustvbd.nbd.server")

GREETING_FLAGS = p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES
Rep = p.Rep
ALLOCATION = "base:allocation"
ALLOCATION_ID = 1  # our id for base:allocation, the one context we offer


@dataclass
class Negotiated:
    """The outcome of a successful handshake."""

    export: Export
    flags: int  # transmission flags sent to the client
    name: str = ""  # the export name the client asked for (before defaults)


class HandshakeEnded(Exception):
    """The handshake ended without an export (client left, aborted, or was refused).

    `reported`: the reason was already logged and audited as a refusal (Identity.refused),
    so the caller does not log it a second time."""

    def __init__(self, reason: str, *, reported: bool = False) -> None:
        super().__init__(reason)
        self.reported = reported


@dataclass
class TlsRequired:
    """This port requires TLS: `start` upgrades the connection (after our ACK to
    STARTTLS) and returns the verified client certificate's Common Name, which
    must be `name`. `start` raises HandshakeEnded when the TLS handshake fails."""

    start: Callable[[], Awaitable[str]]
    name: str


@dataclass
class Identity:
    """What negotiate() needs to know about who is connecting."""

    tls: TlsRequired | None = None
    refusal: str | None = None  # set: this peer is not who the port serves; say why
    refused: Callable[[str], None] = field(default=lambda reason: None)  # audit hook, once
    # NBD_OPT_TRUSTVBD_RING offered (docs/driver-ring.md): after our RING_SEND reply,
    # receive the ring of this many bytes; None if agreed, else why not
    ring: Callable[[int], Awaitable[str | None]] | None = None


_DECISIVE = (p.Opt.GO, p.Opt.INFO, p.Opt.LIST)
MAX_OPTIONS = 256  # per handshake: no honest client needs more; a loop of them ends here


async def negotiate(
    core: ProtocolCore,
    next_event: Callable[[], Awaitable[m.Event]],
    write: Callable[[bytes], None],
    provider: ExportProvider,
    peer: PeerInfo,
    identity: Identity | None = None,
) -> Negotiated:
    """Answer options until GO or EXPORT_NAME succeeds; raise HandshakeEnded otherwise."""
    who = identity or Identity()
    tls_pending = who.tls is not None
    refusal = who.refusal
    options = 0
    meta: str | None = None  # the export SET_META_CONTEXT selected base:allocation for

    def chosen(result: Negotiated) -> Negotiated:
        core.meta_context = ALLOCATION_ID if meta is not None and meta == result.name else 0
        return result

    def reply(option: int, rep: int, data: bytes = b"") -> None:
        write(core.send(m.OptionReply(option, rep, data)))

    def error(option: int, rep: int, text: str) -> None:
        reply(option, rep, m.encode_message_text(text))

    while True:
        ev = await next_event()
        if isinstance(ev, m.ConnectionClosed):
            raise HandshakeEnded("client closed the connection during the handshake")
        if isinstance(ev, m.ClientFlags):
            continue
        assert isinstance(ev, m.Option)
        opt, data = ev.option, ev.data
        options += 1
        if options > MAX_OPTIONS:
            raise HandshakeEnded(f"more than {MAX_OPTIONS} options in one handshake; closing")
        if opt == p.Opt.ABORT:
            reply(opt, Rep.ACK)
            raise HandshakeEnded("client aborted the handshake")
        if tls_pending:
            assert who.tls is not None
            if opt == p.Opt.EXPORT_NAME:
                raise HandshakeEnded("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS port (hung up:"
                                     " that option cannot carry an error)")
            if opt != p.Opt.STARTTLS:
                error(opt, Rep.ERR_TLS_REQD, "this port requires TLS: connect with nbds:// and"
                      " the guest's client certificate")
                continue
            if data:
                error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                continue
            reply(opt, Rep.ACK)
            common_name = await who.tls.start()
            tls_pending = False
            peer.certificate = common_name
            if common_name != who.tls.name:
                refusal = (f"the client certificate is for {common_name!r}, but this port serves"
                           f" guest {who.tls.name!r}; use that guest's certificate")
                who.refused(refusal)
            continue
        if refusal is not None:
            if opt == p.Opt.EXPORT_NAME:
                raise HandshakeEnded(f"refused: {refusal}", reported=True)
            error(opt, Rep.ERR_POLICY, refusal)
            if opt in _DECISIVE:
                raise HandshakeEnded(f"refused: {refusal}", reported=True)
            continue
        if opt == p.Opt.EXPORT_NAME:
            try:
                name = m.decode_name(data)
                export = await provider.open_export(peer, name)
            except (ValueError, ExportRefused) as exc:
                # This option cannot carry an error: the spec says hang up.
                raise HandshakeEnded(f"export refused: {exc}") from exc
            flags = export_flags(export.backend.capabilities, core.structured)
            write(core.send(m.ExportNameReply(export.backend.size, flags)))
            return chosen(Negotiated(export, flags, name))
        if opt in (p.Opt.GO, p.Opt.INFO):
            result = await _go_or_info(core, opt, data, reply, error, provider, peer)
            if result is not None:
                return chosen(result)
        elif opt == p.Opt.LIST:
            if data:
                error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                continue
            for name, description in provider.list_exports(peer):
                reply(opt, Rep.SERVER, m.encode_server(name, description))
            reply(opt, Rep.ACK)
        elif opt == p.Opt.STRUCTURED_REPLY:
            if data:
                error(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif core.structured:  # as qemu-nbd and nbdkit answer; they stay negotiated
                error(opt, Rep.ERR_INVALID, "structured replies are already negotiated on this"
                      " connection")
            else:
                reply(opt, Rep.ACK)
        elif opt in (p.Opt.LIST_META_CONTEXT, p.Opt.SET_META_CONTEXT):
            if opt == p.Opt.SET_META_CONTEXT:
                meta = None
            selected = _meta_context(core.structured, opt, data, reply, error,
                                     lambda name: provider.knows(peer, name))
            if selected is not None:
                meta = selected
        elif opt == p.Opt.TRUSTVBD_RING and who.ring is not None:
            if len(data) != 8:
                error(opt, Rep.ERR_INVALID, "NBD_OPT_TRUSTVBD_RING takes the ring's size, 8 bytes")
                continue
            reply(opt, Rep.TRUSTVBD_RING_SEND)
            why = await who.ring(int.from_bytes(data, "big"))
            if why is None:
                reply(opt, Rep.ACK)
            else:
                error(opt, Rep.ERR_INVALID, f"ring refused: {why}")
        elif opt == p.Opt.STARTTLS:
            if who.tls is not None:
                error(opt, Rep.ERR_INVALID, "TLS is already running on this connection")
            else:
                error(opt, Rep.ERR_UNSUP, "this port does not offer TLS (TLS is on the guest's"
                      " TCP port, when configured)")
        else:
            error(opt, Rep.ERR_UNSUP, f"option {p.name_of(p.Opt, opt)} is not supported")


def _meta_context(
    structured: bool,
    opt: int,
    data: bytes,
    reply: Callable[..., None],
    error: Callable[[int, int, str], None],
    known: Callable[[str], bool],
) -> str | None:
    """Answer LIST or SET_META_CONTEXT; for a SET that selects base:allocation, the
    export name it was selected for. An export this client cannot open or see is
    NBD_REP_ERR_UNKNOWN ("the requested export is not available"), as qemu-nbd answers."""
    what = p.name_of(p.Opt, opt)
    if not structured:
        error(opt, Rep.ERR_INVALID, f"{what} needs structured replies: send"
              " NBD_OPT_STRUCTURED_REPLY first")
        return None
    try:
        name, queries = m.parse_meta_context(data)
    except ValueError as exc:
        error(opt, Rep.ERR_INVALID, f"malformed {what}: {exc}")
        return None
    if not known(name):
        error(opt, Rep.ERR_UNKNOWN, f"{what}: no export named {name!r} here (NBD_OPT_LIST names"
              " those this client may use)")
        return None
    listing = opt == p.Opt.LIST_META_CONTEXT
    wanted = ALLOCATION in queries or (listing and (not queries or "base:" in queries))
    if wanted:
        reply(opt, Rep.META_CONTEXT, m.encode_meta_context(0 if listing else ALLOCATION_ID,
                                                           ALLOCATION))
    reply(opt, Rep.ACK)
    return name if wanted and not listing else None


async def _go_or_info(
    core: ProtocolCore,
    opt: int,
    data: bytes,
    reply: Callable[..., None],
    error: Callable[[int, int, str], None],
    provider: ExportProvider,
    peer: PeerInfo,
) -> Negotiated | None:
    try:
        name, infos = m.parse_go(data)
    except ValueError as exc:
        error(opt, Rep.ERR_INVALID, f"malformed {p.name_of(p.Opt, opt)}: {exc}")
        return None
    try:
        export = await provider.open_export(peer, name)
    except ExportRefused as exc:
        log.info("nbd: refused export %r to %s (%s): %s", name, peer.identity, exc.kind, exc)
        error(opt, exc.reply, exc.message)
        return None
    except Exception:
        log.exception("nbd: opening export %r for %s failed", name, peer.identity)
        error(opt, Rep.ERR_SHUTDOWN, f"export {name!r} could not be opened (server error)")
        return None
    try:
        backend = export.backend
        flags = export_flags(backend.capabilities, core.structured)
        if p.Info.NAME in infos:
            reply(opt, Rep.INFO, m.info_name(export.name))
        if p.Info.DESCRIPTION in infos and export.description:
            reply(opt, Rep.INFO, m.info_description(export.description))
        reply(opt, Rep.INFO, m.info_block_size(p.MIN_BLOCK, p.PREFERRED_BLOCK,
                                                 p.ADVERTISED_MAX_PAYLOAD))
        reply(opt, Rep.INFO, m.info_export(backend.size, flags))
        reply(opt, Rep.ACK)
    except BaseException:
        provider.release_export(peer, export)
        raise
    if opt == p.Opt.INFO:
        provider.release_export(peer, export)
        return None
    return Negotiated(export, flags, name)
