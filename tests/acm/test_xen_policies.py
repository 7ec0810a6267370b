"""Every shared Xen policy loads and gives Xen's answers (worked out by hand from each file)."""

from __future__ import annotations

import pytest

from tests.acm.util import CLIENT_V1, CLIENT_V1_2006, POLICIES, TEST_POLICY, XM_TEST, xen
from trustvbd.acm import (
    INACCESSIBLE,
    UNLABELED,
    ChineseWall,
    Policy,
    domain_may_run,
    domains_may_communicate,
    driver_may_serve_disk,
    guest_may_use_disk,
    load_policy,
)


def test_every_shared_policy_loads():
    files = sorted(POLICIES.rglob("*.xml"))
    assert len(files) == 4, files
    names = {load_policy(f).name for f in files}
    assert names == {"example.client_v1", "example.chwall_ste.client_v1", "example.test",
                     "xm-test"}


# -- xm-test: SystemManagement/green/red/blue, conflict set RER = {blue, red} ---------------
XM_VMS = ["SystemManagement", "green", "red", "blue"]
XM_SHARE = {  # (a, b) -> may communicate; symmetric, so only the upper triangle
    ("SystemManagement", "SystemManagement"): True, ("SystemManagement", "green"): True,
    ("SystemManagement", "red"): True, ("SystemManagement", "blue"): True,
    ("green", "green"): True, ("green", "red"): False, ("green", "blue"): False,
    ("red", "red"): True, ("red", "blue"): False, ("blue", "blue"): True,
}
XM_USE = {  # VM label -> resource labels it may use
    "SystemManagement": {"SystemManagement", "green", "red", "blue"},
    "green": {"green"}, "red": {"red"}, "blue": {"blue"},
}


def _check_share(policy: Policy, table: dict[tuple[str, str], bool]) -> None:
    for (a, b), expected in table.items():
        for x, y in ((a, b), (b, a)):
            d = domains_may_communicate(policy, x, y)
            assert d.allowed is expected, (x, y, d)
            assert f'"{x}"' in d.reason and f'"{y}"' in d.reason
            assert d.rule == ("ste-shared-type" if expected else "ste-no-shared-type")


def _check_use(policy: Policy, table: dict[str, set[str]]) -> None:
    resources = [r.name for r in policy.resource_labels]
    for vm, usable in table.items():
        for res in resources:
            d = guest_may_use_disk(policy, vm, res, guest="g1", disk="d1")
            assert d.allowed is (res in usable), (vm, res, d)
            assert f'"{vm}"' in d.reason and f'"{res}"' in d.reason and "g1" in d.reason
            assert driver_may_serve_disk(policy, vm, res).allowed is (res in usable)


def test_xm_test_ste():
    p = xen(XM_TEST)
    assert p.bootstrap == "SystemManagement"
    _check_share(p, XM_SHARE)
    _check_use(p, XM_USE)
    d = guest_may_use_disk(p, "green", "red")
    assert d.reason == ('guest label "green" and disk label "red" share no STE type'
                        ' (guest has "green"; disk has "red")')
    assert guest_may_use_disk(p, "red", "red").reason == (
        'guest label "red" and disk label "red" share STE type "red"')


def test_xm_test_chinese_wall():
    p = xen(XM_TEST)
    wall = ChineseWall(p)  # the bootstrap label counts as running, like dom0
    assert wall.running == {"SystemManagement": 1}
    assert wall.start("red").allowed
    d = wall.may_start("blue", who="vm-b")
    assert not d.allowed and d.rule == "chinese-wall"
    assert 'conflict set "RER"' in d.reason and '"red"' in d.reason and "vm-b" in d.reason
    assert wall.start("green").allowed
    assert wall.start("red").allowed  # a type never conflicts with itself
    wall.stopped("red")
    assert not wall.may_start("blue").allowed  # one red still runs
    wall.stopped("red")
    assert wall.start("blue").allowed
    assert not wall.may_start("red").allowed
    wall.stopped("blue")
    wall.stopped("green")
    assert wall.running == {"SystemManagement": 1} and not wall.aggregate
    with pytest.raises(ValueError):
        wall.stopped("blue")  # never below zero


# -- client_v1 (final) and its 2006 twin ---------------------------------------------------
def _client_tables(boot: str) -> tuple[dict[tuple[str, str], bool], dict[str, set[str]]]:
    hb, fun, boinc, sto, net = ("dom_HomeBanking", "dom_Fun", "dom_BoincClient",
                                "dom_StorageDomain", "dom_NetworkDomain")
    share = {
        (hb, hb): True, (hb, fun): False, (hb, boinc): False, (hb, boot): True,
        (hb, sto): True, (hb, net): True,
        (fun, fun): True, (fun, boinc): False, (fun, boot): True, (fun, sto): True,
        (fun, net): True,
        (boinc, boinc): True, (boinc, boot): True, (boinc, sto): False, (boinc, net): True,
        (boot, boot): True, (boot, sto): True, (boot, net): True,
        (sto, sto): True, (sto, net): True, (net, net): True,
    }
    mgmt, hda, hda1, hda2, eth, token, gfx = (
        "res_ManagementResource", "res_HardDrive(hda)", "res_LogicalDiskPartition1(hda1)",
        "res_LogicalDiskPartition2(hda2)", "res_EthernetCard", "res_SecurityToken",
        "res_GraphicsAdapter")
    use = {
        hb: {hda1, token}, fun: {hda2}, boinc: set(),
        boot: {mgmt, hda, hda1, hda2, eth, token, gfx},
        sto: {hda, hda1, hda2, token}, net: {hda1, hda2, eth, token},
    }
    return share, use


@pytest.mark.parametrize("path,boot", [(CLIENT_V1, "SystemManagement"),
                                       (CLIENT_V1_2006, "dom_SystemManagement")])
def test_client_v1(path, boot):
    p = xen(path)
    assert p.bootstrap == boot
    share, use = _client_tables(boot)
    _check_share(p, share)
    _check_use(p, use)
    wall = ChineseWall(p)
    assert wall.start("dom_HomeBanking").allowed
    d = wall.may_start("dom_Fun")
    assert not d.allowed and '"Protection1"' in d.reason and '"cw_Sensitive"' in d.reason
    for other in ("dom_BoincClient", "dom_HomeBanking", "dom_StorageDomain", "dom_NetworkDomain"):
        assert wall.start(other).allowed, other
    wall.stopped("dom_HomeBanking")
    wall.stopped("dom_HomeBanking")
    assert wall.start("dom_Fun").allowed
    assert not wall.may_start("dom_HomeBanking").allowed
    assert all(domain_may_run(p, v.name).allowed for v in p.vm_labels)  # bootstrap covers all


def test_client_v1_forms_agree():
    a, b = xen(CLIENT_V1), xen(CLIENT_V1_2006)
    assert a.header.version == "1.0" and b.header.version is None  # 2006: no <Version>
    assert a.ste_types == b.ste_types and a.conflict_sets == b.conflict_sets
    assert a.resource_labels == b.resource_labels


# -- test-security_policy: Chinese Wall types but no conflict sets --------------------------
def test_test_policy():
    p = xen(TEST_POLICY)
    share = {("SystemManagement", x): True for x in ("SystemManagement", "PepsiCo", "CocaCola",
                                                     "VIO")}
    share |= {("PepsiCo", "PepsiCo"): True, ("PepsiCo", "CocaCola"): False,
              ("PepsiCo", "VIO"): True, ("CocaCola", "CocaCola"): True,
              ("CocaCola", "VIO"): True, ("VIO", "VIO"): True}
    _check_share(p, share)
    _check_use(p, {"SystemManagement": {"SystemManagement", "PepsiCo", "CocaCola"},
                   "PepsiCo": {"PepsiCo"}, "CocaCola": {"CocaCola"},
                   "VIO": {"PepsiCo", "CocaCola"}})
    wall = ChineseWall(p)
    for label in ("PepsiCo", "CocaCola", "VIO", "PepsiCo"):  # no conflict sets: no walls
        assert wall.start(label).allowed


# -- reserved labels, unknown labels, NULL policy ------------------------------------------
def test_reserved_and_unknown_labels():
    p = xen(XM_TEST)
    d = guest_may_use_disk(p, "SystemManagement", INACCESSIBLE)
    assert not d.allowed and d.rule == "inaccessible"
    d = guest_may_use_disk(p, "SystemManagement", UNLABELED)
    assert not d.allowed and d.rule == "unlabeled" and "not labeled" in d.reason
    d = guest_may_use_disk(p, UNLABELED, "green")  # an unlabeled VM holds no type
    assert not d.allowed and d.rule == "ste-no-shared-type"
    assert not domains_may_communicate(p, UNLABELED, "SystemManagement").allowed
    d = guest_may_use_disk(p, "purple", "green", guest="vm9")
    assert not d.allowed and d.rule == "unknown-label"
    assert 'defines no VM label "purple"' in d.reason and "vm9" in d.reason
    d = guest_may_use_disk(p, "green", "Green")
    assert not d.allowed and 'no resource label "Green"' in d.reason
    wall = ChineseWall(p)
    assert wall.start(UNLABELED).allowed  # no Chinese Wall types: conflicts with nothing
    assert not wall.may_start("purple").allowed


def test_policy_may_label_the_unlabeled():
    from trustvbd.acm.toml_loader import policy_from_toml

    # Xen's DEFAULT policy gives unlabeled VMs and resources the type __UNLABELED__.
    p = policy_from_toml("""
name = "DEFAULT"
bootstrap = "SystemManagement"
[ste]
types = ["SystemManagement", "__UNLABELED__"]
[chinese_wall]
types = ["SystemManagement"]
[labels.vm]
SystemManagement = { ste = ["SystemManagement", "__UNLABELED__"] }
__UNLABELED__ = { ste = ["__UNLABELED__"] }
[labels.resource]
__UNLABELED__ = "__UNLABELED__"
""")
    assert guest_may_use_disk(p, UNLABELED, UNLABELED).allowed
    assert domains_may_communicate(p, UNLABELED, "SystemManagement").allowed


def test_null_policy_allows_everything():
    p = Policy.null()
    assert p.is_null
    for d in (guest_may_use_disk(p, "a", "b"), driver_may_serve_disk(p, "a", "b"),
              domains_may_communicate(p, "a", "b"), domain_may_run(p, "x")):
        assert d.allowed and d.rule == "null-policy" and "NULL policy" in d.reason
    wall = ChineseWall(p)
    assert wall.start("anything").allowed
    wall.stopped("anything")


def test_chinese_wall_only_policy_does_not_enforce_ste():
    from trustvbd.acm.toml_loader import policy_from_toml

    p = policy_from_toml("""
name = "chw-only"
bootstrap = "A"
[chinese_wall]
types = ["a", "b"]
conflict_sets = { X = ["a", "b"] }
[labels.vm]
A = { chwall = ["a"] }
B = { chwall = ["b"] }
""")
    d = domains_may_communicate(p, "A", "B")
    assert d.allowed and d.rule == "ste-not-enforced"
    assert not ChineseWall(p).may_start("B").allowed  # the bootstrap A runs


def test_docs_worked_example():
    """The claims docs/policy.md makes about its worked example."""
    from tests.acm.util import example

    p = example()
    assert guest_may_use_disk(p, "Payroll", "PayrollData").allowed
    d = guest_may_use_disk(p, "Payroll", "BankData")
    assert not d.allowed and d.rule == "ste-no-shared-type"
    assert driver_may_serve_disk(p, "StorageA", "PayrollData").allowed
    assert driver_may_serve_disk(p, "StorageA", "BankData").allowed
    assert not domains_may_communicate(p, "Payroll", "Bank").allowed
    assert domains_may_communicate(p, "Payroll", "SystemManagement").allowed
    wall = ChineseWall(p)
    assert wall.start("Payroll", "vm1").allowed
    d = wall.may_start("Bank", "vm2")
    assert not d.allowed and 'conflict set "RER"' in d.reason and '"Payroll"' in d.reason
    assert wall.start("Payroll").allowed and wall.start("StorageA").allowed
    wall.stopped("Payroll")
    wall.stopped("Payroll")
    assert wall.start("Bank", "vm2").allowed
