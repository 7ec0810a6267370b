"""Small pure pieces: request checks, error mapping, chunk coverage, URIs, option payloads."""

from __future__ import annotations

import errno

import pytest

from trustvbd._native import NbdServerSession
from trustvbd.blockdev import Capabilities
from trustvbd.nbd import messages as m
from trustvbd.nbd import protocol as p
from trustvbd.nbd.checks import export_flags
from trustvbd.nbd.uri import NbdUri, parse_uri

F = p.TransmissionFlag
ALL = int(F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES
          | F.SEND_FAST_ZERO | F.SEND_CACHE)
MiB = 1 << 20


def check(cmd: int, offset: int = 0, length: int = 512, flags: int = 0, tflags: int = ALL) -> int | None:
    """The error the native framer refuses this request with (None: it is served)."""
    data = bytes(length) if cmd == p.Cmd.WRITE else None
    wire = b"".join(m.encode_parts(m.Request(cmd, 1, offset, length, flags, data)))
    _, [item], _ = NbdServerSession(8 * MiB, tflags, True).parse(wire, 0, len(wire))
    bad = item[6]
    return None if bad is None else bad[0]


def test_request_checks_follow_the_spec() -> None:
    assert check(p.Cmd.READ) is None
    assert check(42) == p.NbdErr.EINVAL  # unknown command
    assert check(p.Cmd.BLOCK_STATUS) == p.NbdErr.EINVAL
    assert check(p.Cmd.READ, 8 * MiB, 512) == p.NbdErr.EINVAL  # past the end
    assert check(p.Cmd.WRITE, 8 * MiB, 512) == p.NbdErr.ENOSPC
    assert check(p.Cmd.WRITE_ZEROES, 8 * MiB - 512, 1024) == p.NbdErr.ENOSPC
    assert check(p.Cmd.WRITE, tflags=ALL | F.READ_ONLY) == p.NbdErr.EPERM
    assert check(p.Cmd.TRIM, tflags=ALL | F.READ_ONLY) == p.NbdErr.EPERM
    assert check(p.Cmd.READ, 0, 8 * MiB) is None  # no length limit but the export's end
    assert check(p.Cmd.TRIM, 0, 8 * MiB) is None
    assert check(p.Cmd.READ, 100, 3) is None  # any byte range
    assert check(p.Cmd.WRITE, 8 * MiB - 1, 1) is None
    assert check(p.Cmd.WRITE, 8 * MiB - 1, 2) == p.NbdErr.ENOSPC
    assert check(p.Cmd.WRITE, flags=p.CmdFlag.FAST_ZERO) == p.NbdErr.EINVAL  # misplaced flag
    assert check(p.Cmd.WRITE_ZEROES, flags=p.CmdFlag.FAST_ZERO | p.CmdFlag.NO_HOLE) is None
    assert check(p.Cmd.WRITE_ZEROES, flags=p.CmdFlag.FAST_ZERO,
                 tflags=ALL & ~F.SEND_FAST_ZERO) == p.NbdErr.EINVAL
    assert check(p.Cmd.FLUSH, 0, 0) is None
    assert check(p.Cmd.FLUSH, 0, 512) == p.NbdErr.EINVAL
    assert check(p.Cmd.CACHE, tflags=ALL & ~F.SEND_CACHE) == p.NbdErr.EINVAL
    assert check(p.Cmd.READ, flags=0x100) == p.NbdErr.EINVAL  # unknown flag bit
    assert check(p.Cmd.READ, 2**64 - 1, 2**32 - 1) == p.NbdErr.EINVAL  # no wrap-around


def test_export_flags_mirror_capabilities() -> None:
    assert export_flags(Capabilities(), False) & F.CAN_MULTI_CONN
    assert not export_flags(Capabilities(multi_conn=False), False) & F.CAN_MULTI_CONN
    ro = export_flags(Capabilities(read_only=True), True)
    assert ro & F.READ_ONLY and not ro & (F.SEND_TRIM | F.SEND_WRITE_ZEROES) and ro & F.SEND_DF
    bare = Capabilities(flush=False, fua=False, trim=False, zero=False, cache=False,
                        multi_conn=False)
    assert export_flags(bare, False) == F.HAS_FLAGS


def test_errno_mapping() -> None:
    assert p.errno_to_nbd(errno.EROFS) == p.NbdErr.EPERM
    assert p.errno_to_nbd(errno.EDQUOT) == p.NbdErr.ENOSPC
    assert p.errno_to_nbd(errno.ETIMEDOUT) == p.NbdErr.EIO  # anything unknown
    assert p.errno_to_nbd(errno.ENOTSUP) == p.NbdErr.EINVAL  # only fast zero may say ENOTSUP
    assert p.errno_to_nbd(errno.ENOTSUP, fast_zero=True) == p.NbdErr.ENOTSUP
    assert p.errno_to_nbd(errno.ESHUTDOWN) == p.NbdErr.ESHUTDOWN
    assert p.nbd_to_errno(12345) == errno.EIO  # a hostile value cannot pick our errno
    assert p.nbd_to_errno(p.NbdErr.ENOSPC) == errno.ENOSPC


def test_uris() -> None:
    assert parse_uri("nbd+unix:///disk?socket=/tmp/x.sock") == NbdUri(
        "unix", "/tmp/x.sock", None, None, "disk")
    assert parse_uri("nbd+unix:///?socket=/s").export == ""
    assert parse_uri("nbd://127.0.0.1/a%20b") == NbdUri("tcp", None, "127.0.0.1", 10809, "a b")
    assert parse_uri("nbd://[::1]:1234/x") == NbdUri("tcp", None, "::1", 1234, "x")
    assert str(parse_uri("nbd://[::1]:1234/x")) == "nbd://[::1]:1234/x"
    tls = parse_uri("nbds://h:5/x?tls-certificates=/d")
    assert (tls.tls, tls.tls_certificates, tls.server_name, str(tls)) == (
        True, "/d", "h", "nbds://h:5/x")
    assert parse_uri("nbds+unix:///x?socket=/s").server_name == "localhost"
    assert parse_uri("nbds+unix:///x?socket=/s&tls-hostname=n").server_name == "n"
    for bad, why in [
        ("nbd+unix:///x", "socket"),
        ("nbds://h/x?tls-certificates=", "exactly once"),
        ("nbd://h/x?tls-certificates=/d", "unsupported"),
        ("http://h/x", "not an NBD URI"),
        ("nbd:///x", "needs a host"),
        ("nbd://h:99999/x", "port"),
        ("nbd+unix:///x?socket=/s&tls=1", "unsupported"),
        ("nbd://[::1/x", r"'nbd://\[::1/x': cannot parse it \(Invalid IPv6 URL\); expected"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_uri(bad)


def test_option_payload_helpers() -> None:
    assert m.parse_go(m.encode_go("disk", [3, 1])) == ("disk", [3, 1])
    with pytest.raises(ValueError):
        m.parse_go(b"\0\0\0\xffabc\0\0")
    with pytest.raises(ValueError, match="NUL"):
        m.parse_go(m.encode_go("a\0b"))
    assert m.parse_server(m.encode_server("n", "desc")) == ("n", "desc")
    assert m.parse_info(m.info_block_size(512, 4096, MiB)) == (p.Info.BLOCK_SIZE, (512, 4096, MiB))
    assert len(m.encode_message_text("é" * 5000)) <= p.MAX_STRING
