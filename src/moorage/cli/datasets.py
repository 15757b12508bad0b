"""`moorage datasets ...`: register, list and inspect training datasets."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from ..errors import BadRequest
from ..refs import parse_version
from ..training.datasets import Datasets, DatasetVersion, Fields, SplitSpec
from .context import console, parse_pairs, state

app = typer.Typer(help="Register, list and inspect training datasets.", no_args_is_help=True)


def _datasets(ctx: typer.Context) -> Datasets:
    return Datasets.from_registry(state(ctx).registry)


@app.command()
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="dataset name")],
    path: Annotated[str, typer.Argument(help="JSONL, CSV or Parquet file: a path or any fsspec URL")],
    text: Annotated[str, typer.Option(help="column of the text")] = "text",
    label: Annotated[str, typer.Option(help="column of the label (classify data)")] = "label",
    messages: Annotated[Optional[str], typer.Option(help="column of chat conversations (chat data)")] = None,
    text_only: Annotated[bool, typer.Option("--text-only", help="unlabelled text (language modelling)")] = False,
    seed: Annotated[int, typer.Option(help="seed of the split")] = 0,
    validation: Annotated[float, typer.Option(help="share of the rows for validation")] = 0.1,
    test: Annotated[float, typer.Option(help="share of the rows for test")] = 0.2,
    folds: Annotated[Optional[int], typer.Option(help="k stratified folds instead of the shares")] = None,
    storage_option: Annotated[
        Optional[list[str]], typer.Option("--storage-option", help="fsspec option KEY=VALUE, repeatable")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="drop (and count) rows without text or label, or of the wrong type")
    ] = False,
    description: Annotated[str, typer.Option(help="free text")] = "",
) -> None:
    """Read, check, deduplicate and split a file into the next version of dataset NAME (nothing is
    stored if it is refused; the same rows split the same way are not stored twice)."""
    try:
        spec = SplitSpec(seed=seed, validation=validation, test=test, folds=folds)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        raise BadRequest(f"bad split: {where + ': ' if where else ''}{message}", code="invalid_split") from None
    fields = Fields(text=text, label=None if text_only else label, messages=messages)
    st = state(ctx)
    version, created = _datasets(ctx).ensure(
        name,
        path,
        fields=fields,
        split=spec,
        storage_options=parse_pairs(storage_option, "--storage-option"),
        description=description,
        skip_invalid=skip_invalid,
    )
    if not created:
        console.print(f"[bold]{version.ref}[/] already holds these rows split this way (sha256 {version.digest[:12]})")
        return
    st.audit("add_dataset", version.name, version.version, digest=version.digest, source=version.source)
    console.print(f"registered [bold]{version.ref}[/] {version.kind}: {_counts(version)}", highlight=False)
    console.print(f"splits: {_splits(version)}; sha256 {version.digest[:12]}", highlight=False)


@app.command("list")
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The latest version of every dataset."""
    found = _datasets(ctx).list()
    if as_json:
        print(json.dumps([_doc(v) for v in found], indent=2))
        return
    table = Table("name", "version", "kind", "rows", "labels", "splits", "created")
    for v in found:
        table.add_row(
            v.name,
            str(v.version),
            v.kind,
            str(v.stats.get("rows", 0)),
            str(len(v.label_map) or "-"),
            f"{v.split.folds} folds" if v.split.folds else _splits(v),
            v.created_at[:19],
        )
    console.print(table if found else "no datasets registered yet: moorage datasets add NAME PATH")


@app.command()
def versions(ctx: typer.Context, name: str) -> None:
    """Every version of one dataset, oldest first."""
    table = Table("version", "kind", "rows", "sha256", "splits", "source", "created", "by")
    for v in _datasets(ctx).versions(name):
        splits = f"{v.split.folds} folds" if v.split.folds else _splits(v)
        table.add_row(
            str(v.version),
            v.kind,
            str(v.stats.get("rows", 0)),
            v.digest[:12],
            splits,
            v.source,
            v.created_at[:19],
            v.created_by,
        )
    console.print(table)


@app.command()
def show(ctx: typer.Context, ref: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One version (NAME: the latest, or NAME:VERSION): counts, label map, splits and their digests."""
    v = _datasets(ctx).get(ref)
    if as_json:
        print(json.dumps(_doc(v), indent=2))
        return
    console.print(
        f"[bold]{v.ref}[/] {v.kind}, from {v.source} ({v.created_at[:19]} by {v.created_by})", highlight=False
    )
    console.print(f"sha256 {v.digest}", highlight=False)
    console.print(_counts(v), highlight=False)
    if v.label_map:
        console.print("labels: " + ", ".join(f"{label}={i}" for label, i in v.label_map.items()), highlight=False)
    seed = f"split seed {v.split.seed}" + (f", {v.split.folds} folds" if v.split.folds else "")
    table = Table("split", "rows", "sha256", title=seed)
    for info in v.splits.values():
        table.add_row(info.name, str(info.rows), info.digest)
    console.print(table)


@app.command()
def uses(ctx: typer.Context, ref: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The model versions made from a dataset (NAME: any of its versions, NAME:VERSION: that one)."""
    name, _, version = ref.partition(":")
    found = _datasets(ctx).uses(name, parse_version(version) if version else None)
    if as_json:
        print(json.dumps([{"model": m, "version": v, "role": r} for m, v, r in found], indent=2))
        return
    table = Table("model", "role")
    for model, model_version, role in found:
        table.add_row(f"{model}:{model_version}", role)
    console.print(table if found else f"no model was made from {ref} yet")


def _counts(v: DatasetVersion) -> str:
    s = v.stats
    removed = (
        f"{s.get('exact_duplicates', 0)} exact + {s.get('normalized_duplicates', 0)} normalised duplicates removed"
    )
    conflicts = f", {s['label_conflicts']} copies with conflicting labels dropped" if s.get("label_conflicts") else ""
    return (
        f"{s.get('rows', 0)} rows of {s.get('rows_read', 0)} read ({removed}{conflicts}, {s.get('refused', 0)} refused)"
    )


def _splits(v: DatasetVersion) -> str:
    return ", ".join(f"{info.name} {info.rows}" for info in v.splits.values())


def _doc(v: DatasetVersion) -> dict:
    return {**asdict(v), "ref": v.ref, "split": v.split.model_dump()}
