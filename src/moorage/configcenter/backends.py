"""Where the config center keeps its state: the catalog database (the default, no new service) or etcd.

Both keep drafts by scope, releases by number, instance reports by id and a revision that grows with
every change an instance may care about; `wait` blocks until the revision passes a value. One
conformance suite (tests/integration/test_config_center.py) runs on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .releases import Release


class Backend(Protocol):
    def get_draft(self, scope: str) -> dict | None: ...

    def put_draft(self, scope: str, values: dict, author: str) -> None: ...

    def add_release(self, build: Callable[[int], Release]) -> Release:
        """Store ``build(next_number)`` and bump the revision, atomically."""
        ...

    def update_release(self, number: int, change: Callable[[Release], Release]) -> Release:
        """Replace release `number` by ``change(current)`` and bump the revision, atomically."""
        ...

    def releases(self) -> list[Release]:
        """Every release, oldest first."""
        ...

    def revision(self) -> int: ...

    def wait(self, after: int, timeout_s: float) -> int: ...

    def put_report(self, report: dict) -> None: ...

    def reports(self) -> list[dict]: ...

    def close(self) -> None: ...
