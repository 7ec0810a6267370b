"""The wire codec and path rules, byte by byte against xs_wire.h and docs/misc/xenstore.txt."""

from __future__ import annotations

import struct

import pytest

from trustvbd.xenstore import paths
from trustvbd.xenstore.perms import Access, Acl, Caller
from trustvbd.xenstore.wire import (
    HEADER,
    PAYLOAD_MAX,
    Decoder,
    Message,
    Op,
    ProtocolViolation,
    XsError,
    encode,
    error_reply,
)


def test_op_numbers_match_xs_wire_h() -> None:
    assert [Op.CONTROL, Op.DIRECTORY, Op.READ, Op.GET_PERMS, Op.WATCH, Op.UNWATCH] == list(range(6))
    assert (Op.TRANSACTION_START, Op.TRANSACTION_END, Op.INTRODUCE, Op.RELEASE) == (6, 7, 8, 9)
    assert (Op.GET_DOMAIN_PATH, Op.WRITE, Op.MKDIR, Op.RM, Op.SET_PERMS) == (10, 11, 12, 13, 14)
    assert (Op.WATCH_EVENT, Op.ERROR, Op.IS_DOMAIN_INTRODUCED, Op.RESUME, Op.SET_TARGET) == (15, 16, 17, 18, 19)
    assert (Op.RESET_WATCHES, Op.DIRECTORY_PART, Op.INVALID) == (21, 22, 0xFFFF)
    assert 20 not in {int(o) for o in Op}  # XS_RESTRICT, removed from Xen


def test_header_is_four_little_endian_u32() -> None:
    data = encode(Message(Op.READ, 0x01020304, 7, b"/a\0"))
    assert HEADER.size == 16
    assert data == struct.pack("<IIII", 2, 0x01020304, 7, 3) + b"/a\0"
    assert error_reply(Message(Op.READ, 9, 3, b""), "ENOENT").payload == b"ENOENT\0"


def test_decoder_reassembles_split_messages_and_refuses_oversized() -> None:
    d = Decoder()
    data = encode(Message(Op.WRITE, 1, 0, b"/x\0v")) + encode(Message(Op.READ, 2, 0, b"/x\0"))
    for i in range(len(data)):  # one byte at a time
        d.feed(data[i:i + 1])
    assert [m.req_id for m in iter(d.next_message, None)] == [1, 2]
    d.feed(HEADER.pack(Op.WRITE, 1, 0, PAYLOAD_MAX + 1))
    with pytest.raises(ProtocolViolation, match="4097"):
        d.next_message()
    with pytest.raises(ValueError):
        encode(Message(Op.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1)))


@pytest.mark.parametrize("bad", [b"", b"/a/", b"/a//b", b"/a b", b"/\xc3\xa9", b"/" + b"a" * 3072, b"@x"])
def test_bad_paths_are_einval(bad: bytes) -> None:
    with pytest.raises(XsError) as info:
        paths.canonical(bad, 3)
    assert info.value.code == "EINVAL"


def test_relative_paths_are_under_the_callers_home() -> None:
    assert paths.canonical(b"device/vbd", 3) == "/local/domain/3/device/vbd"
    assert paths.canonical(b"/", 3) == "/"
    assert paths.canonical(b"/A-b_c@1/2", 3) == "/A-b_c@1/2"
    assert paths.canonical_watch(b"@releaseDomain", 3) == ("@releaseDomain", "")
    assert paths.canonical_watch(b"x", 3) == ("/local/domain/3/x", "/local/domain/3/")
    assert paths.is_child("/a/b", "/a") and paths.is_child("/a", "/a") and not paths.is_child("/ab", "/a")


def test_permissions_follow_xen() -> None:
    acl = Acl.parse([b"n5", b"r7", b"b9"])  # owned by 5; others none; 7 reads; 9 both
    assert acl.format() == ["n5", "r7", "b9"] and acl.owner == 5
    assert Caller(5).access(acl) == Access.ALL
    assert Caller(7).access(acl) == Access.READ
    assert Caller(9).access(acl) == Access.BOTH
    assert Caller(8).access(acl) == Access.NONE
    assert Caller(8, privileged=True).access(acl) == Access.ALL
    assert Caller(8, target=5).access(acl) == Access.ALL  # SET_TARGET: acts for 5
    assert Caller(8).access(Acl.parse([b"r5"])) == Access.READ  # first letter: everyone else
    for bad in ([b"x1"], [b"r"], [b"r70000"], []):
        with pytest.raises(XsError):
            Acl.parse(bad)
