"""The sHype/ACM policy model and the rules every loaded policy must satisfy.

Both loaders (Xen XML, native TOML) build a `Policy` and hand it to `validate`,
so the two forms are checked by the same code and mean exactly the same thing.
The model is immutable: the access-control domain swaps whole policies, never
edits one in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trustvbd.regular_file import NotRegularFile, read_regular

UNLABELED = "__UNLABELED__"  # Xen's label for anything without a label
INACCESSIBLE = "__INACCESSIBLE__"  # Xen's label for resources nobody may use
RESERVED = (INACCESSIBLE,)  # may not be defined by a policy (UNLABELED may: Xen's DEFAULT does)


@dataclass(frozen=True)
class Where:
    """Where something was written: a line (XML, TOML when found) and/or a TOML key."""

    line: int | None = None
    key: str | None = None


class PolicyError(ValueError):
    """A policy the loaders refuse: `file:line: reason` (or `file: key: reason`)."""

    def __init__(self, file: str, where: Where | None, message: str) -> None:
        self.file, self.where, self.message = str(file), where or Where(), message
        w = self.where
        prefix = f"{self.file}:{w.line}: " if w.line else f"{self.file}: "
        if w.key:
            prefix += f"{w.key}: "
        super().__init__(prefix + message)


def read_policy_file(path: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a policy file. Only a regular file: the launcher loads
    a policy on its event loop (`policy load`), and a FIFO, a terminal or a device would hold
    it in open() or read() for good. OSError for what cannot be read."""
    try:
        return read_regular(path, "a policy", limit)
    except NotRegularFile as exc:
        raise PolicyError(path, None, f"{exc.strerror}; refused") from None


@dataclass(frozen=True)
class VmLabel:
    """A subject label: any number of STE types, Chinese Wall types."""

    name: str
    ste: tuple[str, ...] = ()
    chwall: tuple[str, ...] = ()
    renamed_from: str | None = None  # Xen's <Name from="..."> (label renaming on update)


@dataclass(frozen=True)
class ResourceLabel:
    """An object label: exactly one STE type, never Chinese Wall types."""

    name: str
    ste: str
    renamed_from: str | None = None


@dataclass(frozen=True)
class ConflictSet:
    name: str
    types: tuple[str, ...]


@dataclass(frozen=True)
class Header:
    name: str
    version: str | None = None  # required by Xen's final schema, absent in the 2006 form
    url: str | None = None
    reference: str | None = None
    date: str | None = None
    namespace_url: str | None = None
    from_policy: tuple[str, str] | None = None  # (name, version) this one updates


@dataclass(frozen=True)
class Policy:
    header: Header
    ste_types: tuple[str, ...] = ()
    chwall_types: tuple[str, ...] = ()
    conflict_sets: tuple[ConflictSet, ...] = ()
    vm_labels: tuple[VmLabel, ...] = ()
    resource_labels: tuple[ResourceLabel, ...] = ()
    bootstrap: str | None = None
    primary: str | None = None  # "ste" | "chinese_wall": Xen's priority attribute
    is_null: bool = False
    source: str = field(default="", compare=False)

    @classmethod
    def null(cls) -> Policy:
        """Xen's NULL policy: no policy configured, everything allowed."""
        return cls(Header("NULL"), is_null=True, source="(no policy)")

    @property
    def name(self) -> str:
        return self.header.name

    def vm_label(self, name: str) -> VmLabel | None:
        return next((v for v in self.vm_labels if v.name == name), None)

    def resource_label(self, name: str) -> ResourceLabel | None:
        return next((r for r in self.resource_labels if r.name == name), None)

    def conflict_sets_of(self, chwall_type: str) -> list[ConflictSet]:
        return [c for c in self.conflict_sets if chwall_type in c.types]

    def summary(self) -> dict[str, Any]:
        if self.is_null:
            return {"name": "NULL", "null": True}
        return {
            "name": self.name, "version": self.header.version, "null": False,
            "source": self.source, "ste_types": len(self.ste_types),
            "chwall_types": len(self.chwall_types), "conflict_sets": len(self.conflict_sets),
            "vm_labels": len(self.vm_labels), "resource_labels": len(self.resource_labels),
            "bootstrap": self.bootstrap,
        }


Locate = Callable[..., Where]  # locate("vm", i, "ste", j) -> Where, best effort


def validate(policy: Policy, file: str, locate: Locate) -> Policy:
    """Apply the rules Xen applies when compiling a policy; raise PolicyError at the first break."""

    def fail(message: str, *key: Any) -> PolicyError:
        return PolicyError(file, locate(*key), message)

    def unique(kind: str, names: list[str], key: str) -> None:
        seen: set[str] = set()
        for i, n in enumerate(names):
            if not n:
                raise fail(f"{kind} name is empty", key, i)
            if n in seen:
                raise fail(f'duplicate {kind} "{n}"; names must be unique', key, i)
            seen.add(n)

    if not policy.name:
        raise fail("policy name is empty", "header")
    if ":" in policy.name:  # Xen writes labels as ACM:POLICY:LABEL
        raise fail(f'policy name "{policy.name}" contains ":", which Xen forbids', "header")
    unique("STE type", list(policy.ste_types), "ste_type")
    unique("Chinese Wall type", list(policy.chwall_types), "chw_type")
    unique("conflict set", [c.name for c in policy.conflict_sets], "conflict")
    unique("VM label", [v.name for v in policy.vm_labels], "vm")
    unique("resource label", [r.name for r in policy.resource_labels], "res")
    ste, chw = set(policy.ste_types), set(policy.chwall_types)

    for i, cs in enumerate(policy.conflict_sets):
        if not cs.types:
            raise fail(f'conflict set "{cs.name}" holds no type', "conflict", i)
        for j, t in enumerate(cs.types):
            if t not in chw:
                raise fail(f'conflict set "{cs.name}" names type "{t}", which is not a declared'
                           " Chinese Wall type", "conflict", i, j)
            if t in cs.types[:j]:
                raise fail(f'conflict set "{cs.name}" names type "{t}" twice', "conflict", i, j)

    named: list[tuple[str, str, tuple[VmLabel | ResourceLabel, ...]]] = [
        ("VM label", "vm", policy.vm_labels), ("resource label", "res", policy.resource_labels)]
    for kind, key, labels in named:
        for i, label in enumerate(labels):
            if ":" in label.name:
                raise fail(f'{kind} "{label.name}" contains ":", which Xen forbids', key, i)
            if label.name in RESERVED:
                raise fail(f'{kind} "{label.name}" is reserved by Xen and may not be defined',
                           key, i)

    for i, vm in enumerate(policy.vm_labels):
        for part, types, declared, what in (("ste", vm.ste, ste, "STE"),
                                            ("chwall", vm.chwall, chw, "Chinese Wall")):
            for j, t in enumerate(types):
                if t not in declared:
                    raise fail(f'VM label "{vm.name}" holds {what} type "{t}", which is not'
                               f" declared; declare it in the policy's {what} types",
                               "vm", i, part, j)
                if t in types[:j]:
                    raise fail(f'VM label "{vm.name}" holds {what} type "{t}" twice',
                               "vm", i, part, j)
        for cs in policy.conflict_sets:
            held = [t for t in vm.chwall if t in cs.types]
            if len(held) > 1:
                raise fail(f'VM label "{vm.name}" holds types "{held[0]}" and "{held[1]}" of'
                           f' conflict set "{cs.name}"; a label may hold at most one type of a'
                           " conflict set", "vm", i, "chwall", vm.chwall.index(held[1]))

    for i, res in enumerate(policy.resource_labels):
        if res.ste not in ste:
            raise fail(f'resource label "{res.name}" holds STE type "{res.ste}", which is not'
                       " declared; declare it in the policy's STE types", "res", i, "ste")

    if policy.vm_labels and policy.bootstrap is None:
        raise fail("VM labels are defined but no bootstrap label is named", "bootstrap")
    if policy.bootstrap is not None and policy.vm_label(policy.bootstrap) is None:
        raise fail(f'bootstrap label "{policy.bootstrap}" is not one of the VM labels', "bootstrap")
    if policy.primary not in (None, "ste", "chinese_wall"):
        raise fail(f'primary "{policy.primary}" must be "ste" or "chinese_wall"', "primary")
    return policy
