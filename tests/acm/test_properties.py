"""Properties over random valid policies: STE symmetry, Chinese Wall counting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.acm.util import EXAMPLE_TOML, XM_TEST
from trustvbd.acm import (
    ChineseWall,
    Policy,
    PolicyError,
    domains_may_communicate,
    guest_may_use_disk,
)
from trustvbd.acm.model import ConflictSet, Header, ResourceLabel, VmLabel, Where, validate
from trustvbd.acm.toml_loader import policy_from_toml, to_toml
from trustvbd.acm.xml_loader import policy_from_xml, to_xml


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    ste = [f"s{i}" for i in range(draw(st.integers(1, 5)))]
    chw = [f"c{i}" for i in range(draw(st.integers(1, 5)))]
    sets = [ConflictSet(f"set{i}", tuple(draw(st.lists(st.sampled_from(chw), min_size=1,
                                                        max_size=4, unique=True))))
            for i in range(draw(st.integers(0, 3)))]
    vms = []
    for i in range(draw(st.integers(1, 6))):
        held: list[str] = []
        for t in draw(st.lists(st.sampled_from(chw), max_size=3, unique=True)):
            # keep the label legal: at most one type of any conflict set
            if not any(t in c.types and h in c.types for c in sets for h in held):
                held.append(t)
        vms.append(VmLabel(f"vm{i}", tuple(draw(st.lists(st.sampled_from(ste), max_size=3,
                                                         unique=True))), tuple(held)))
    res = [ResourceLabel(f"r{i}", draw(st.sampled_from(ste)))
           for i in range(draw(st.integers(0, 4)))]
    policy = Policy(Header("random", "1.0"), tuple(ste), tuple(chw), tuple(sets), tuple(vms),
                    tuple(res), vms[0].name)
    return validate(policy, "random", lambda *k: Where())


@settings(max_examples=150, deadline=None)
@given(policies())
def test_ste_is_symmetric_and_means_a_shared_type(p):
    for a in p.vm_labels:
        for b in p.vm_labels:
            ab = domains_may_communicate(p, a.name, b.name)
            assert ab.allowed == domains_may_communicate(p, b.name, a.name).allowed
            assert ab.allowed == bool(set(a.ste) & set(b.ste))
        for r in p.resource_labels:
            assert guest_may_use_disk(p, a.name, r.name).allowed == (r.ste in a.ste)


@settings(max_examples=60, deadline=None)
@given(policies())
def test_random_policies_convert_both_ways(p):
    assert policy_from_toml(to_toml(p)) == p
    assert policy_from_xml(to_xml(p).encode()) == p


@settings(max_examples=200, deadline=None)
@given(policies(), st.lists(st.tuples(st.booleans(), st.integers(0, 100)), max_size=40))
def test_chinese_wall_counting(p, ops):
    wall = ChineseWall(p)
    running = [p.bootstrap]  # labels of running domains, as a simple oracle
    types = {v.name: v.chwall for v in p.vm_labels}

    def conflicts(label: str) -> bool:
        return any(t != r and any(t in c.types and r in c.types for c in p.conflict_sets)
                   for t in types[label] for other in running for r in types[other])

    for start, n in ops:
        if start or not running:
            label = p.vm_labels[n % len(p.vm_labels)].name
            d = wall.start(label)
            assert d.allowed == (not conflicts(label)), (label, running, d)
            if d.allowed:
                running.append(label)
        else:
            wall.stopped(running.pop(n % len(running)))
        assert all(c >= 0 for c in wall.running.values())
        assert all(c >= 0 for c in wall.aggregate.values())
        expected: dict[str, int] = {}
        for label in running:
            for t in types[label]:
                expected[t] = expected.get(t, 0) + 1
        assert dict(wall.running) == expected
    for label in running:
        wall.stopped(label)
    assert not wall.running and not wall.aggregate  # everything back to zero


XM_BYTES = XM_TEST.read_bytes()
TOML_TEXT = EXAMPLE_TOML


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(XM_BYTES) - 1), st.binary(max_size=8)),
                min_size=1, max_size=4))
def test_mangled_xml_is_loaded_or_refused_cleanly(edits):
    data = XM_BYTES
    for pos, junk in edits:
        data = data[:pos] + junk + data[pos + len(junk) // 2:]
    try:
        policy_from_xml(data, "fuzz.xml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.xml")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(TOML_TEXT) - 1), st.text(max_size=6)),
                min_size=1, max_size=4))
def test_mangled_toml_is_loaded_or_refused_cleanly(edits):
    text = TOML_TEXT
    for pos, junk in edits:
        text = text[:pos] + junk + text[pos + len(junk) // 2:]
    try:
        policy_from_toml(text, "fuzz.toml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.toml")
