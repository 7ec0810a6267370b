"""A domain's log lines are written behind: a stderr nobody reads never blocks the caller."""

from __future__ import annotations

import io
import logging
import threading
import time

from trustvbd.domains.common import WrittenBehind


class Stalled(io.StringIO):
    """A stream whose writes block until `go` is set (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def write(self, text: str) -> int:
        self.go.wait()
        return super().write(text)


def test_lines_beyond_the_backlog_are_dropped_counted_and_said_never_waited_for() -> None:
    stream = Stalled()
    handler = WrittenBehind(stream, "crypt", backlog=10)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.written_behind")
    log.propagate, log.handlers[:] = False, [handler]
    started = time.monotonic()
    for i in range(100):  # the writer thread holds one line, the queue 10: the rest dropped
        log.warning("line %d", i)
    assert time.monotonic() - started < 2, "a log call waited for the stalled stream"
    stream.go.set()
    handler.flush()
    lines = stream.getvalue().splitlines()
    said = [line for line in lines if line.startswith("line ")]
    # the queue's 10, and one more if the writer thread took the first before the flood
    assert said == [f"line {i}" for i in range(len(said))] and len(said) in (10, 11), lines
    dropped = [line for line in lines if "log line(s) dropped" in line]
    assert dropped == [f"[crypt] WARNING {100 - len(said)} log line(s) dropped: stderr was"
                       " not read fast enough"], lines
    log.warning("after")  # the next line after a drop is said as usual
    handler.flush()
    assert stream.getvalue().splitlines()[-1] == "after"
