"""`moorage report SOURCE`: one HTML file (or JSON) about the results a stream worker wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import parse_qsl

import typer

from ..errors import BadRequest
from ..observability import report as rpt
from .context import console, err_console


def _source(location: str, table: str | None) -> rpt.Source:
    """A folder or file, a SQLAlchemy URL with `table`, or a SQL sink's own URL (sql+URL?table=NAME)."""
    if location.startswith("sql+"):
        url, _, query = location[4:].partition("?")
        options = dict(parse_qsl(query))
        table = table or options.pop("table", "moorage_results")
        if options:
            url += "?" + "&".join(f"{k}={v}" for k, v in options.items())
        return rpt.Source(url, table)
    return rpt.Source(location, table)


def report(
    source: Annotated[
        str, typer.Argument(help="a file sink's folder (Parquet/JSONL), or a SQLAlchemy URL with --table")
    ],
    table: Annotated[
        Optional[str], typer.Option(help="a URL source's table: a SQL sink's, or the catalog's jobs")
    ] = None,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="where to write (default: moorage-report.html; JSON goes to stdout)"),
    ] = None,  # fmt: skip
    fmt: Annotated[str, typer.Option("--format", help="html (a file to open or mail) or json")] = "html",
    reference: Annotated[
        str,
        typer.Option(
            help="the reference window: first:N% of rows by completion time, "
            "START..END (epoch seconds or ISO 8601), or a path/URL of another source"
        ),
    ] = "first:50%",  # fmt: skip
    reference_table: Annotated[Optional[str], typer.Option(help="the table of a SQL reference source")] = None,
    window: Annotated[
        Optional[str],
        typer.Option(help="the current window: last:N% or START..END (default: the rows after the reference)"),
    ] = None,  # fmt: skip
    dead_letters: Annotated[
        Optional[str],
        typer.Option(
            help="JSONL/Parquet export of the dead letters (moorage stream dead-letters --source URL --json > FILE)"
        ),
    ] = None,  # fmt: skip
    psi_threshold: Annotated[float, typer.Option(help="flag a feature whose PSI is above this")] = rpt.PSI_THRESHOLD,
    ks_p: Annotated[float, typer.Option(help="flag a numeric feature whose KS p-value is below this ...")] = (
        rpt.KS_P_THRESHOLD
    ),
    ks_min_d: Annotated[float, typer.Option(help="... and whose KS distance D is at least this")] = rpt.KS_MIN_D,
) -> None:
    """Throughput, latency, tokens, labels or scores, finish and dead-letter reasons, the slowest rows,
    and drift of a window against a reference (PSI and KS), as one self-contained HTML file or JSON."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if fmt not in ("html", "json"):
        raise BadRequest(f"--format {fmt!r}: use html or json", code="invalid_format")
    other = None
    if reference.split(":", 1)[0] not in ("first",) and ".." not in reference:
        other = _source(reference, reference_table)
    options = rpt.ReportOptions(
        reference=reference,
        current=window,
        reference_source=other,
        dead_letters=dead_letters,
        psi_threshold=psi_threshold,
        ks_p_threshold=ks_p,
        ks_min_d=ks_min_d,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    bar = Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)
    with bar:
        task = bar.add_task("report: starting", total=None)
        built = rpt.build(_source(source, table), options, lambda text: bar.update(task, description=f"report: {text}"))
        text = built.json() if fmt == "json" else built.html()
    if fmt == "json" and output is None:
        print(text)
        return
    path = output or Path("moorage-report.html")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BadRequest(f"cannot write {path}: {exc.strerror}", code="report_unwritable") from None
    flagged = built.data["drift"]["flagged"]
    drift = f"; drift in {', '.join(flagged)}" if flagged else "; no drift"
    console.print(f"wrote {path} ({len(text.encode()):,} bytes, {built.data['summary']['rows']:,} rows{drift})",
                  highlight=False)  # fmt: skip
