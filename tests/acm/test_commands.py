"""`trustvbd policy ...` and `trustvbd audit ...`."""

from __future__ import annotations

import json

import pytest

from tests.acm.util import CLIENT_V1, EXAMPLE_TOML, XM_TEST
from trustvbd.acm import load_policy
from trustvbd.acm.audit import AuditLog
from trustvbd.acm.commands import AUDIT_FILE
from trustvbd.cli import main


def test_check(capsys, tmp_path):
    assert main(["policy", "check", str(XM_TEST)]) == 0
    assert 'policy "xm-test" is valid: 4 STE types' in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE_TOML.replace('Bank = { ste = ["Bank"], chwall = ["Bank"] }',
                                        'Bank = { ste = ["Bank"], chwall = ["Bank", "Payroll"] }'))
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:15: labels.vm.Bank.chwall: VM label \"Bank\" holds types")


def test_show(capsys):
    assert main(["policy", "show", str(CLIENT_V1)]) == 0
    out = capsys.readouterr().out
    assert "conflict set Protection1: cw_Sensitive, cw_Distrusted" in out
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line[:3].strip().isdigit()}
    # second matrix wins for repeated names: dom_BoincClient may use no resource at all
    assert rows["dom_BoincClient"] == ["."] * 7
    assert rows["dom_HomeBanking"] == [".", ".", "x", ".", ".", "x", "."]


def test_convert_round_trip(capsys, tmp_path):
    out = tmp_path / "xm.toml"
    assert main(["policy", "convert", str(XM_TEST), "-o", str(out)]) == 0
    assert load_policy(out) == load_policy(XM_TEST)
    back = tmp_path / "xm.xml"
    assert main(["policy", "convert", str(out), "-o", str(back)]) == 0  # default: the other form
    assert load_policy(back) == load_policy(XM_TEST)
    assert main(["policy", "convert", str(XM_TEST), "--to", "xml"]) == 0
    assert "<SecurityPolicyDefinition" in capsys.readouterr().out


def test_explain(capsys, tmp_path):
    (tmp_path / "policy.toml").write_text(EXAMPLE_TOML)
    cfg = tmp_path / "trustvbd.toml"
    cfg.write_text('state_dir = "state"\npolicy = "policy.toml"\n'
                   '[[driver]]\nname = "drv"\nlabel = "StorageA"\ndir = "b"\n'
                   '[[guest]]\nname = "vm1"\nlabel = "Payroll"\n'
                   '[[disk]]\nname = "payroll"\nlabel = "PayrollData"\nsize = "1MiB"\nreplicas = ["drv"]\n'
                   '[[disk]]\nname = "bank"\nlabel = "BankData"\nsize = "1MiB"\nreplicas = ["drv"]\n')
    assert main(["policy", "explain", "-c", str(cfg), "--guest", "vm1", "--disk", "payroll"]) == 0
    out = capsys.readouterr().out
    assert 'guest label "Payroll": STE types [\'Payroll\']' in out
    assert out.strip().endswith('share STE type "Payroll"')
    assert main(["policy", "explain", "-c", str(cfg), "--guest", "vm1", "--disk", "bank"]) == 1
    assert "REFUSED by rule ste-no-shared-type" in capsys.readouterr().out
    assert main(["policy", "explain", "-c", str(cfg), "--guest", "vm2", "--disk", "bank"]) == 2
    assert "no [[guest]] named 'vm2'; known: vm1" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace('policy = "policy.toml"\n', ""))
    assert main(["policy", "explain", "-c", str(cfg), "--guest", "vm1", "--disk", "bank"]) == 0
    captured = capsys.readouterr()
    assert "NULL policy" in captured.err and "everything is allowed" in captured.out


def test_audit_show_and_verify(capsys, tmp_path):
    (tmp_path / "state").mkdir()
    cfg = tmp_path / "trustvbd.toml"
    cfg.write_text('state_dir = "state"\n')
    path = tmp_path / "state" / AUDIT_FILE
    log = AuditLog(path)
    log.append("decision", op="channel", allowed=False, reason='labels "a" and "b" share none')
    log.append("policy", event="loaded", name="xm-test")
    log.close()
    assert main(["audit", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].split()[2] == "decision" and 'allowed=false' in out[0]
    assert out[2].split()[2] == "checkpoint"  # written at close, signed
    assert main(["audit", "--log", str(path), "--json"]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1, 2, 3]
    assert main(["audit", "--verify", "--log", str(path)]) == 0
    assert "3 records in 1 file(s), chain, signatures and head intact" in capsys.readouterr().out
    pub = path.with_name(path.name + ".pub")
    assert main(["audit", "--verify", "--log", str(path), "--key", str(pub)]) == 0
    assert "pinned" in capsys.readouterr().out
    assert main(["audit", "--verify", "--log", str(path), "--key", "00" * 32]) == 1
    assert "not signed by the log's key" in capsys.readouterr().out
    assert main(["audit", "--verify", "--log", str(path), "--key", "zz"]) == 2
    path.write_text(path.read_text().replace("xm-test", "evil"))
    assert main(["audit", "--verify", "-c", str(cfg)]) == 1
    assert "seq 2 hash does not match its content (record edited)" in capsys.readouterr().out
    # A path with no log at all is said as such, not as tampering; a log removed beside
    # its head still is tampering.
    assert main(["audit", "--verify", "--log", str(tmp_path / "nowhere.jsonl")]) == 1
    said = capsys.readouterr().out
    assert "no audit log here" in said and "tampered" not in said, said
    path.unlink()
    assert main(["audit", "--verify", "--log", str(path)]) == 1
    assert "tampered with or damaged" in capsys.readouterr().out


def test_load_policy_file():
    assert load_policy(XM_TEST).name == "xm-test"
    with pytest.raises(ValueError):
        load_policy("/nonexistent/policy.xml")
