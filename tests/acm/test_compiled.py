"""The compiled policy form: exact round trips, an independent reader, refusals of bad input."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.acm.util import CLIENT_V1, CLIENT_V1_2006, EXAMPLE_TOML, TEST_POLICY, XM_TEST, example
from trustvbd.acm import PolicyError, load_policy
from trustvbd.acm.compiled import HEADER, MAX_BODY, decode, encode, read_compiled
from trustvbd.cli import main

SOURCES = [XM_TEST, TEST_POLICY, CLIENT_V1, CLIENT_V1_2006]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_xen_policies_round_trip_exactly(source):
    policy = load_policy(source)
    back = decode(encode(policy), "p.tvbdpol")
    assert back == policy and back.source == policy.source
    assert encode(back) == encode(policy)  # canonical: one policy, one byte string


def test_independent_reader_follows_docs_policy_md():
    """Read the bytes as docs/policy.md describes them, without trustvbd's reader."""
    policy = example()
    data = encode(policy)
    assert data[:8] == b"TVBDPOL\0"
    version, flags, length = struct.unpack(">HHI", data[8:16])
    assert (version, flags, length) == (1, 0, len(data) - 48)
    body = data[48:]
    assert hashlib.sha256(body).digest() == data[16:48]
    doc = json.loads(body)
    assert json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() \
        == body
    assert doc["format"] == "trustvbd-policy" and doc["header"]["name"] == "payroll-example"
    assert doc["bootstrap"] == "SystemManagement"
    assert {"name": "RER", "types": ["Payroll", "Bank"]} in doc["conflict_sets"]
    assert {"name": "BankData", "ste": "Bank", "renamed_from": None} in doc["resource_labels"]
    vm = {v["name"]: v for v in doc["vm_labels"]}
    assert vm["Payroll"] == {"name": "Payroll", "ste": ["Payroll"], "chwall": ["Payroll"],
                             "renamed_from": None}
    assert doc["ste_types"] == list(policy.ste_types)


def rebuild(body: dict) -> bytes:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return HEADER.pack(b"TVBDPOL\0", 1, 0, len(raw), hashlib.sha256(raw).digest()) + raw


def body_of(data: bytes) -> dict:
    return json.loads(data[48:])


def refusal(data: bytes) -> str:
    with pytest.raises(PolicyError) as info:
        decode(data, "p.tvbdpol")
    message = str(info.value)
    assert message.startswith("p.tvbdpol: not a valid compiled policy: ")
    assert message.endswith("compile it again with `trustvbd policy compile`")
    return message


def test_malformed_input_is_refused_with_what_is_wrong():
    good = encode(example())
    body = body_of(good)
    cases = [
        (good[:20], "shorter than the 48-byte header"),
        (EXAMPLE_TOML.encode(), "an XML or TOML policy? compile it first"),
        (good[:8] + struct.pack(">H", 2) + good[10:], "format version 2; this trustvbd reads"),
        (good[:10] + struct.pack(">H", 1) + good[12:], "flags 0x0001 set"),
        (good + b"\n", "does not match the file"),
        (good[:-1], "does not match the file"),
        (good[:-2] + bytes([good[-2] ^ 0x20]) + good[-1:], "checksum mismatch"),
        (_with_spaces(body), "not canonical JSON"),
        (rebuild({**body, "extra": 1}), "the body has unknown fields ['extra']"),
        (rebuild({k: v for k, v in body.items() if k != "bootstrap"}),
         "the body lacks fields ['bootstrap']"),
        (rebuild({**body, "ste_types": "Payroll"}), "ste_types must be a list of strings"),
        (rebuild({**body, "vm_labels": [{"name": 1, "ste": [], "chwall": [],
                                         "renamed_from": None}]}),
         "vm_labels[0].name must be a string"),
        (rebuild({**body, "format": "other"}), '"format" must be "trustvbd-policy"'),
        (rebuild({**body, "header": {**body["header"], "from_policy": ["a"]}}),
         "header.from_policy must be [name, version]"),
    ]
    for data, expected in cases:
        assert expected in refusal(data), expected


def _with_spaces(body: dict) -> bytes:
    raw = json.dumps(body, sort_keys=True).encode()  # ", " and ": ": valid JSON, not canonical
    return HEADER.pack(b"TVBDPOL\0", 1, 0, len(raw), hashlib.sha256(raw).digest()) + raw


def test_well_formed_but_inconsistent_policy_is_refused_by_the_model_rules():
    body = body_of(encode(example()))
    body["conflict_sets"][0]["types"].append("Nobody")
    with pytest.raises(PolicyError, match='conflict set "RER" names type "Nobody", which is not'):
        decode(rebuild(body), "p.tvbdpol")


def test_oversized_file_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "big.tvbdpol"
    big.write_bytes(encode(example())[:48] + b" " * (MAX_BODY + 10))
    with pytest.raises(PolicyError, match="does not match the file"):
        read_compiled(big)
    with pytest.raises(PolicyError, match=r"missing\.tvbdpol: cannot read"):
        read_compiled(tmp_path / "missing.tvbdpol")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_damaged_byte_is_refused_never_misread(position, flip):
    good = encode(example())
    damaged = bytearray(good)
    damaged[position % len(good)] ^= flip
    with pytest.raises(PolicyError):
        decode(bytes(damaged), "p.tvbdpol")


def test_cli_compile(capsys, tmp_path):
    out = tmp_path / "xm.tvbdpol"
    assert main(["policy", "compile", str(XM_TEST), str(out)]) == 0
    err = capsys.readouterr().err
    assert f'-> {out}: policy "xm-test"' in err and "sha256 " in err
    assert read_compiled(out) == load_policy(XM_TEST)
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE_TOML.replace('BankData = "Bank"', 'BankData = "Cash"'))
    assert main(["policy", "compile", str(bad), str(tmp_path / "bad.tvbdpol")]) == 1
    assert "BankData" in capsys.readouterr().err and not (tmp_path / "bad.tvbdpol").exists()
    assert main(["policy", "compile", str(XM_TEST), str(tmp_path / "no" / "x.tvbdpol")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["bad.toml", "xm.tvbdpol"]
