"""The native TOML policy form: the same model as Xen's XML, written more simply.

    name = "example"
    bootstrap = "SystemManagement"          # label of the management domain
    [ste]
    types = ["SystemManagement", "Payroll"]
    [chinese_wall]
    types = ["SystemManagement", "Payroll", "Bank"]
    conflict_sets = { RER = ["Payroll", "Bank"] }
    [labels.vm]
    SystemManagement = { ste = ["SystemManagement", "Payroll"], chwall = ["SystemManagement"] }
    Payroll = { ste = ["Payroll"], chwall = ["Payroll"] }
    [labels.resource]
    PayrollData = "Payroll"                 # a resource label is exactly one STE type

docs/policy.md is the reference. Errors name the file, the key and, when it can
be found, the line.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

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

MAX_BYTES = 1 << 20
_TOP = {"name", "version", "url", "reference", "date", "namespace_url", "from_policy",
        "bootstrap", "primary", "ste", "chinese_wall", "labels"}
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


class _Reader:
    """Typed access to the parsed TOML that reports file, key and (best effort) line."""

    def __init__(self, file: str, text: str) -> None:
        self.file, self.lines = file, text.splitlines()

    def line(self, section: str, key: str) -> int | None:
        start = 0
        if section:
            want = section.replace(" ", "")
            for i, raw in enumerate(self.lines):
                if raw.strip().replace(" ", "").replace('"', "") == f"[{want}]":
                    start = i + 1
                    break
            else:
                return None
        pattern = re.compile(rf'(^|[{{,]\s*)\s*(["\']?){re.escape(key)}\2\s*=')
        for i in range(start, len(self.lines)):
            if section == "" and self.lines[i].lstrip().startswith("["):
                return None
            if pattern.search(self.lines[i]):
                return i + 1
        return None

    def where(self, section: str, key: str, sub: str = "") -> Where:
        path = f"{section}.{key}" if section else key
        return Where(self.line(section, key), path + sub)

    def error(self, section: str, key: str, message: str, sub: str = "") -> PolicyError:
        return PolicyError(self.file, self.where(section, key, sub), message)

    def table(self, data: Any, section: str, key: str, allowed: set[str],
              expected: str | None = None) -> dict[str, Any]:
        if not isinstance(data, dict):
            path = f"{section}.{key}" if section else key
            raise self.error(section, key, f"found {found(data)}; expected "
                             + (expected or f"a table: [{path}] or {key} = {{ ... }}"))
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.error(section, key, f'unknown key "{unknown[0]}"; allowed here:'
                             f" {', '.join(sorted(allowed))}")
        return data

    def string(self, data: Any, section: str, key: str) -> str:
        if not isinstance(data, str) or not data:
            raise self.error(section, key, f"must be a non-empty string, not {data!r}")
        return data

    def strings(self, data: Any, section: str, key: str) -> tuple[str, ...]:
        if not isinstance(data, list) or not all(isinstance(s, str) and s for s in data):
            raise self.error(section, key, f"must be a list of non-empty strings, not {data!r}")
        return tuple(data)


def found(value: Any) -> str:
    """A TOML value as an error message names it: its kind and its text (shortened)."""
    kinds = ((bool, "the boolean"), (int, "the integer"), (float, "the number"),
             (str, "the string"), (list, "the array"), (dict, "the table"))
    kind = next((name for t, name in kinds if isinstance(value, t)), f"a {type(value).__name__}")
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"


def policy_from_toml(text: str, file: str = "policy.toml") -> Policy:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise PolicyError(file, Where(int(m.group(1)) if m else None),
                          f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nested array or inline table
        raise PolicyError(file, None, "not valid TOML: arrays or tables nested too deeply"
                          ) from None
    r = _Reader(file, text)
    top = r.table(raw, "", "", _TOP)
    opt = {k: r.string(top[k], "", k) if k in top else None
           for k in ("version", "url", "reference", "date", "namespace_url", "bootstrap",
                     "primary")}
    if "name" not in top:
        raise r.error("", "name", 'is missing; add e.g. name = "my-policy"')
    from_policy = None
    if "from_policy" in top:
        fp = r.table(top["from_policy"], "", "from_policy", {"name", "version"})
        if set(fp) != {"name", "version"}:
            raise r.error("", "from_policy", "needs both name and version")
        from_policy = (r.string(fp["name"], "", "from_policy"),
                       r.string(fp["version"], "", "from_policy"))
    for key, value in (("version", opt["version"]),
                       ("from_policy", from_policy[1] if from_policy else None)):
        if value is not None and not re.match(r"^[0-9]{1,8}\.[0-9]{1,8}$", value):
            raise r.error("", key, f'version "{value}" is not MAJOR.MINOR, e.g. "1.0"')
    header = Header(r.string(top["name"], "", "name"), opt["version"], opt["url"],
                    opt["reference"], opt["date"], opt["namespace_url"], from_policy)

    ste = r.table(top.get("ste", {}), "", "ste", {"types"})
    ste_types = r.strings(ste.get("types", []), "ste", "types")
    chw = r.table(top.get("chinese_wall", {}), "", "chinese_wall", {"types", "conflict_sets"})
    chw_types = r.strings(chw.get("types", []), "chinese_wall", "types")
    sets = chw.get("conflict_sets", {})
    if not isinstance(sets, dict):
        raise r.error("chinese_wall", "conflict_sets", f"found {found(sets)}; expected a table:"
                      ' conflict_sets = { NAME = ["TYPE", ...], ... }')
    conflicts = tuple(ConflictSet(n, r.strings(t, "chinese_wall", n)) for n, t in sets.items())

    labels = r.table(top.get("labels", {}), "", "labels", {"vm", "resource"})
    vm_raw = r.table(labels.get("vm", {}), "labels", "vm", set(labels.get("vm", {})))
    vms = []
    for name, spec in vm_raw.items():
        spec = r.table(spec, "labels.vm", name, {"ste", "chwall", "from"},
                       f'the label\'s types: {name} = {{ ste = ["TYPE", ...], chwall = ["TYPE", ...] }}')
        vms.append(VmLabel(name, r.strings(spec.get("ste", []), "labels.vm", name),
                           r.strings(spec.get("chwall", []), "labels.vm", name),
                           r.string(spec["from"], "labels.vm", name) if "from" in spec else None))
    res_raw = labels.get("resource", {})
    res_raw = r.table(res_raw, "labels", "resource", set(res_raw) if isinstance(res_raw, dict)
                      else set())
    resources = []
    for name, spec in res_raw.items():
        if isinstance(spec, str):
            spec = {"ste": spec}
        many = spec.get("ste") if isinstance(spec, dict) else spec
        if isinstance(many, list):
            raise r.error("labels.resource", name, f'resource label "{name}" holds {len(many)}'
                          ' STE types; a resource label holds exactly one: write NAME = "TYPE"')
        spec = r.table(spec, "labels.resource", name, {"ste", "from"},
                       f'the label\'s STE type: {name} = "TYPE" (or {name} = {{ ste = "TYPE",'
                       ' from = "OLD-NAME" })')
        if "ste" not in spec:
            raise r.error("labels.resource", name, "needs its STE type: NAME = \"TYPE\"")
        resources.append(ResourceLabel(
            name, r.string(spec["ste"], "labels.resource", name),
            r.string(spec["from"], "labels.resource", name) if "from" in spec else None))

    def locate(kind: str, *rest: Any) -> Where:
        if kind == "header":
            return r.where("", "name")
        if kind in ("bootstrap", "primary"):
            return r.where("", kind)
        if kind in ("ste_type", "chw_type"):
            return r.where("ste" if kind == "ste_type" else "chinese_wall", "types")
        if kind == "conflict" and rest:
            name = conflicts[rest[0]].name
            return Where(r.line("chinese_wall", name), f"chinese_wall.conflict_sets.{name}")
        if kind == "vm" and rest:
            sub = f".{rest[1]}" if len(rest) > 1 else ""
            return r.where("labels.vm", vms[rest[0]].name, sub)
        if kind == "res" and rest:
            return r.where("labels.resource", resources[rest[0]].name)
        return Where()

    policy = Policy(header, ste_types, chw_types, conflicts, tuple(vms), tuple(resources),
                    opt["bootstrap"], opt["primary"], source=file)
    return validate(policy, file, locate)


def load_toml(path: str | Path) -> Policy:
    path = Path(path)
    data = read_policy_file(str(path), MAX_BYTES)  # never more than the limit, however big
    if len(data) > MAX_BYTES:
        raise PolicyError(str(path), None, f"file is over the {MAX_BYTES}-byte limit for a"
                          " policy; refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(str(path), Where(line), "invalid UTF-8; policies must be UTF-8") from None
    return policy_from_toml(text, str(path))


def _s(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _k(key: str) -> str:
    return key if _BARE.match(key) else _s(key)


def _list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_s(v) for v in values) + "]"


def to_toml(policy: Policy) -> str:
    if policy.is_null:
        raise ValueError("the NULL policy has no TOML form: it is the absence of a policy")
    h = policy.header
    out = ["# sHype/ACM policy (trustvbd TOML form); see docs/policy.md", f"name = {_s(h.name)}"]
    for key, value in (("version", h.version), ("url", h.url), ("reference", h.reference),
                       ("date", h.date), ("namespace_url", h.namespace_url),
                       ("bootstrap", policy.bootstrap), ("primary", policy.primary)):
        if value is not None:
            out.append(f"{key} = {_s(value)}")
    if h.from_policy:
        out.append(f"from_policy = {{ name = {_s(h.from_policy[0])},"
                   f" version = {_s(h.from_policy[1])} }}")
    if policy.ste_types:
        out += ["", "[ste]", f"types = {_list(policy.ste_types)}"]
    if policy.chwall_types:
        out += ["", "[chinese_wall]", f"types = {_list(policy.chwall_types)}"]
        if policy.conflict_sets:
            out.append("[chinese_wall.conflict_sets]")
            out += [f"{_k(c.name)} = {_list(c.types)}" for c in policy.conflict_sets]
    if policy.vm_labels:
        out += ["", "[labels.vm]"]
        for v in policy.vm_labels:
            parts = [f"ste = {_list(v.ste)}", f"chwall = {_list(v.chwall)}"]
            if v.renamed_from:
                parts.append(f"from = {_s(v.renamed_from)}")
            out.append(f"{_k(v.name)} = {{ {', '.join(parts)} }}")
    if policy.resource_labels:
        out += ["", "[labels.resource]"]
        for res in policy.resource_labels:
            value = (f"{{ ste = {_s(res.ste)}, from = {_s(res.renamed_from)} }}"
                     if res.renamed_from else _s(res.ste))
            out.append(f"{_k(res.name)} = {value}")
    return "\n".join(out) + "\n"
