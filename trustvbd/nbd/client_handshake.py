"""The client's side of option haggling, with everything the server says sanity-checked.

Asks for structured replies (optional), then NBD_OPT_GO with a block-size
request, falling back to NBD_OPT_EXPORT_NAME for servers without GO. Errors
become BlockError with the server's (sanitised) message and an errno that says
what kind of refusal it was.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from trustvbd.blockdev import BlockError
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.core import ProtocolCore

MAX_NONFINAL_REPLIES = 64  # INFO replies to one GO: a server sending more is stalling us

# Option refusal -> errno of the BlockError raised by connect().
_REFUSAL_ERRNO: dict[int, int] = {
    p.Rep.ERR_UNKNOWN: errno.ENOENT,
    p.Rep.ERR_POLICY: errno.EACCES,
    p.Rep.ERR_SHUTDOWN: errno.ESHUTDOWN,
    p.Rep.ERR_TLS_REQD: errno.EACCES,
    p.Rep.ERR_BLOCK_SIZE_REQD: errno.EINVAL,
}


@dataclass
class Handshake:
    size: int
    flags: int
    block_sizes: tuple[int, int, int] | None  # (minimum, preferred, maximum payload)
    structured: bool
    ring: bool = False  # NBD_OPT_TRUSTVBD_RING agreed: RING_WRITEs may be sent


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text[:300])


async def handshake(
    core: ProtocolCore,
    next_event: Callable[[], Awaitable[m.Event]],
    send: Callable[[m.Event], None],
    export: str,
    structured_replies: bool = True,
    starttls: Callable[[], Awaitable[None]] | None = None,
    ring: tuple[int, Callable[[], Awaitable[None]]] | None = None,
) -> Handshake:
    """Negotiate `export`; raise BlockError (refused, hung up) or ProtocolError.

    With `starttls`, TLS comes first (as the spec advises a client that insists on
    it): NBD_OPT_STARTTLS, and on its ACK `starttls()` upgrades the connection;
    any other answer ends the handshake, so nothing is ever said in plaintext.

    With `ring` (its size, and a coroutine that sends its descriptor), NBD_OPT_TRUSTVBD_RING
    is offered (docs/driver-ring.md); a server that does not take it is used without it.
    """

    tls_on = False

    async def expect(kind: type) -> m.Event:
        ev = await next_event()
        if isinstance(ev, m.ConnectionClosed):
            # TLS 1.3: a server checks our certificate after our side of the handshake is done.
            hint = " after TLS started (did it refuse our client certificate?)" if tls_on else ""
            raise BlockError(errno.EIO, f"server closed the connection during the handshake{hint}")
        if not isinstance(ev, kind):
            raise p.ProtocolError(f"expected {kind.__name__}, got {type(ev).__name__}")
        return ev

    async def final_reply(option: int) -> m.OptionReply:
        for _ in range(MAX_NONFINAL_REPLIES):
            reply = await expect(m.OptionReply)
            assert isinstance(reply, m.OptionReply)
            if reply.final:
                return reply
        raise p.ProtocolError(f"more than {MAX_NONFINAL_REPLIES} replies to one option")

    greeting = await expect(m.Greeting)
    assert isinstance(greeting, m.Greeting)
    flags = p.ClientFlag.C_FIXED_NEWSTYLE
    if greeting.flags & p.HandshakeFlag.NO_ZEROES:
        flags |= p.ClientFlag.C_NO_ZEROES
    send(m.ClientFlags(int(flags)))

    if starttls is not None:
        send(m.Option(p.Opt.STARTTLS))
        reply = await final_reply(p.Opt.STARTTLS)
        if reply.reply != p.Rep.ACK:
            text = _printable(reply.data.decode("utf-8", "replace"))
            raise BlockError(errno.EPROTO, "server will not start TLS (answered "
                             f"{p.name_of(p.Rep, reply.reply)}{': ' + text if text else ''});"
                             " refusing to go on without it")
        await starttls()
        tls_on = True

    if structured_replies:
        send(m.Option(p.Opt.STRUCTURED_REPLY))
        await final_reply(p.Opt.STRUCTURED_REPLY)  # an error just means simple replies

    agreed = False
    if ring is not None:
        size, send_fd = ring
        send(m.Option(p.Opt.TRUSTVBD_RING, size.to_bytes(8, "big")))
        first = await expect(m.OptionReply)
        assert isinstance(first, m.OptionReply)
        if first.reply == p.Rep.TRUSTVBD_RING_SEND:
            await send_fd()
            agreed = (await final_reply(p.Opt.TRUSTVBD_RING)).reply == p.Rep.ACK
        elif not first.final:
            raise p.ProtocolError(f"NBD_OPT_TRUSTVBD_RING answered {p.name_of(p.Rep, first.reply)}")

    send(m.Option(p.Opt.GO, m.encode_go(export, [p.Info.BLOCK_SIZE])))
    reply = await final_reply(p.Opt.GO)
    if reply.reply == p.Rep.ACK:
        size, tflags = core.export_size, core.export_flags
    elif reply.reply == p.Rep.ERR_UNSUP:
        # An old server without GO: the only way left cannot report errors.
        send(m.Option(p.Opt.EXPORT_NAME, export.encode()))
        ev = await next_event()
        if isinstance(ev, m.ConnectionClosed):
            raise BlockError(errno.ENOENT, f"server refused export {export!r} (it hung up)")
        if not isinstance(ev, m.ExportNameReply):
            raise p.ProtocolError(f"expected the export size, got {type(ev).__name__}")
        size, tflags = ev.size, ev.flags
    else:
        text = _printable(reply.data.decode("utf-8", "replace"))
        raise BlockError(
            _REFUSAL_ERRNO.get(reply.reply, errno.EIO),
            f"server refused export {export!r} with {p.name_of(p.Rep, reply.reply)}"
            + (f": {text}" if text else ""),
        )
    block_sizes = core.block_sizes if reply.reply == p.Rep.ACK else None
    check_export(size, tflags, block_sizes)
    return Handshake(size, tflags, block_sizes, core.structured, agreed)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_export(size: int, flags: int, block_sizes: tuple[int, int, int] | None) -> None:
    """Refuse export parameters no honest server sends (they would mislead the layers above)."""
    if size > p.MAX_EXPORT_SIZE:
        raise p.ProtocolError(f"export size {size} is larger than 2^63 - 1")
    if not flags & p.TransmissionFlag.HAS_FLAGS:
        raise p.ProtocolError(f"transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS")
    if block_sizes is None:
        return
    minimum, preferred, maximum = block_sizes
    if not _power_of_two(minimum) or minimum > 64 * 1024:
        raise p.ProtocolError(f"minimum block size {minimum} is not a power of two up to 64 KiB")
    if not _power_of_two(preferred) or preferred < minimum or preferred > p.MAX_PAYLOAD:
        raise p.ProtocolError(f"preferred block size {preferred} is impossible (minimum {minimum})")
    if maximum < preferred or (maximum != 0xFFFFFFFF and maximum % minimum):
        raise p.ProtocolError(f"maximum payload {maximum} is impossible (preferred {preferred})")
