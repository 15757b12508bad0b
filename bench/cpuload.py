"""How busy the machine was with other work while a benchmark phase ran (Linux /proc).

On a small shared machine a neighbour's job changes every number; each phase therefore records the
share of the machine's CPU time used by processes outside this benchmark (this process and the
servers it started), so a reader can tell a slow result from a busy machine.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _process(pid: int | str) -> int:
    """utime + stime clock ticks of one process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class OtherLoad:
    """`with OtherLoad(server_pids) as load: ...` then `load.share`: the fraction of the machine's CPU
    time spent outside this process and `pids` while the block ran (None where /proc is missing). With
    `children`, the CPU time of this process's children that ended (and were waited for) in the block
    counts as its own too: servers a bench starts and stops inside the block have no pid to list."""

    def __init__(self, pids: list[int] = (), children: bool = False) -> None:  # type: ignore[assignment]
        self.pids = ["self", *pids]
        self.children = children
        self.share: float | None = None

    def _own(self) -> int:
        own = sum(_process(p) for p in self.pids)
        if self.children:
            import resource

            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            own += round((usage.ru_utime + usage.ru_stime) * _TICK)
        return own

    def __enter__(self) -> OtherLoad:
        self._start, self._own_start = _machine(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _machine()
        if self._start is None or end is None or end[1] <= self._start[1]:
            return
        busy, total = end[0] - self._start[0], end[1] - self._start[1]
        other = busy - (self._own() - self._own_start)
        self.share = round(max(0.0, other / total), 3)
