"""`moorage audit ...`: read, verify and export the hash-chained audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..security.audit import AuditLog
from .context import console, err_console, state

app = typer.Typer(help="The audit log of admin actions and inference calls.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    key: Annotated[Optional[str], typer.Option(help="only this key id")] = None,
    action: Annotated[Optional[str], typer.Option(help="only this action, e.g. chat_completions")] = None,
    model: Annotated[Optional[str], typer.Option(help="only this model")] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO time, e.g. 2026-11-22T10:00")] = None,
    limit: Annotated[int, typer.Option(min=1, help="newest N rows")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The newest rows first."""
    rows = AuditLog(state(ctx).registry.catalog).rows(
        key_id=key, action=action, model=model, since=since, limit=limit, newest_first=True
    )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("#", "time (UTC)", "key", "action", "model", "version", "status", "ms", "input sha256")
    for r in rows:
        table.add_row(
            str(r["seq"]),
            r["at"][:23].replace("T", " "),
            r["key_id"],
            r["action"],
            r["model"] or "-",
            str(r["version"] or "-"),
            str(r["status"] or "-"),
            f"{r['latency_ms']:.1f}",
            (r["input_sha256"] or "-")[:12],
        )
    console.print(table)


@app.command()
def verify(ctx: typer.Context) -> None:
    """Recompute the hash chain; name every edited, inserted or deleted row (exit 1 if any)."""
    count, problems = AuditLog(state(ctx).registry.catalog).verify()
    if problems:
        console.print(f"[red]audit log FAILED verification[/] ({count} rows checked):")
        for p in problems:
            console.print(f"  {p}", highlight=False)
        raise typer.Exit(1)
    console.print(f"audit log OK: {count} rows, chain intact")


@app.command("export")
def export_(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="file (default: stdout)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
) -> None:
    """Every row with its hashes, oldest first (JSON lines or CSV) for a SIEM or an auditor."""
    if fmt not in ("jsonl", "csv"):
        raise typer.BadParameter("use --format jsonl or csv")
    log = AuditLog(state(ctx).registry.catalog)
    if out is None:
        log.export(sys.stdout, fmt)
        return
    with open(out, "w", newline="") as f:
        n = log.export(f, fmt)
    err_console.print(f"exported {n} rows to {out}")
