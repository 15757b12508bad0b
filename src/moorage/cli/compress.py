"""`moorage compress REF --method M`: a smaller or faster version of a registered model, measured
against it and registered only when the quality gates (``compression.*``) pass.

Exit status: 0 registered (``--force`` included), 1 refused by a gate (nothing registered; the report
is kept under ``HOME/compression-reports/``), 2 bad input (one line). ``--queue`` leaves the work to a
``moorage jobs worker`` (a ``compress`` job) instead of doing it here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import MoorageError
from .context import console, err_console, state

MethodOption = Annotated[str, typer.Option("--method", "-m", help="onnx | onnx-int8 | prune-heads | distill | lm-int8")]
ParamOption = Annotated[
    Optional[list[str]],
    typer.Option("--param", "-p", help="a method parameter, KEY=VALUE (repeat), e.g. --param per_channel=false"),
]


def compress(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="the parent: NAME, NAME@ALIAS or NAME:VERSION")],
    method: MethodOption,
    param: ParamOption = None,
    dataset: Annotated[
        Optional[str], typer.Option(help="held-out data: this dataset's test split (default: the model's own)")
    ] = None,
    texts: Annotated[
        Optional[Path], typer.Option(help="held-out texts for an embed model: a file, one a line (or JSONL)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="register it even if a gate refuses it (audited)")] = False,
    alias: Annotated[Optional[str], typer.Option(help="alias to give the new version (default: none)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole report as JSON")] = False,
    queue: Annotated[bool, typer.Option("--queue", help="queue it for a worker instead of running it here")] = False,
) -> None:
    """Compress a registered model (ONNX export, int8, head pruning, distillation) into a new version
    of the same name, with its evaluation report against the parent."""
    from ..training.compress.pipeline import compress as run
    from ..training.compress.pipeline import read_texts

    st = state(ctx)
    params = parse_params(param)
    if queue:
        if texts is not None:
            raise MoorageError("--texts is read here: a queued job takes --dataset instead", code="invalid_option")
        _queue(st, ref, method, params, dataset, force, alias)
        return
    held_out = read_texts(texts) if texts is not None else None
    with _Phases() as phases:
        outcome = run(
            st.settings,
            ref,
            method,
            params,
            force=force,
            alias=alias,
            dataset=dataset,
            texts=held_out,
            user=f"cli:{st.settings.user}",
            progress=phases.update,
        )
    if as_json:
        body: dict[str, Any] = {"registered": outcome.registered.ref if outcome.registered else None}
        body["reason"] = outcome.reason
        body |= {"gates": [g.as_dict() for g in outcome.gates], "report": outcome.report}
        console.print_json(json.dumps(body, default=str))
    else:
        console.print(report_table(outcome.report))
        console.print(gates_table(outcome.gates))
    for note in outcome.notes:
        err_console.print(f"note: {note}", highlight=False)
    if outcome.registered is None:
        err_console.print(f"[red]refused:[/] {outcome.reason}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(outcome.reason, highlight=False, soft_wrap=True)


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value is JSON when it parses (numbers, true/false, lists), else text."""
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MoorageError(
                f"--param {item!r}: give KEY=VALUE, e.g. --param per_channel=false", code="invalid_param"
            )
        try:
            params[key.strip().replace("-", "_")] = json.loads(value.strip())
        except ValueError:
            params[key.strip().replace("-", "_")] = value.strip()
    return params


def report_table(report: dict[str, Any]) -> Table:
    """Parent against derived: quality, speed, size, load time and memory."""
    table = Table(title=f"{report.get('method')} of {report.get('parent')} ({report.get('task')})")
    for column in ("measure", "parent", "derived", "change"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    quality = report["quality"]
    task = report["task"]
    if task == "embed":
        for key in ("mean_cosine", "min_cosine", "nn_agreement"):
            table.add_row(key.replace("_", " "), "", f"{quality[key]:.4f}", "")
    elif task == "classify":
        for key in ("accuracy", "macro_f1"):
            before, after = quality[f"parent_{key}"], quality[f"derived_{key}"]
            table.add_row(key.replace("_", "-"), f"{before:.4f}", f"{after:.4f}", f"{100 * (after - before):+.2f} pts")
        for label, row in quality["per_class"].items():
            change = f"{100 * row['f1_delta']:+.2f} pts"
            table.add_row(
                f"  F1 {label} ({row['support']})", f"{row['parent_f1']:.4f}", f"{row['derived_f1']:.4f}", change
            )
    elif task == "generate":
        before, after = quality["parent_perplexity"], quality["derived_perplexity"]
        table.add_row("perplexity", f"{before:.3f}", f"{after:.3f}", f"x{quality['perplexity_ratio']:.3f}")
        table.add_row("greedy-token agreement", "", f"{quality['greedy_token_agreement']:.4f}", "")
    speed = report["speed"]
    unit = "tokens/s" if "tokens_per_s" in speed else "texts/s"
    rates = speed.get("tokens_per_s") or speed["texts_per_s"]
    for batch, ratio in speed["speedup"].items():
        before, after = rates["parent"][batch], rates["derived"][batch]
        table.add_row(f"{unit}, {batch.replace('_', ' ')}", f"{before:.1f}", f"{after:.1f}", f"x{ratio:.2f}")
    parent, derived = report["footprint"]["parent"], report["footprint"]["derived"]
    table.add_row("weights", _mb(parent["weights_bytes"]), _mb(derived["weights_bytes"]), f"{report['size_ratio']:.1%}")
    table.add_row("load", f"{parent['load_s']:.2f} s", f"{derived['load_s']:.2f} s", "")
    table.add_row("resident memory added", _mb(parent["rss_delta_bytes"]), _mb(derived["rss_delta_bytes"]), "")
    table.add_row("framework", str(parent["framework"]), str(derived["framework"]), "")
    table.add_row("precision", str(parent["precision"]), str(report.get("precision")), "")
    return table


def gates_table(gates: list[Any]) -> Table:
    table = Table(title="gates (compression.*)")
    for column in ("gate", "value", "needs", "passed"):
        table.add_column(column, justify="left" if column == "gate" else "right")
    for g in gates:
        table.add_row(g.name, f"{g.value:.4f}", f"{g.rule} {g.threshold:g}", "yes" if g.passed else "[red]no[/]")
    return table


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _queue(st, ref: str, method: str, params: dict[str, Any], dataset: str | None, force: bool, alias: str | None):
    from ..training.jobs import check_refs, validate_spec
    from .jobs import work_queue

    spec = {"model": ref, "method": method, "params": params, "dataset": dataset, "force": force, "alias": alias}
    request = validate_spec("compress", spec)
    check_refs(st.registry, "compress", request)
    job = work_queue(st).submit("compress", request, owner=f"cli:{st.settings.user}")
    console.print(f"queued {job.id}; follow it with: moorage jobs logs -f {job.id}")


class _Phases:
    """A spinner that names the phase the compression is in (building, measuring, registering)."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        self.task = self.progress.add_task("starting", total=None, detail="")

    def __enter__(self) -> _Phases:
        if err_console.is_terminal:  # a spinner is for a person watching; a pipe or a log gets the result only
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def update(self, what: str, done: int, total: int) -> None:
        detail = f"{done}/{total}" if total > 1 else ""
        self.progress.update(self.task, description=what, detail=detail)
