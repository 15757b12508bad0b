"""Which job runners that share this home folder are alive, without waiting for their leases.

While it lives, each runner holds an exclusive lock on its own file, ``HOME/runners/RUNNER_ID.lock``.
The kernel drops the lock when the process ends, however it ends (SIGKILL, OOM), so a runner that
starts and manages to lock another runner's file knows that runner is gone and can end its leases
at once (`JobStore.expire`) instead of waiting ``jobs.lease_s`` for them to run out. A file it
cannot lock belongs to a live runner (another worker of ``serve --workers N``, say); a runner that
does not share the home folder (another machine) is never judged here, only by its leases.
Without ``fcntl`` (not a POSIX system) every runner is left to its leases.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("moorage.jobs")


class RunnerLock:
    """This runner's lock file in `folder`, and the test of the others'."""

    def __init__(self, folder: Path, runner_id: str) -> None:
        self.folder = folder
        self.runner_id = runner_id
        self.path = folder / f"{runner_id}.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Lock this runner's file for as long as the process lives (or until `release`). The file
        is locked under a temporary name, then renamed: a runner looking at the folder never finds
        it unlocked and mistakes a starting runner for a dead one."""
        if fcntl is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{self.runner_id}.starting"
        file = staging.open("w")
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        file.write(f"{os.getpid()}\n")
        file.flush()
        staging.rename(self.path)
        self._file = file

    def release(self) -> None:
        """Remove the file and drop the lock (a runner that stops cleanly)."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def dead_runners(self) -> list[str]:
        """The ids of runners whose lock files are here and unlocked: their processes have ended.
        Their files are removed. Two runners starting together may both name the same dead one."""
        if fcntl is None or not self.folder.is_dir():
            return []
        dead = []
        for path in self.folder.glob("*.lock"):
            if path == self.path:
                continue
            try:
                with path.open("r+") as file:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink(missing_ok=True)  # still locked by us: no one takes it meanwhile
            except (BlockingIOError, PermissionError):  # a live runner holds it
                continue
            except FileNotFoundError:  # another runner removed it first
                continue
            except OSError as exc:  # e.g. a file system without locks: leave it to the leases
                log.warning("cannot tell whether job runner %s is alive: %s", path.stem, exc)
                continue
            dead.append(path.stem)
        return dead
