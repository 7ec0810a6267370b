"""Typed messages between domains: every one round-trips; anything else is refused clearly."""

from __future__ import annotations

import json

import pytest

from trustvbd.crypt.keys import WrongKeyError
from trustvbd.domains import messages as m

SAMPLES: list[m.Message] = [
    m.Done(), m.Failed(m.ErrorCode.WRONG_KEY, "wrong passphrase"), m.StatusQuery(),
    m.CryptStatus([{"name": "d"}], [{"name": "g", "connections": []}], 2), m.Stop(),
    m.PolicyChanged(), m.Rechecked(2), m.SpecQuery(),
    m.Spec("/s", 30.0, [m.DiskSpec("d", "L", 4096, True, ["a", "b"])],
           {"g": m.GuestSpec("L", "g", 1000)}, [m.ListenerSpec("g", False)], "/pki",
           {"handshake_timeout": 30.0}, {"e": m.ElsewhereSpec("M", {"g": "/g@M.sock"})}),
    m.ChannelQuery("d", "a"), m.AcmChannelQuery(), m.DomainChannelQuery("crypt"),
    m.ChannelGranted("x1"), m.ChannelGranted("x", "storage.example"), m.Ready(),
    m.DiskFailed("d", m.ErrorCode.STALE_REPLICA, "old"),
    m.Integrity("d", {"block": 7, "message": "tag mismatch"}), m.HvStatus(
        1, "/s", "/c.toml", None, 2.5,
        [m.DomainStatus("store", "store", True, "", 12, "running", 1, "killed by SIGKILL", None)],
        [{"name": "d"}], 1,
        [m.GuestStatus("g", "L", "/g.sock", {"T": "/g.sock"}, [], 0, 0, 0)], [],
        [m.AttachmentStatus("guest", "g", "crypt-T", "d", "/fe", "/be", 4, 4)]),
    m.StoreIntroduce(3, "vm1", "Payroll"), m.StoreConnect(1, "crypt-T", "Sys"),
    m.StoreConnected(1), m.StoreRelease(3), m.StoreChannelQuery(), m.RecheckPairings(),
    m.PairingsRechecked(2, [m.TornDown("/fe", "/be", "share no STE type")]),
    m.PolicyLoad("/p.toml"), m.PolicyLoaded("p", 0), m.PolicyLoaded("p", 1, 2),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda msg: msg.TYPE)
def test_every_message_round_trips_through_json(msg: m.Message) -> None:
    wire = json.loads(json.dumps(msg.encode()))
    assert m.decode(wire) == msg
    assert m.decode(wire, type(msg)) == msg


@pytest.mark.parametrize(("data", "error"), [
    ([], "a message is a JSON object, not list"),
    ({"op": "status"}, "unexpected message type None"),
    ({"type": "launch-missiles"}, "unexpected message type 'launch-missiles'"),
    ({"type": "channel?", "disk": "d"}, "channel?: field 'replica' is missing"),
    ({"type": "channel?", "disk": "d", "replica": 5}, "channel?.replica: 5 is not str"),
    ({"type": "done", "extra": 1}, "done: unexpected field(s) extra"),
    ({"type": "failed", "code": "ImportError", "message": "x"}, "failed.code: 'ImportError' is not"),
    ({"type": "rechecked", "closed": True}, "rechecked.closed: True is not int"),
    ({"type": "spec", "state_dir": "/s", "request_timeout": 1, "disks": [{"name": "d"}],
      "guests": {}, "listeners": [], "tls_dir": None, "limits": {}, "elsewhere": {}},
     "spec.disks[0]: field 'label'"),
    ({"type": "spec", "state_dir": "/s", "request_timeout": "soon", "disks": [],
      "guests": {}, "listeners": [], "tls_dir": None, "limits": {}, "elsewhere": {}},
     "spec.request_timeout: 'soon'"),
    ({"type": "store-connect", "domid": "3", "name": "vm1", "label": "L"},
     "store-connect.domid: '3' is not int"),
    ({"type": "store-introduce", "domid": 3, "name": "vm1"}, "store-introduce: field 'label'"),
    ({"type": "pairings-rechecked", "kept": 1, "torn_down": [{"frontend_dir": "/f"}]},
     "pairings-rechecked.torn_down[0]: field 'backend_dir' is missing"),
    ({"type": "hv-status", "pid": 1, "state_dir": "/s", "config": "/c", "policy": None,
      "uptime": 1, "domains": [{"name": "hv"}], "disks": [], "aead_threads": 0,
      "guests": [], "integrity_events": [], "attachments": []},
     "hv-status.domains[0]: field 'kind' is missing"),
    ({"type": "hv-status", "pid": 1, "state_dir": "/s", "config": "/c", "policy": None,
      "uptime": 1, "domains": [], "disks": [], "aead_threads": 0,
      "guests": [], "integrity_events": [], "attachments": [
          {"kind": "guest", "frontend": "g", "backend": "c", "disk": "d", "frontend_dir": "/f",
           "backend_dir": "/b", "frontend_state": "4", "backend_state": 4}]},
     "hv-status.attachments[0].frontend_state: '4' is not int"),
])
def test_malformed_or_unknown_messages_are_refused_saying_where(data: object, error: str) -> None:
    with pytest.raises(m.MessageError) as exc:
        m.decode(data)
    assert error in str(exc.value)


def test_a_known_message_of_the_wrong_kind_is_refused() -> None:
    with pytest.raises(m.MessageError, match="unexpected message type 'stop'; expected status"):
        m.decode(m.Stop().encode(), m.StatusQuery)


def test_errors_cross_as_codes_not_class_names() -> None:
    assert m.error_code(WrongKeyError("no")) is m.ErrorCode.WRONG_KEY
    assert m.error_code(PermissionError("policy")) is m.ErrorCode.POLICY_DENIED
    assert m.error_code(ConnectionRefusedError()) is m.ErrorCode.UNREACHABLE
    assert m.error_code(RuntimeError("bug")) is m.ErrorCode.INTERNAL
    wire = m.Failed(m.error_code(WrongKeyError("no")), "no").encode()
    assert wire == {"type": "failed", "code": "wrong-key", "message": "no"}
