"""`kill -USR1 PID` of a domain writes where each of its tasks and threads is waiting.

A trusted domain that stops answering leaves nothing in its log: its event loop is idle
in epoll while some task waits on a future no one will complete, which gdb does not
show. The asyncio tasks' stacks say which await it is; the threads' stacks cover
native waits. Written to stderr in one write, beside the domain's log lines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Any

# Frames shown per task or thread: the innermost matter; a deep stack is cut from the top.
FRAMES = 12


def _awaits(task: asyncio.Task[object]) -> list[FrameType]:
    """The task's await chain, outermost first (Task.get_stack shows only one frame of a
    suspended coroutine: not the await it is stuck in)."""
    frames: list[FrameType] = []
    waits: Any = task.get_coro()
    while waits is not None:
        frame = getattr(waits, "cr_frame", None) or getattr(waits, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        waits = getattr(waits, "cr_await", None) or getattr(waits, "gi_yieldfrom", None)
    return frames


def _task_lines(task: asyncio.Task[object]) -> list[str]:
    frames = _awaits(task)
    if not frames:  # a coroutine of compiled code (uvloop's)
        return [f"task {task.get_name()}: {task.get_coro()!r}\n"]
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames[-FRAMES:])
    return [f"task {task.get_name()}:\n", *summary.format()]


def _thread_lines() -> list[str]:
    names = {t.ident: t.name for t in threading.enumerate()}
    lines: list[str] = []
    for ident, frame in sys._current_frames().items():
        lines.append(f"thread {names.get(ident, ident)}:\n")
        lines += traceback.format_stack(frame, limit=FRAMES)
    return lines


def dump(domain: str) -> str:
    """The stacks of every task of the running loop and of every thread, as text."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    lines = [f"[{domain}] stack dump (SIGUSR1), pid {os.getpid()}: {len(tasks)} tasks\n"]
    for task in tasks:
        lines += _task_lines(task)
    lines += _thread_lines()
    lines.append(f"[{domain}] end of stack dump\n")
    return "".join(lines)


def install(domain: str) -> None:
    """From inside the domain's running loop: SIGUSR1 dumps its stacks to stderr."""
    def on_signal() -> None:
        try:
            os.write(2, dump(domain).encode(errors="replace"))
        except OSError:
            pass  # stderr gone: nothing to tell anyone

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, on_signal)
