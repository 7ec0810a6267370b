"""Hostile and wrong policies are refused cleanly, with file, line and reason."""

from __future__ import annotations

import re
import time

import pytest

from tests.acm.util import EXAMPLE_TOML, XM_TEST
from trustvbd.acm import PolicyError, load_policy
from trustvbd.acm.toml_loader import policy_from_toml
from trustvbd.acm.xml_loader import MAX_BYTES, MAX_DEPTH, policy_from_xml

HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
XM = XM_TEST.read_text()


def refused(data: str | bytes, *, file: str = "p.xml") -> PolicyError:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(PolicyError) as info:
        policy_from_xml(raw, file)
    return info.value


def test_billion_laughs_refused_quickly():
    bomb = HEAD + '<!DOCTYPE lolz [\n<!ENTITY lol "lol">\n'
    for i in range(1, 10):
        ref = f"&lol{i - 1};" if i > 1 else "&lol;"
        bomb += f'<!ENTITY lol{i} "{ref * 10}">\n'
    bomb += "]>\n<SecurityPolicyDefinition>&lol9;</SecurityPolicyDefinition>\n"
    start = time.monotonic()
    err = refused(bomb)
    assert time.monotonic() - start < 1
    assert str(err).startswith("p.xml:2: <!DOCTYPE lolz> refused")
    assert "entity expansion" in err.message


def test_external_entity_refused():
    xxe = (HEAD + '<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
           '<SecurityPolicyDefinition xmlns="http://www.ibm.com">&xxe;</SecurityPolicyDefinition>')
    err = refused(xxe)
    assert "refused" in err.message and "external entities" in err.message
    assert "root:" not in str(err)
    ext_dtd = HEAD + '<!DOCTYPE x SYSTEM "file:///etc/passwd">\n<x/>'
    assert 'external DTD "file:///etc/passwd" refused' in refused(ext_dtd).message


def test_undefined_entity_without_dtd():
    err = refused(HEAD + '<SecurityPolicyDefinition xmlns="http://www.ibm.com">&xxe;'
                  "</SecurityPolicyDefinition>")
    assert "not well-formed XML" in err.message and "undefined entity" in err.message


def test_huge_file_refused(tmp_path):
    big = tmp_path / "big.xml"
    big.write_bytes(HEAD.encode() + b"<!--" + b"x" * MAX_BYTES + b"-->")
    with pytest.raises(PolicyError) as info:
        load_policy(big)
    assert f"over the {MAX_BYTES}-byte limit" in str(info.value)


def test_bad_utf8_refused():
    data = XM.encode().replace(b"<Type>green</Type>", b"<Type>gr\xffen</Type>", 1)
    err = refused(data)
    assert err.where.line == _line_of(XM, "<Type>green</Type>")
    assert "invalid UTF-8 (byte 0xff" in err.message
    err = refused(XM.replace('encoding="UTF-8"', 'encoding="ISO-8859-1"'))
    assert 'declared encoding "ISO-8859-1" refused' in err.message


def test_deep_nesting_refused():
    deep = HEAD + '<SecurityPolicyDefinition xmlns="http://www.ibm.com">'
    deep += "<a>" * 5000 + "</a>" * 5000 + "</SecurityPolicyDefinition>"
    assert f"nested deeper than {MAX_DEPTH} levels" in refused(deep).message


def test_wrong_root_and_namespace():
    err = refused(HEAD + '<html xmlns="http://www.ibm.com"/>')
    assert str(err) == ('p.xml:2: root element is <html>; a Xen ACM policy starts with'
                        ' <SecurityPolicyDefinition xmlns="http://www.ibm.com">')
    err = refused(XM.replace('xmlns="http://www.ibm.com"', ""))
    assert "root element is <SecurityPolicyDefinition>; a Xen ACM policy starts" in err.message
    err = refused(XM.replace("<PolicyHeader>", '<PolicyHeader xmlns="urn:other">'))
    assert 'element <{urn:other}PolicyHeader> is not in the Xen ACM namespace' in err.message


def _line_of(text: str, needle: str, nth: int = 1) -> int:
    pos = -1
    for _ in range(nth):
        pos = text.index(needle, pos + 1)
    return text.count("\n", 0, pos) + 1


def test_label_with_two_types_of_a_conflict_set():
    bad = XM.replace("<Type>red</Type>\n                </ChineseWallTypes>",
                     "<Type>red</Type>\n<Type>blue</Type>\n                </ChineseWallTypes>")
    err = refused(bad, file="policy.xml")
    line = _line_of(bad, "<Type>blue</Type>\n                </ChineseWallTypes>")
    assert str(err) == (f'policy.xml:{line}: VM label "red" holds types "red" and "blue" of'
                        ' conflict set "RER"; a label may hold at most one type of a conflict set')


def test_undeclared_type():
    bad = XM.replace("<Type>green</Type>\n                </SimpleTypeEnforcementTypes>",
                     "<Type>purple</Type>\n                </SimpleTypeEnforcementTypes>", 1)
    err = refused(bad)
    assert err.where.line == _line_of(bad, "<Type>purple</Type>")
    assert 'VM label "green" holds STE type "purple", which is not declared' in str(err)
    bad = XM.replace('<Conflict name="RER">\n                <Type>blue</Type>',
                     '<Conflict name="RER">\n                <Type>yellow</Type>')
    assert 'conflict set "RER" names type "yellow", which is not a declared' in refused(bad).message


@pytest.mark.parametrize("old,new,message", [
    ("<Type>red</Type>\n            <Type>blue</Type>\n        </SimpleTypeEnforcementTypes>",
     "<Type>red</Type>\n            <Type>red</Type>\n        </SimpleTypeEnforcementTypes>",
     'duplicate STE type "red"'),
    ("<Name>blue</Name>", "<Name>red</Name>", 'duplicate VM label "red"'),
    ("<Name>green</Name>\n                <SimpleTypeEnforcementTypes>\n"
     "                    <Type>green</Type>\n                </SimpleTypeEnforcementTypes>\n"
     "            </ResourceLabel>",
     "<Name>SystemManagement</Name>\n                <SimpleTypeEnforcementTypes>\n"
     "                    <Type>green</Type>\n                </SimpleTypeEnforcementTypes>\n"
     "            </ResourceLabel>", 'duplicate resource label "SystemManagement"'),
])
def test_duplicate_names(old, new, message):
    assert old in XM
    assert message in refused(XM.replace(old, new, 1)).message


def test_resource_label_shape():
    two = XM.replace("<Type>blue</Type>\n                </SimpleTypeEnforcementTypes>\n"
                     "            </ResourceLabel>",
                     "<Type>blue</Type><Type>red</Type>\n"
                     "                </SimpleTypeEnforcementTypes>\n            </ResourceLabel>")
    err = refused(two)
    assert 'resource label "blue" holds 2 STE types; a resource label holds exactly one' in str(err)
    chw = XM.replace("</SimpleTypeEnforcementTypes>\n            </ResourceLabel>",
                     "</SimpleTypeEnforcementTypes><ChineseWallTypes><Type>red</Type>"
                     "</ChineseWallTypes>\n            </ResourceLabel>", 1)
    assert "holds Chinese Wall types; a resource label holds exactly one STE type and no" \
        in refused(chw).message


def test_schema_structure():
    assert "<PolicyHeader> lacks <PolicyName>" in refused(
        XM.replace("<PolicyName>xm-test</PolicyName>", "")).message
    err = refused(XM.replace('bootstrap="SystemManagement"', 'bootstrap="nobody"'))
    assert 'bootstrap label "nobody" is not one of the VM labels' in err.message
    err = refused(XM.replace("<Version>1.0</Version>", "<Version>one</Version>"))
    assert 'version "one" is not MAJOR.MINOR' in err.message
    err = refused(XM.replace("<PolicyHeader>", "<PolicyHeader><Bogus/>"))
    assert "<Bogus> is not allowed inside <PolicyHeader>" in err.message
    err = refused(XM.replace("<Date>", "<Version>1.0</Version><Date>"))
    assert "<Date> is out of order inside <PolicyHeader>" in err.message
    err = refused(XM.replace("<PolicyName>xm-test", "<PolicyName>xm:test"))
    assert 'contains ":"' in err.message
    err = refused(XM.replace('<Conflict name="RER">', '<Conflict name="RER" evil="1">'))
    assert 'attribute "evil" is not allowed on <Conflict>' in err.message
    err = refused(XM.replace("<Name>green</Name>", "<Name>__INACCESSIBLE__</Name>", 1))
    assert "reserved" in err.message
    assert "not well-formed XML" in refused(XM[:-40]).message


def test_toml_errors_name_key_and_line():
    def toml_refused(text: str) -> PolicyError:
        with pytest.raises(PolicyError) as info:
            policy_from_toml(text, "p.toml")
        return info.value

    bad = EXAMPLE_TOML.replace('Payroll = { ste = ["Payroll"], chwall = ["Payroll"] }',
                               'Payroll = { ste = ["Payroll"], chwall = ["Payroll", "Bank"] }')
    err = toml_refused(bad)
    line = _line_of(bad, 'Payroll = { ste = ["Payroll"]')
    assert str(err) == (f'p.toml:{line}: labels.vm.Payroll.chwall: VM label "Payroll" holds'
                        ' types "Payroll" and "Bank" of conflict set "RER"; a label may hold at'
                        " most one type of a conflict set")
    err = toml_refused(EXAMPLE_TOML.replace('BankData = "Bank"', 'BankData = "Cash"'))
    assert re.match(r'p\.toml:\d+: labels\.resource\.BankData: resource label "BankData" holds'
                    r' STE type "Cash", which is not declared', str(err))
    err = toml_refused(EXAMPLE_TOML.replace('BankData = "Bank"', 'BankData = ["Bank", "Payroll"]'))
    assert "holds 2 STE types; a resource label holds exactly one" in err.message
    bad = EXAMPLE_TOML.replace('BankData = "Bank"', "BankData = 3")
    err = toml_refused(bad)  # what was found, and the two forms expected
    assert str(err) == (f"p.toml:{_line_of(bad, 'BankData = 3')}: labels.resource.BankData: found"
                        ' the integer 3; expected the label\'s STE type: BankData = "TYPE" (or'
                        ' BankData = { ste = "TYPE", from = "OLD-NAME" })')
    err = toml_refused(EXAMPLE_TOML.replace('Payroll = { ste = ["Payroll"], chwall = ["Payroll"] }',
                                            'Payroll = "Payroll"'))
    assert err.message == ('found the string "Payroll"; expected the label\'s types:'
                           ' Payroll = { ste = ["TYPE", ...], chwall = ["TYPE", ...] }')
    err = toml_refused("name = 'x'\nste = true\n")
    assert str(err) == "p.toml:2: ste: found the boolean true; expected a table: [ste] or ste = { ... }"
    err = toml_refused(EXAMPLE_TOML.replace("[ste]", "[ste]\ncolour = 1"))
    assert err.where.key == "ste" and 'unknown key "colour"' in err.message
    err = toml_refused(EXAMPLE_TOML.replace('["SystemManagement", "Payroll", "Bank", "StorageA"]\n',
                                            '["SystemManagement", "Payroll", "Bank", "Bank"]\n', 1))
    assert 'duplicate STE type "Bank"' in err.message and err.where.key == "ste.types"
    err = toml_refused("name = 'x'\n[labels.vm]\nA = { ste = 3 }\n")
    assert str(err).startswith("p.toml:3: labels.vm.A: must be a list")
    err = toml_refused('name = "x"\nname = "y"\n')
    assert str(err).startswith("p.toml:2: not valid TOML")
    err = toml_refused('version = "1.0"\n')
    assert "name: is missing" in str(err)


def test_toml_files_are_bounded_too(tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * MAX_BYTES)
    with pytest.raises(PolicyError, match="over the 1048576-byte limit"):
        load_policy(big)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "x"\n# \xc3\x28\n')
    with pytest.raises(PolicyError, match=r"bad\.toml:2: invalid UTF-8"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")


@pytest.mark.parametrize("deep", ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000])
def test_toml_nested_too_deeply_is_refused_in_one_line(tmp_path, deep):
    """The XML loader bounds nesting (MAX_DEPTH); tomllib recursed into a RecursionError and
    `policy check` printed a traceback."""
    path = tmp_path / "deep.toml"
    path.write_text(f'name = "x"\nx = {deep}\n')
    with pytest.raises(PolicyError, match="not valid TOML: arrays or tables nested too deeply"):
        load_policy(path)
