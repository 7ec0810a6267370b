"""Shared helpers for the access-control tests."""

from __future__ import annotations

import os
from pathlib import Path

from trustvbd.acm import Policy
from trustvbd.acm.toml_loader import policy_from_toml
from trustvbd.acm.xml_loader import load_xml

# Xen's own policies, read in place from the shared reference data beside the checkout
# (they are Xen's files: never copied into the project); TRUSTVBD_SHARED_DIR overrides.
SHARED_DIR = Path(os.environ.get("TRUSTVBD_SHARED_DIR") or Path(__file__).resolve().parents[3] / "shared")
POLICIES = SHARED_DIR / "xen-acm-policies"
CLIENT_V1 = POLICIES / "client_v1-security_policy.xml"
CLIENT_V1_2006 = POLICIES / "2006_era" / "chwall_ste_client_v1-security_policy.xml"
TEST_POLICY = POLICIES / "test-security_policy.xml"
XM_TEST = POLICIES / "xm-test-security_policy.xml"


def xen(path: Path) -> Policy:
    return load_xml(path)


# The worked example of docs/policy.md.
EXAMPLE_TOML = """\
name = "payroll-example"
version = "1.0"
bootstrap = "SystemManagement"

[ste]
types = ["SystemManagement", "Payroll", "Bank", "StorageA"]

[chinese_wall]
types = ["SystemManagement", "Payroll", "Bank"]
conflict_sets = { RER = ["Payroll", "Bank"] }

[labels.vm]
SystemManagement = { ste = ["SystemManagement", "Payroll", "Bank", "StorageA"], chwall = ["SystemManagement"] }
Payroll = { ste = ["Payroll"], chwall = ["Payroll"] }
Bank = { ste = ["Bank"], chwall = ["Bank"] }
StorageA = { ste = ["StorageA", "Payroll", "Bank"] }

[labels.resource]
PayrollData = "Payroll"
BankData = "Bank"
"""


def example() -> Policy:
    return policy_from_toml(EXAMPLE_TOML, "example.toml")
