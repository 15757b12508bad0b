"""What every command shares: settings built once from flags, and a lazily opened registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..config import Settings, load_settings
from ..registry import Registry

console = Console()
err_console = Console(stderr=True)


@dataclass
class AppState:
    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = None
    _registry: Registry | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file, overrides=self.overrides)
        return self._settings

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.from_settings(self.settings)
        return self._registry

    def audit(self, action: str, model: str = "", version: int | None = None, **detail: Any) -> None:
        """An audit row for an admin action taken on this machine (actor ``cli:USER``)."""
        if not self.settings.security.audit:
            return
        from ..security.audit import AuditEntry, AuditLog

        entry = AuditEntry(
            key_id=f"cli:{self.settings.user}", action=action, status=0, model=model, version=version, detail=detail
        )
        AuditLog(self.registry.catalog).append([entry])


def state(ctx: typer.Context) -> AppState:
    return ctx.find_root().obj


class RichProgress:
    """A rich progress bar behind the registry's `Progress` protocol: one task per `start`."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._started = False

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._bar.__exit__(*exc)

    def start(self, description: str, total: int) -> None:
        if not self._started:  # draw nothing until there is something to show
            self._bar.__enter__()
            self._started = True
        if self._task is not None:
            self._bar.update(self._task, completed=self._bar.tasks[-1].total)
        self._task = self._bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, amount)


def parse_pairs(pairs: list[str] | None, what: str) -> dict[str, Any]:
    """KEY=VALUE options; values that read as JSON numbers or booleans become those."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} {pair!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
