"""Xen ACM XML policies (final schema and the 2006 form): safe reading, and writing.

Reading is hostile-input code, so it is bounded before anything is parsed:
at most MAX_BYTES, strict UTF-8, no DTD at all (that is where entity expansion
bombs and external entities live; Xen policies never carry one), nesting at
most MAX_DEPTH. Parsing goes through defusedxml's expat SAX driver, which also
refuses entity declarations and external references, and whose locator gives
the line number of every element for the error messages.
"""

from __future__ import annotations

import io
import re
import xml.sax
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.handler import ContentHandler, feature_namespaces
from xml.sax.saxutils import escape, quoteattr
from xml.sax.xmlreader import InputSource

from defusedxml.common import DefusedXmlException, DTDForbidden
from defusedxml.expatreader import DefusedExpatParser

from trustvbd.acm.model import (
    ConflictSet,
    Header,
    Policy,
    PolicyError,
    ResourceLabel,
    VmLabel,
    Where,
    read_policy_file,
    validate,
)

NS = "http://www.ibm.com"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
MAX_BYTES = 1 << 20
MAX_DEPTH = 16  # a Xen policy is 5 levels deep
_VERSION = re.compile(r"^[0-9]{1,8}\.[0-9]{1,8}$")
_DECL_ENCODING = re.compile(rb"^\s*<\?xml[^>]*encoding\s*=\s*[\"']([^\"']*)[\"']")

# The final schema's content models, as (child, min, max) sequences. Version is
# optional so the 2006 form loads; `to_xml` always writes it.
_SEQ: dict[str, list[tuple[str, int, int]]] = {
    "SecurityPolicyDefinition": [("PolicyHeader", 1, 1), ("SimpleTypeEnforcement", 0, 1),
                                 ("ChineseWall", 0, 1), ("SecurityLabelTemplate", 1, 1)],
    "PolicyHeader": [("PolicyName", 1, 1), ("PolicyUrl", 0, 1), ("Reference", 0, 1),
                     ("Date", 0, 1), ("NameSpaceUrl", 0, 1), ("Version", 0, 1),
                     ("FromPolicy", 0, 1)],
    "FromPolicy": [("PolicyName", 1, 1), ("Version", 1, 1)],
    "SimpleTypeEnforcement": [("SimpleTypeEnforcementTypes", 1, 1)],
    "ChineseWall": [("ChineseWallTypes", 1, 1), ("ConflictSets", 0, 1)],
    "SimpleTypeEnforcementTypes": [("Type", 1, 1 << 30)],
    "ChineseWallTypes": [("Type", 1, 1 << 30)],
    "ConflictSets": [("Conflict", 1, 1 << 30)],
    "Conflict": [("Type", 1, 1 << 30)],
    "SecurityLabelTemplate": [("SubjectLabels", 0, 1), ("ObjectLabels", 0, 1)],
    "SubjectLabels": [("VirtualMachineLabel", 1, 1 << 30)],
    "ObjectLabels": [("ResourceLabel", 1, 1 << 30)],
    # The schema allows repeated type blocks here; Xen reads only the first, so a
    # second one would silently be ignored: refuse it instead.
    "VirtualMachineLabel": [("Name", 1, 1), ("SimpleTypeEnforcementTypes", 0, 1),
                            ("ChineseWallTypes", 0, 1)],
    "ResourceLabel": [("Name", 1, 1), ("SimpleTypeEnforcementTypes", 1, 1)],
}
_ATTRS = {"ChineseWall": {"priority"}, "SimpleTypeEnforcement": {"priority"},
          "SubjectLabels": {"bootstrap"}, "Conflict": {"name"}, "Name": {"from"}}
_REQUIRED_ATTRS = {"SubjectLabels": "bootstrap", "Conflict": "name"}


@dataclass
class _Node:
    tag: str
    line: int
    attrs: dict[str, str]
    children: list[_Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


class _TreeBuilder(ContentHandler):
    """Builds _Nodes with line numbers; refuses foreign namespaces and deep nesting."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file
        self.stack: list[_Node] = []
        self.root: _Node | None = None
        self.locator: Any = None

    def setDocumentLocator(self, locator: Any) -> None:
        self.locator = locator

    def line(self) -> int:
        return int(self.locator.getLineNumber()) if self.locator else 0

    def startElementNS(self, name: tuple[str | None, str], qname: Any, attrs: Any) -> None:
        uri, tag = name
        if not self.stack and (uri, tag) != (NS, "SecurityPolicyDefinition"):
            raise PolicyError(self.file, Where(self.line()), f"root element is <{tag}>; a Xen ACM"
                              f' policy starts with <SecurityPolicyDefinition xmlns="{NS}">')
        if uri != NS:
            where = f"{{{uri}}}{tag}" if uri else tag
            raise PolicyError(self.file, Where(self.line()),
                              f'element <{where}> is not in the Xen ACM namespace "{NS}"')
        if len(self.stack) >= MAX_DEPTH:
            raise PolicyError(self.file, Where(self.line()),
                              f"elements nested deeper than {MAX_DEPTH} levels; refused")
        plain = {}
        for (auri, aname), value in attrs.items():
            if auri == XSI:
                continue  # xsi:schemaLocation and friends
            if auri or aname not in _ATTRS.get(tag, ()):
                raise PolicyError(self.file, Where(self.line()),
                                  f'attribute "{aname}" is not allowed on <{tag}>')
            plain[aname] = value
        node = _Node(tag, self.line(), plain)
        if self.stack:
            self.stack[-1].children.append(node)
        else:
            self.root = node
        self.stack.append(node)

    def endElementNS(self, name: Any, qname: Any) -> None:
        self.stack.pop()

    def characters(self, content: str) -> None:
        if self.stack:
            self.stack[-1].text.append(content)


def parse_xml_tree(data: bytes, file: str) -> _Node:
    """Bytes -> element tree with line numbers, or PolicyError saying what was refused."""
    if len(data) > MAX_BYTES:
        raise PolicyError(file, None, f"file is {len(data)} bytes, over the {MAX_BYTES}-byte"
                          " limit for a policy; refused")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(file, Where(line), f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at"
                          f" offset {exc.start}); policies must be UTF-8") from None
    declared = _DECL_ENCODING.match(data)
    if declared and declared.group(1).lower() not in (b"utf-8", b"utf8"):
        raise PolicyError(file, Where(1), f'declared encoding "{declared.group(1).decode()}"'
                          ' refused; write the policy in UTF-8 (encoding="UTF-8")')
    builder = _TreeBuilder(file)
    parser = DefusedExpatParser(forbid_dtd=True, forbid_entities=True, forbid_external=True)
    parser.setFeature(feature_namespaces, True)
    parser.setContentHandler(builder)
    source = InputSource(file)
    source.setByteStream(io.BytesIO(data))
    try:
        parser.parse(source)  # parse(), not feed(): it is what hands the builder its locator
    except DTDForbidden as exc:
        what = f'external DTD "{exc.sysid}"' if exc.sysid else f"<!DOCTYPE {exc.name}>"
        raise PolicyError(file, Where(builder.line()), f"{what} refused: a policy needs no DTD,"
                          " and DTDs carry entity expansion (XML bombs) and external"
                          " entities") from None
    except DefusedXmlException as exc:  # entity or external reference (reached only via DTD)
        raise PolicyError(file, Where(builder.line()), f"refused: {exc}") from None
    except xml.sax.SAXParseException as exc:
        raise PolicyError(file, Where(exc.getLineNumber()),
                          f"not well-formed XML: {exc.getMessage()}") from None
    if builder.root is None:
        raise PolicyError(file, None, "no XML element found")
    return builder.root


def _text(node: _Node, file: str) -> str:
    if node.children:
        raise PolicyError(file, Where(node.children[0].line),
                          f"<{node.tag}> holds text only, not <{node.children[0].tag}>")
    return "".join(node.text).strip()


def _seq(node: _Node, file: str) -> dict[str, list[_Node]]:
    """Check node's children against its content model; return them grouped by tag."""
    spec = _SEQ[node.tag]
    extra = "".join(node.text).strip()
    if extra:
        raise PolicyError(file, Where(node.line), f'text "{extra[:40]}" is not allowed'
                          f" inside <{node.tag}>")
    for attr in [_REQUIRED_ATTRS[node.tag]] if node.tag in _REQUIRED_ATTRS else []:
        if not node.attrs.get(attr):
            raise PolicyError(file, Where(node.line), f'<{node.tag}> lacks its "{attr}" attribute')
    found: dict[str, list[_Node]] = {name: [] for name, _, _ in spec}
    k = 0
    order = ", ".join(f"<{n}>" for n, _, _ in spec)
    for child in node.children:
        if child.tag not in found:
            raise PolicyError(file, Where(child.line), f"<{child.tag}> is not allowed inside"
                              f" <{node.tag}> (allowed, in this order: {order})")
        while k < len(spec) and spec[k][0] != child.tag:
            if len(found[spec[k][0]]) < spec[k][1]:
                raise PolicyError(file, Where(child.line), f"<{node.tag}> lacks <{spec[k][0]}>"
                                  f" before <{child.tag}>")
            k += 1
        if k == len(spec):
            raise PolicyError(file, Where(child.line), f"<{child.tag}> is out of order inside"
                              f" <{node.tag}> (allowed, in this order: {order})")
        found[child.tag].append(child)
        if len(found[child.tag]) > spec[k][2]:
            raise PolicyError(file, Where(child.line), f"<{node.tag}> holds more than one"
                              f" <{child.tag}>")
    for name, low, _ in spec[k:]:
        if len(found[name]) < low:
            raise PolicyError(file, Where(node.line), f"<{node.tag}> lacks <{name}>")
    return found


def _types(node: _Node | None, file: str, lines: list[int]) -> tuple[str, ...]:
    """Type names in a types block; empty <Type/> is skipped, as Xen's tools do."""
    if node is None:
        return ()
    out = []
    for t in _seq(node, file)["Type"]:
        name = _text(t, file)
        if name:
            out.append(name)
            lines.append(t.line)
    return tuple(out)


def _one(found: dict[str, list[_Node]], tag: str) -> _Node | None:
    return found[tag][0] if found[tag] else None


def policy_from_xml(data: bytes, file: str = "policy.xml") -> Policy:
    root = parse_xml_tree(data, file)
    lines: dict[tuple[Any, ...], int] = {}
    top = _seq(root, file)
    hdr_node = top["PolicyHeader"][0]
    hdr = _seq(hdr_node, file)
    item = {tag: _text(nodes[0], file) if nodes else None
            for tag, nodes in hdr.items() if tag != "FromPolicy"}
    lines[("header",)] = hdr["PolicyName"][0].line
    from_policy = None
    if hdr["FromPolicy"]:
        fp = _seq(hdr["FromPolicy"][0], file)
        from_policy = (_text(fp["PolicyName"][0], file), _text(fp["Version"][0], file))
    for version, node in ((item["Version"], _one(hdr, "Version")),
                          (from_policy[1] if from_policy else None, _one(hdr, "FromPolicy"))):
        if version is not None and not _VERSION.match(version):
            raise PolicyError(file, Where(node.line if node else None),
                              f'version "{version}" is not MAJOR.MINOR, e.g. "1.0"')
    header = Header(item["PolicyName"] or "", item["Version"], item["PolicyUrl"],
                    item["Reference"], item["Date"], item["NameSpaceUrl"], from_policy)

    primary = None
    ste_types: tuple[str, ...] = ()
    chw_types: tuple[str, ...] = ()
    conflicts: list[ConflictSet] = []
    for tag, key in (("SimpleTypeEnforcement", "ste"), ("ChineseWall", "chinese_wall")):
        node = _one(top, tag)
        if node is None:
            continue
        if node.attrs.get("priority") not in (None, "PrimaryPolicyComponent"):
            raise PolicyError(file, Where(node.line), f'<{tag}> priority must be'
                              ' "PrimaryPolicyComponent"')
        if node.attrs.get("priority"):
            if primary:
                raise PolicyError(file, Where(node.line), "both policy components claim"
                                  " priority; only one may be PrimaryPolicyComponent")
            primary, lines[("primary",)] = key, node.line
        parts = _seq(node, file)
        type_lines: list[int] = []
        if key == "ste":
            ste_types = _types(parts["SimpleTypeEnforcementTypes"][0], file, type_lines)
        else:
            chw_types = _types(parts["ChineseWallTypes"][0], file, type_lines)
            for i, c in enumerate(_seq(parts["ConflictSets"][0], file)["Conflict"]
                                  if parts["ConflictSets"] else []):
                cl: list[int] = []
                conflicts.append(ConflictSet(c.attrs["name"], _types(c, file, cl)))
                lines[("conflict", i)] = c.line
                lines.update({("conflict", i, j): n for j, n in enumerate(cl)})
        kind = "ste_type" if key == "ste" else "chw_type"
        lines.update({(kind, i): n for i, n in enumerate(type_lines)})

    template = _seq(top["SecurityLabelTemplate"][0], file)
    vms: list[VmLabel] = []
    bootstrap = None
    if template["SubjectLabels"]:
        subjects = template["SubjectLabels"][0]
        bootstrap, lines[("bootstrap",)] = subjects.attrs["bootstrap"], subjects.line
        for i, v in enumerate(_seq(subjects, file)["VirtualMachineLabel"]):
            parts = _seq(v, file)
            name = parts["Name"][0]
            sl: list[int] = []
            cl = []
            vms.append(VmLabel(_text(name, file),
                               _types(_one(parts, "SimpleTypeEnforcementTypes"), file, sl),
                               _types(_one(parts, "ChineseWallTypes"), file, cl),
                               name.attrs.get("from")))
            lines[("vm", i)] = v.line
            lines.update({("vm", i, "ste", j): n for j, n in enumerate(sl)})
            lines.update({("vm", i, "chwall", j): n for j, n in enumerate(cl)})
    resources: list[ResourceLabel] = []
    if template["ObjectLabels"]:
        for i, r in enumerate(_seq(template["ObjectLabels"][0], file)["ResourceLabel"]):
            first = next((c for c in r.children if c.tag == "Name"), None)
            name_text = _text(first, file) if first else ""
            if any(c.tag == "ChineseWallTypes" for c in r.children):
                raise PolicyError(file, Where(r.line), f'resource label "{name_text}" holds'
                                  " Chinese Wall types; a resource label holds exactly one STE"
                                  " type and no Chinese Wall types")
            parts = _seq(r, file)
            types = _types(parts["SimpleTypeEnforcementTypes"][0], file, [])
            if len(types) != 1:
                raise PolicyError(file, Where(r.line), f'resource label "{name_text}" holds'
                                  f" {len(types)} STE types; a resource label holds exactly one")
            resources.append(ResourceLabel(name_text, types[0], parts["Name"][0].attrs.get("from")))
            lines[("res", i)] = r.line

    def locate(*key: Any) -> Where:
        while key:
            if key in lines:
                return Where(lines[key])
            key = key[:-1]
        return Where()

    policy = Policy(header, ste_types, chw_types, tuple(conflicts), tuple(vms), tuple(resources),
                    bootstrap, primary, source=file)
    return validate(policy, file, locate)


def load_xml(path: str | Path) -> Policy:
    path = Path(path)
    data = read_policy_file(str(path), MAX_BYTES)  # never more than the limit, however big
    return policy_from_xml(data, str(path))


def to_xml(policy: Policy) -> str:
    """The policy in Xen's final XML form (what its security_policy.xsd accepts)."""
    if policy.is_null:
        raise ValueError("the NULL policy has no XML form: it is the absence of a policy")
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<SecurityPolicyDefinition xmlns="{NS}" xmlns:xsi="{XSI}"'
           f' xsi:schemaLocation="{NS} security_policy.xsd">', "\t<PolicyHeader>"]

    def leaf(indent: int, tag: str, text: str, attrs: str = "") -> None:
        out.append("\t" * indent + f"<{tag}{attrs}>{escape(text)}</{tag}>")

    def types(indent: int, tag: str, names: tuple[str, ...], attrs: str = "") -> None:
        out.append("\t" * indent + f"<{tag}{attrs}>")
        for n in names:
            leaf(indent + 1, "Type", n)
        out.append("\t" * indent + f"</{tag}>")

    h = policy.header
    for tag, value in (("PolicyName", h.name), ("PolicyUrl", h.url), ("Reference", h.reference),
                       ("Date", h.date), ("NameSpaceUrl", h.namespace_url),
                       ("Version", h.version or "1.0")):
        if value is not None:
            leaf(2, tag, value)
    if h.from_policy:
        out.append("\t\t<FromPolicy>")
        leaf(3, "PolicyName", h.from_policy[0])
        leaf(3, "Version", h.from_policy[1])
        out.append("\t\t</FromPolicy>")
    out.append("\t</PolicyHeader>")
    prio = ' priority="PrimaryPolicyComponent"'
    if policy.ste_types:
        out.append(f"\t<SimpleTypeEnforcement{prio if policy.primary == 'ste' else ''}>")
        types(2, "SimpleTypeEnforcementTypes", policy.ste_types)
        out.append("\t</SimpleTypeEnforcement>")
    if policy.chwall_types:
        out.append(f"\t<ChineseWall{prio if policy.primary == 'chinese_wall' else ''}>")
        types(2, "ChineseWallTypes", policy.chwall_types)
        if policy.conflict_sets:
            out.append("\t\t<ConflictSets>")
            for c in policy.conflict_sets:
                types(3, "Conflict", c.types, f" name={quoteattr(c.name)}")
            out.append("\t\t</ConflictSets>")
        out.append("\t</ChineseWall>")
    out.append("\t<SecurityLabelTemplate>")

    def name(indent: int, label: VmLabel | ResourceLabel) -> None:
        frm = f" from={quoteattr(label.renamed_from)}" if label.renamed_from else ""
        leaf(indent, "Name", label.name, frm)

    if policy.vm_labels:
        out.append(f"\t\t<SubjectLabels bootstrap={quoteattr(policy.bootstrap or '')}>")
        for v in policy.vm_labels:
            out.append("\t\t\t<VirtualMachineLabel>")
            name(4, v)
            if v.ste:
                types(4, "SimpleTypeEnforcementTypes", v.ste)
            if v.chwall:
                types(4, "ChineseWallTypes", v.chwall)
            out.append("\t\t\t</VirtualMachineLabel>")
        out.append("\t\t</SubjectLabels>")
    if policy.resource_labels:
        out.append("\t\t<ObjectLabels>")
        for r in policy.resource_labels:
            out.append("\t\t\t<ResourceLabel>")
            name(4, r)
            types(4, "SimpleTypeEnforcementTypes", (r.ste,))
            out.append("\t\t\t</ResourceLabel>")
        out.append("\t\t</ObjectLabels>")
    out += ["\t</SecurityLabelTemplate>", "</SecurityPolicyDefinition>", ""]
    return "\n".join(out)
