"""The bounded fuzz run of `make test`: every saved corpus input, then hypothesis.

Each input must end in a normal return or one of the target's documented
refusals (tests/fuzz/targets.py), within TIME_LIMIT seconds and without
allocating more than MEMORY_LIMIT bytes of Python memory: no crash, no hang, no
length field that makes a parser allocate what the input does not hold.
Hypothesis mutates the corpus at the byte level (flips, truncations, interesting
integers dropped over fields) and also tries raw bytes. The coverage-guided run
is `make fuzz` (tests/fuzz/run.py).
"""

from __future__ import annotations

import contextlib
import signal
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS, Target, corpus, run_one

TIME_LIMIT = 5  # seconds per input; every input here takes milliseconds
MEMORY_LIMIT = 64 << 20  # peak Python allocation per input
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 4096, 4095, 64 * 1024 + 1]


class Hang(Exception):
    pass


@contextlib.contextmanager
def bounded() -> Iterator[None]:
    """Fail an input that runs over TIME_LIMIT or allocates over MEMORY_LIMIT."""
    def alarm(_sig: int, _frame: object) -> None:
        raise Hang(f"input ran for more than {TIME_LIMIT} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT)
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak < MEMORY_LIMIT, f"input made the parser allocate {peak} bytes"
    finally:
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check(target: Target, data: bytes) -> None:
    with bounded():
        run_one(target, data)


CASES = [(name, file) for name in TARGETS for file, _ in corpus(name)]


@pytest.mark.parametrize(("name", "file"), CASES, ids=[f"{n}/{f}" for n, f in CASES])
def test_corpus_input(name: str, file: str) -> None:
    check(TARGETS[name], dict(corpus(name))[file])


def test_every_target_has_seeds() -> None:
    assert all(corpus(name) for name in TARGETS), "run python -m tests.fuzz.seeds"


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], max_len: int) -> bytes:
    if not seeds or draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=min(max_len, 512)))
    out = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        op = draw(st.sampled_from(["flip", "byte", "int", "cut", "insert", "repeat"]))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and out:
            out[at] = draw(st.integers(0, 255))
        elif op == "int":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            out[at:at + width] = value.to_bytes(width, "big")
        elif op == "cut":
            del out[at:at + draw(st.integers(1, 64))]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            out[at:at] = bytes(out[at:at + 8]) * draw(st.integers(1, 64))
    return bytes(out[:max_len])


@pytest.mark.parametrize("name", list(TARGETS))
def test_mutations(name: str) -> None:
    target = TARGETS[name]
    seeds = [data for _, data in corpus(name)]

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(seeds, target.max_len))
    def run(data: bytes) -> None:
        check(target, data)

    run()
