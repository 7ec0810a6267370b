"""XML <-> TOML conversion keeps the model: XML -> TOML -> model equals the XML model."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from tests.acm.util import EXAMPLE_TOML, POLICIES, example
from trustvbd.acm.toml_loader import policy_from_toml, to_toml
from trustvbd.acm.xml_loader import load_xml, policy_from_xml, to_xml

XML_FILES = sorted(POLICIES.rglob("*.xml"))


@pytest.mark.parametrize("path", XML_FILES, ids=lambda p: p.name)
def test_xml_to_toml_to_model(path):
    original = load_xml(path)
    text = to_toml(original)
    tomllib.loads(text)  # plain TOML any tool can read
    assert policy_from_toml(text, "converted.toml") == original
    assert to_toml(policy_from_toml(text)) == text  # stable


@pytest.mark.parametrize("path", XML_FILES, ids=lambda p: p.name)
def test_xml_to_xml_to_model(path):
    original = load_xml(path)
    again = policy_from_xml(to_xml(original).encode(), "converted.xml")
    # The final schema requires <Version>: the 2006 form gains "1.0", nothing else changes.
    expected = dataclasses.replace(original, header=dataclasses.replace(
        original.header, version=original.header.version or "1.0"))
    assert again == expected


def test_toml_to_xml_to_model():
    p = example()
    assert policy_from_xml(to_xml(p).encode()) == p
    assert to_toml(p).count("\n") < EXAMPLE_TOML.count("\n") + 10


def test_written_xml_follows_the_final_schema():
    """Only elements and attributes Xen's final security_policy.xsd declares, Version present."""
    xsd = (POLICIES / "security_policy.xsd").read_text()
    declared = set(re.findall(r'<xsd:element (?:name|ref)="(\w+)"', xsd))
    attributes = set(re.findall(r'<xsd:attribute name="(\w+)"', xsd))
    p = dataclasses.replace(load_xml(POLICIES / "2006_era" /
                                     "chwall_ste_client_v1-security_policy.xml"))
    text = to_xml(p)
    used = set(re.findall(r"<(\w+)[ >]", text)) - {"SecurityPolicyDefinition"}
    assert used <= declared, used - declared
    attrs = set(re.findall(r' (\w+)="', text)) - {"xmlns", "version", "encoding"}
    assert attrs <= attributes | {"schemaLocation"}, attrs
    assert "<Version>1.0</Version>" in text
    # PolicyHeader children in the schema's order
    header = re.search(r"<PolicyHeader>(.*)</PolicyHeader>", text, re.S).group(1)
    order = re.findall(r"<(\w+)>", header)
    schema_order = ["PolicyName", "PolicyUrl", "Reference", "Date", "NameSpaceUrl", "Version"]
    assert order == [t for t in schema_order if t in order]


def test_awkward_names_survive():
    text = EXAMPLE_TOML.replace("PayrollData =", '"res_Hard \\"Drive\\"(hda) & <more>" =')
    p = policy_from_toml(text)
    assert p.resource_label('res_Hard "Drive"(hda) & <more>') is not None
    assert policy_from_xml(to_xml(p).encode()) == p
    assert policy_from_toml(to_toml(p)) == p
