"""Helpers tests share: waiting on a condition instead of sleeping for a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path


async def eventually(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Yield to the event loop until `condition()` holds. The deadline is generous on purpose: it only
    turns a hang into a failure, and is never what a test synchronises on."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(0.002)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """The same, for a test that is not async."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.002)


def serve_workers(pid: int) -> set[int]:
    """The live worker processes of a `moorage serve --workers N` parent: its children, minus
    multiprocessing's resource tracker, which serves nothing."""
    workers = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_text(errors="replace")
            except OSError:  # it ended meanwhile
                continue
            if "resource_tracker" not in cmdline:
                workers.add(int(child))
    return workers
