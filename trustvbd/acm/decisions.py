"""Access decisions: pure functions of a policy and labels, plus Chinese Wall state.

Semantics are Xen ACM's (xen/xsm/acm/*_hooks.c, tools/python/xen/util/acm*.py):
- STE: two subjects, or a subject and a resource, may share iff their labels
  hold at least one common STE type. A policy without STE types enforces none.
- Chinese Wall: counted exactly like Xen's running_types / conflict_aggregate_set.
- __UNLABELED__ resolves to the policy's label of that name if it defines one,
  else to a label with no types (shares nothing, conflicts with nothing).
- __INACCESSIBLE__ resources may be used by nobody.
- A label the policy does not define is refused, never guessed.
- The NULL policy allows everything (callers warn loudly: policy.is_null).
Every answer is a Decision naming both labels and the rule, type or conflict
set that decided, so a refusal tells the operator what to change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from trustvbd.acm.model import INACCESSIBLE, UNLABELED, Policy, ResourceLabel, VmLabel


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "rule": self.rule, "reason": self.reason}


# The rule of a Chinese Wall refusal by a restarted access-control domain that is still
# waiting for the encryption domains to restore their counts: retry in a moment.
RESTORING = "acm-restoring"


def _q(kind: str, label: str, who: str | None) -> str:
    return f'{kind} {who} (label "{label}")' if who else f'{kind} label "{label}"'


def resolve_vm(policy: Policy, label: str) -> VmLabel | None:
    found = policy.vm_label(label)
    if found is None and label == UNLABELED:
        return VmLabel(UNLABELED)  # Xen's ssidref 0: no types at all
    return found


def resolve_resource(policy: Policy, label: str) -> ResourceLabel | None:
    return policy.resource_label(label)


def _ste(policy: Policy, a_kind: str, a: str, a_who: str | None, b_kind: str, b: str,
         b_who: str | None, b_is_resource: bool) -> Decision:
    """Share-a-type check between a VM label `a` and a VM or resource label `b`."""
    qa, qb = _q(a_kind, a, a_who), _q(b_kind, b, b_who)
    if policy.is_null:
        return Decision(True, "null-policy", f"no policy configured (NULL policy): {qa} and"
                        f" {qb} are allowed, as everything is")
    va = resolve_vm(policy, a)
    if va is None:
        return Decision(False, "unknown-label", f'{qa}: policy "{policy.name}" defines no VM'
                        f' label "{a}"')
    if b_is_resource and b == INACCESSIBLE:
        return Decision(False, "inaccessible", f"{qb} is inaccessible: nobody may use it ({qa}"
                        " refused)")
    if b_is_resource:
        rb = resolve_resource(policy, b)
        if rb is None and b == UNLABELED:
            return Decision(False, "unlabeled", f"{qb} is not labeled and policy"
                            f' "{policy.name}" gives unlabeled resources no type ({qa} refused)')
        if rb is None:
            return Decision(False, "unknown-label", f'{qb}: policy "{policy.name}" defines no'
                            f' resource label "{b}"')
        b_types: tuple[str, ...] = (rb.ste,)
    else:
        vb = resolve_vm(policy, b)
        if vb is None:
            return Decision(False, "unknown-label", f'{qb}: policy "{policy.name}" defines no'
                            f' VM label "{b}"')
        b_types = vb.ste
    if not policy.ste_types:  # Xen: no STE component, no STE enforcement (NULL secondary)
        return Decision(True, "ste-not-enforced", f'policy "{policy.name}" has no STE types,'
                        f" so STE allows {qa} and {qb}")
    common = [t for t in va.ste if t in b_types]
    if common:
        return Decision(True, "ste-shared-type", f'{qa} and {qb} share STE type "{common[0]}"')
    have = lambda ts: ", ".join(f'"{t}"' for t in ts) or "none"  # noqa: E731
    return Decision(False, "ste-no-shared-type", f"{qa} and {qb} share no STE type ({a_kind}"
                    f" has {have(va.ste)}; {b_kind} has {have(b_types)})")


def guest_may_use_disk(policy: Policy, guest_label: str, disk_label: str,
                       guest: str | None = None, disk: str | None = None) -> Decision:
    """Check (b): may a guest (VM label) use a disk (resource label)?"""
    return _ste(policy, "guest", guest_label, guest, "disk", disk_label, disk, True)


def driver_may_serve_disk(policy: Policy, driver_label: str, disk_label: str,
                          driver: str | None = None, disk: str | None = None) -> Decision:
    """Check (a): may a driver domain (VM label) hold a disk (resource label)?"""
    return _ste(policy, "driver", driver_label, driver, "disk", disk_label, disk, True)


def domains_may_communicate(policy: Policy, a_label: str, b_label: str,
                            a: str | None = None, b: str | None = None) -> Decision:
    """Channels between domains (Xen: event channels, grant maps). Symmetric."""
    return _ste(policy, "domain", a_label, a, "domain", b_label, b, False)


def domain_may_run(policy: Policy, label: str, who: str | None = None) -> Decision:
    """Xen's authorization hook: the bootstrap label's STE types must cover the new label's."""
    q = _q("domain", label, who)
    if policy.is_null:
        return Decision(True, "null-policy", f"no policy configured (NULL policy): {q} may run")
    vm = resolve_vm(policy, label)
    if vm is None:
        return Decision(False, "unknown-label", f'{q}: policy "{policy.name}" defines no VM'
                        f' label "{label}"')
    boot = policy.vm_label(policy.bootstrap) if policy.bootstrap else None
    missing = [t for t in vm.ste if boot is not None and t not in boot.ste]
    if policy.ste_types and missing:
        return Decision(False, "ste-authorization", f'{q} holds STE type "{missing[0]}", which'
                        f' the bootstrap label "{policy.bootstrap}" does not; it may not run here')
    return Decision(True, "ste-authorization", f'{q} may run: the bootstrap label covers its'
                    " STE types")


class ChineseWall:
    """Running Chinese Wall types on this host, counted as Xen counts them.

    Xen keeps running_types[t] (domains holding t) and conflict_aggregate_set[t]:
    for every running domain and every conflict set sharing a type with it, each
    *other* type of that set is counted. A domain may start iff none of its types
    has a non-zero aggregate count, i.e. no running domain holds a different type
    of a conflict set that one of its types is in. A domain never conflicts with
    its own type, so many domains of one type may run together.
    """

    def __init__(self, policy: Policy, bootstrap_running: bool = True) -> None:
        self.policy = policy
        self.running: Counter[str] = Counter()
        self.aggregate: Counter[str] = Counter()
        if bootstrap_running and policy.bootstrap and not policy.is_null:
            self.started(policy.bootstrap)  # dom0 is a running domain too

    def _types(self, label: str) -> tuple[str, ...] | None:
        vm = resolve_vm(self.policy, label)
        return None if vm is None else vm.chwall

    def may_start(self, label: str, who: str | None = None) -> Decision:
        q = _q("domain", label, who)
        if self.policy.is_null:
            return Decision(True, "null-policy", f"no policy configured (NULL policy): {q} may"
                            " start")
        types = self._types(label)
        if types is None:
            return Decision(False, "unknown-label", f'{q}: policy "{self.policy.name}" defines'
                            f' no VM label "{label}"')
        for t in types:
            if self.aggregate[t] > 0:
                for cs in self.policy.conflict_sets_of(t):
                    for r in cs.types:
                        if r != t and self.running[r] > 0:
                            return Decision(False, "chinese-wall", f'{q} holds Chinese Wall'
                                            f' type "{t}", which conflict set "{cs.name}" puts'
                                            f' against running type "{r}" ({self.running[r]}'
                                            " running); it may start once they have stopped")
                return Decision(False, "chinese-wall", f'{q}: type "{t}" conflicts with a running'
                                " type")  # unreachable with validated labels; fail closed
        shown = ", ".join(f'"{t}"' for t in types) or "no Chinese Wall types"
        return Decision(True, "chinese-wall", f"{q} may start: {shown} conflict with no running"
                        " type")

    def _adjust(self, types: tuple[str, ...], step: int) -> None:
        for t in types:
            self.running[t] += step
        for cs in self.policy.conflict_sets:
            if any(t in cs.types for t in types):
                for other in cs.types:
                    if other not in types:
                        self.aggregate[other] += step

    def started(self, label: str) -> None:
        """Count a domain as running (call after may_start allowed it)."""
        types = self._types(label)
        if types is None and not self.policy.is_null:
            raise ValueError(f'unknown VM label "{label}"')
        self._adjust(types or (), +1)

    def stopped(self, label: str) -> None:
        types = self._types(label) or ()
        if any(self.running[t] <= 0 for t in types):
            raise ValueError(f'VM label "{label}" is not running; refusing to count it down')
        self._adjust(types, -1)
        self.running, self.aggregate = +self.running, +self.aggregate  # drop zeros

    def start(self, label: str, who: str | None = None) -> Decision:
        """may_start and, when allowed, started — in one step (Xen's domain_create)."""
        decision = self.may_start(label, who)
        if decision.allowed:
            self.started(label)
        return decision


def explain(policy: Policy, guest_label: str, disk_label: str, guest: str | None = None,
            disk: str | None = None) -> list[str]:
    """Human lines: what each label holds, and the decision with its reason."""
    if policy.is_null:
        return ["NULL policy (no policy configured): everything is allowed",
                guest_may_use_disk(policy, guest_label, disk_label, guest, disk).reason]
    lines = [f'policy "{policy.name}" (version {policy.header.version or "none"},'
             f" from {policy.source or 'memory'})"]
    vm = resolve_vm(policy, guest_label)
    if vm is None:
        lines.append(f'guest label "{guest_label}": not defined by the policy')
    else:
        sets = sorted({c.name for t in vm.chwall for c in policy.conflict_sets_of(t)})
        lines.append(f'guest label "{guest_label}": STE types {list(vm.ste)}, Chinese Wall'
                     f" types {list(vm.chwall)}, conflict sets {sets}")
    res = resolve_resource(policy, disk_label)
    lines.append(f'disk label "{disk_label}": ' + (f'STE type "{res.ste}"' if res else
                                                  "not defined by the policy"))
    d = guest_may_use_disk(policy, guest_label, disk_label, guest, disk)
    lines.append(f"{'ALLOWED' if d.allowed else 'REFUSED'} by rule {d.rule}: {d.reason}")
    return lines
