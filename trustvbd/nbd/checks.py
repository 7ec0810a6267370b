"""Server-side validation of one request against the negotiated export (pure).

Returns the NBD error to answer with, or None if the request may go to the
backend. Choices, from the NBD protocol document:
- unknown command, unknown or misplaced flag, command not advertised -> EINVAL;
- write/trim/zero on a read-only export -> EPERM;
- past the end of the export: ENOSPC for WRITE and WRITE_ZEROES ("a write
  request including sectors beyond the size of the device"), EINVAL otherwise;
There is no alignment rule (the minimum block size is 1) and no length limit
but the export's end: requests longer than the advertised maximum payload are
served in parts (connection.py), as nbd-server serves them.
"""

from __future__ import annotations

from trustvbd.blockdev import Capabilities
from trustvbd.nbd import protocol as p
from trustvbd.nbd.messages import Request

F = p.TransmissionFlag
C = p.CmdFlag

# Command -> transmission flag that must have been advertised for it.
_NEEDS = {
    p.Cmd.FLUSH: F.SEND_FLUSH,
    p.Cmd.TRIM: F.SEND_TRIM,
    p.Cmd.WRITE_ZEROES: F.SEND_WRITE_ZEROES,
    p.Cmd.CACHE: F.SEND_CACHE,
}
_WRITES = (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES)
_KNOWN = (
    p.Cmd.READ, p.Cmd.WRITE, p.Cmd.FLUSH, p.Cmd.TRIM, p.Cmd.CACHE, p.Cmd.WRITE_ZEROES,
)
# Plain ints for the per-request path (enum attribute access is slow).
_WRITE, _FLUSH, _WRITE_ZEROES = int(p.Cmd.WRITE), int(p.Cmd.FLUSH), int(p.Cmd.WRITE_ZEROES)


def allowed_flags(cmd: int, tflags: int, structured: bool) -> int:
    """Command flags a client may set on `cmd` for an export with `tflags`."""
    allowed = C.FUA if tflags & F.SEND_FUA else 0
    if cmd == p.Cmd.READ and structured:
        allowed |= C.DF
    elif cmd == p.Cmd.WRITE_ZEROES:
        allowed |= C.NO_HOLE
        if tflags & F.SEND_FAST_ZERO:
            allowed |= C.FAST_ZERO
    return int(allowed)


class RequestChecker:
    """check_request() for one negotiated export, with the per-command rules precomputed."""

    def __init__(self, size: int, tflags: int, structured: bool) -> None:
        self.size = size
        # cmd -> (name, allowed flags, refusal for the command as a whole or None)
        self._rules: dict[int, tuple[str, int, tuple[int, str] | None]] = {}
        for cmd in _KNOWN:
            name = p.Cmd(cmd).name
            refusal = None
            need = _NEEDS.get(cmd)
            if need is not None and not tflags & need:
                refusal = (p.NbdErr.EINVAL, f"{name} is not supported by this export")
            elif cmd in _WRITES and tflags & F.READ_ONLY:
                refusal = (p.NbdErr.EPERM, f"{name} on a read-only export")
            self._rules[cmd] = (name, allowed_flags(cmd, tflags, structured), refusal)

    def __call__(self, req: Request) -> tuple[int, str] | None:
        cmd = req.type
        rule = self._rules.get(cmd)
        if rule is None:
            if cmd == p.Cmd.BLOCK_STATUS:
                return p.NbdErr.EINVAL, "BLOCK_STATUS needs a metadata context; none was negotiated"
            return p.NbdErr.EINVAL, f"unknown command {cmd}"
        name, allowed, refusal = rule
        bad = req.flags & ~allowed
        if bad:
            return p.NbdErr.EINVAL, f"command flags {bad:#x} are not valid for {name} here"
        if refusal is not None:
            return refusal
        offset, length = req.offset, req.length
        if cmd == _FLUSH:
            if offset or length:
                return p.NbdErr.EINVAL, "FLUSH must have offset and length 0"
            return None
        size = self.size
        if offset + length > size:
            err = p.NbdErr.ENOSPC if cmd in (_WRITE, _WRITE_ZEROES) else p.NbdErr.EINVAL
            return err, f"{name} [{offset}, {offset + length}) is beyond the export size {size}"
        return None


def check_request(req: Request, size: int, tflags: int, structured: bool) -> tuple[int, str] | None:
    """The NBD error to answer `req` with, or None if it may go to the backend."""
    return RequestChecker(size, tflags, structured)(req)


def export_flags(caps: Capabilities, structured: bool) -> int:
    """Transmission flags advertising exactly what the backend can do."""
    flags = F.HAS_FLAGS
    if caps.read_only:
        flags |= F.READ_ONLY
    else:
        if caps.trim:
            flags |= F.SEND_TRIM
        if caps.zero:
            flags |= F.SEND_WRITE_ZEROES
            if caps.fast_zero:
                flags |= F.SEND_FAST_ZERO
    if caps.flush:
        flags |= F.SEND_FLUSH
    if caps.fua:
        flags |= F.SEND_FUA
    if caps.cache:
        flags |= F.SEND_CACHE
    if caps.multi_conn:
        flags |= F.CAN_MULTI_CONN
    if structured:
        flags |= F.SEND_DF  # every read is answered in one data chunk anyway
    return flags
