"""`moorage models ...`: the registry from the command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import BadRequest
from ..refs import parse_ref, parse_version
from ..registry import Lineage, export_model, import_models
from .context import RichProgress, console, parse_pairs, state

app = typer.Typer(help="Register, alias, roll back, verify and move models.", no_args_is_help=True)


@app.command()
def register(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="model folder")],
    name: Annotated[str, typer.Option("--name", "-n", help="model name")],
    task: Annotated[str, typer.Option("--task", "-t", help="embed, classify or generate")],
    alias: Annotated[Optional[str], typer.Option(help="point this alias at the new version")] = None,
    description: Annotated[str, typer.Option(help="free text")] = "",
    param: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE, repeatable")] = None,
    metric: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE, repeatable")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE, repeatable")] = None,
    parent: Annotated[Optional[str], typer.Option(help="lineage: NAME:VERSION it derives from")] = None,
    dataset_sha256: Annotated[Optional[str], typer.Option(help="lineage: hash of the training data")] = None,
    code_version: Annotated[Optional[str], typer.Option(help="lineage: code version (git sha)")] = None,
    reason: Annotated[str, typer.Option(help="why, for the alias history")] = "",
    encrypt: Annotated[
        Optional[bool], typer.Option("--encrypt/--no-encrypt", help="encrypt at rest (default: settings)")
    ] = None,
) -> None:
    """Copy a model folder into the registry as its next version (refused, storing nothing, if a
    safetensors header or an ONNX file is malformed or a file is not a plain file)."""
    if parent is not None:
        parse_ref(parent)
    st = state(ctx)
    reg = st.registry
    with RichProgress() as progress:
        info = reg.register(
            path,
            name,
            task,
            alias=alias,
            description=description,
            params=parse_pairs(param, "--param"),
            metrics=parse_pairs(metric, "--metric"),
            tags={k: str(v) for k, v in parse_pairs(tag, "--tag").items()},
            lineage=Lineage(parent=parent, dataset_sha256=dataset_sha256, code_version=code_version),
            reason=reason,
            progress=progress,
            encrypt=encrypt,
        )
    st.audit("register", info.name, info.version, alias=alias, encrypted=bool(info.manifest.encryption))
    where = f" (alias {alias})" if alias else ""
    console.print(
        f"registered [bold]{info.ref}[/] {info.task}/{info.framework}, "
        f"{len(info.manifest.files)} files, {_size(info.manifest.size_bytes)}{where}"
    )


@app.command("list")
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every model with its versions and aliases."""
    models = state(ctx).registry.list_models()
    if as_json:
        print(json.dumps([m.__dict__ for m in models], indent=2))
        return
    table = Table("name", "task", "versions", "latest", "aliases")
    for m in models:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))
        table.add_row(m.name, m.task, str(m.num_versions), str(m.latest_version or "-"), aliases)
    console.print(table if models else "no models registered yet: moorage models register PATH --name N --task T")


@app.command()
def versions(ctx: typer.Context, name: str) -> None:
    """Every version of one model."""
    table = Table("version", "status", "framework", "size", "aliases", "created", "by")
    for v in state(ctx).registry.list_versions(name):
        table.add_row(
            str(v.version),
            v.status,
            v.framework,
            _size(v.manifest.size_bytes),
            ", ".join(v.aliases),
            f"{v.created_at:%Y-%m-%d %H:%M:%S}",
            v.created_by,
        )
    console.print(table)


@app.command()
def show(ctx: typer.Context, ref: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One version: manifest, aliases, tags, lineage, the framework and precision it is served with,
    and for a compressed version its method, parent and quality gates."""
    info = state(ctx).registry.resolve(ref)
    doc = {
        "ref": info.ref,
        "aliases": list(info.aliases),
        "tags": info.tags,
        "status": info.status,
        "created_at": info.created_at.isoformat(),
        "manifest_sha256": info.manifest_sha256,
        **info.manifest.model_dump(mode="json"),
    }
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    console.print_json(data=doc)
    for line in _made_from(info.manifest.lineage) + _served_as(info.framework, info.manifest.params):
        console.print(line, highlight=False)
    compression = info.manifest.params.get("compression")
    if isinstance(compression, dict):
        _print_compression(compression)


def _made_from(lineage: Lineage) -> list[str]:
    """Which model and which data made a version, in a few lines (the JSON above has all of it)."""
    lines = []
    if lineage.parent:
        digest = f" (manifest {lineage.parent_manifest_sha256[:12]})" if lineage.parent_manifest_sha256 else ""
        lines.append(f"parent:  {lineage.parent}{digest}")
    data = lineage.dataset
    if data:
        splits = ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(data.get("splits", {}).items()))
        lines.append(
            f"dataset: {data.get('name')}:{data.get('version')} (sha256 {str(data.get('digest'))[:12]}, "
            f"split seed {data.get('seed')}; splits {splits})"
        )
    elif lineage.dataset_sha256:
        lines.append(f"dataset: sha256 {lineage.dataset_sha256}")
    if lineage.code_version:
        lines.append(f"code:    {lineage.code_version}")
    return lines


def _served_as(framework: str, params: dict) -> list[str]:
    """The framework and numeric precision a version is served with."""
    precision = params.get("precision")
    if not precision:  # a torch version computes in runtime.dtype (/v1/models says what it resolved to)
        precision = "runtime.dtype (auto: bf16 where the hardware has it natively, else fp32)"
    return [f"framework: {framework}", f"precision: {precision}"]


def _print_compression(compression: dict) -> None:
    """How a derived version was made, and the quality gates that admitted it."""
    forced = " [bold red](forced past its gates)[/]" if compression.get("forced") else ""
    console.print(f"compression: {compression.get('method')} from {compression.get('parent')}{forced}")
    parameters = compression.get("parameters") or {}
    if parameters:
        console.print("  " + ", ".join(f"{k}={v}" for k, v in sorted(parameters.items())), highlight=False)
    gates = compression.get("gates") or {}
    if not gates:
        return
    table = Table("gate", "value", "threshold", "passed")
    for name, gate in sorted(gates.items()):
        passed = gate.get("passed")
        table.add_row(
            name,
            _number(gate.get("value")),
            _number(gate.get("threshold")),
            "[green]yes[/]" if passed else "[red]no[/]" if passed is not None else "-",
        )
    console.print(table)


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


@app.command()
def alias(
    ctx: typer.Context,
    name: str,
    alias: str,
    version: Annotated[Optional[str], typer.Argument(help="target version")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="remove the alias")] = False,
    reason: Annotated[str, typer.Option(help="why, for the history")] = "",
) -> None:
    """Point ALIAS of model NAME at VERSION (atomic; recorded in the history)."""
    reg = state(ctx).registry
    if remove:
        event = reg.remove_alias(name, alias, reason)
    elif version is None:
        raise BadRequest("give the target VERSION, or --remove", code="missing_version")
    else:
        event = reg.set_alias(name, alias, parse_version(version), reason)
    state(ctx).audit("remove_alias" if remove else "set_alias", name, event.to_version, alias=alias, reason=reason)
    console.print(f"{name}@{alias}: {event.from_version or '-'} → {event.to_version or '-'}")


@app.command()
def rollback(ctx: typer.Context, name: str, alias: str, reason: Annotated[str, typer.Option()] = "") -> None:
    """Move ALIAS back to the version it pointed at before."""
    event = state(ctx).registry.rollback(name, alias, reason)
    state(ctx).audit("rollback_alias", name, event.to_version, alias=alias, reason=reason)
    console.print(f"{name}@{alias}: {event.from_version} → {event.to_version} (rolled back)")


@app.command()
def promote(
    ctx: typer.Context,
    name: str,
    from_alias: Annotated[str, typer.Option("--from", help="alias of the challenger")] = "challenger",
    to_alias: Annotated[str, typer.Option("--to", help="alias to move")] = "production",
    force: Annotated[bool, typer.Option("--force", help="move it even if the gate refuses (audited)")] = False,
) -> None:
    """Move --to to the version --from points at if its test metric, on the same test split, is at
    least the current one's (training.promotion_metric, .promotion_min_delta); exit 1 if refused.
    The decision and both metrics go to the audit log."""
    from ..training.promotion import promote as gate

    st = state(ctx)
    user = f"cli:{st.settings.user}"
    decision = gate(st.settings, name, from_alias=from_alias, to_alias=to_alias, user=user, force=force)
    console.print(decision.reason, highlight=False)
    if not decision.accepted:
        raise typer.Exit(1)


@app.command()
def history(
    ctx: typer.Context,
    name: str,
    alias: Annotated[Optional[str], typer.Option(help="only this alias")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every alias move of a model: who, when, from, to, why."""
    entries = state(ctx).registry.history(name, alias)
    if as_json:
        print(json.dumps([{**e.__dict__, "at": e.at.isoformat()} for e in entries], indent=2))
        return
    table = Table("#", "when", "alias", "action", "from", "to", "who", "reason")
    for e in entries:
        table.add_row(
            str(e.id),
            f"{e.at:%Y-%m-%d %H:%M:%S}",
            e.alias,
            e.action,
            str(e.from_version or "-"),
            str(e.to_version or "-"),
            e.actor,
            e.reason,
        )
    console.print(table)


@app.command()
def tag(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME (model tags) or NAME:VERSION / NAME@ALIAS")],
    pairs: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE ...")] = None,
    remove: Annotated[Optional[list[str]], typer.Option("--remove", help="tag key to remove")] = None,
) -> None:
    """Set or remove tags on a model or a version."""
    tags = state(ctx).registry.tag(ref, {k: str(v) for k, v in parse_pairs(pairs, "tag").items()}, remove or [])
    console.print(f"{ref}: " + (", ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "no tags"))


@app.command()
def delete(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Delete one version (refused while an alias points at it)."""
    parsed = parse_ref(ref)
    if parsed.version is None:
        raise BadRequest(f"delete needs an explicit version: {parsed.name}:VERSION", code="missing_version")
    if not yes:
        if sys.stdin is None or not sys.stdin.isatty():  # a script or a pipe: nobody to ask
            raise BadRequest(
                f"refusing to delete {parsed} without --yes: there is no terminal to confirm on",
                code="confirmation_required",
            )
        typer.confirm(f"delete {parsed} and its files?", abort=True)
    state(ctx).registry.delete_version(parsed.name, parsed.version)
    state(ctx).audit("delete_version", parsed.name, parsed.version)
    console.print(f"deleted {parsed}")


@app.command()
def verify(ctx: typer.Context, ref: str) -> None:
    """Recompute every checksum and read every safetensors header and ONNX file's structure of a
    version; exit 1 if any file differs or is malformed."""
    reg = state(ctx).registry
    info = reg.resolve(ref)
    with RichProgress() as progress:
        problems = reg.verify(info.ref, progress)
    if problems:
        console.print(f"[red]{info.ref} FAILED verification:[/]")
        for p in problems:
            console.print(f"  {p}")
        raise typer.Exit(1)
    console.print(f"{info.ref}: {len(info.manifest.files)} files OK")


@app.command("export")
def export_(
    ctx: typer.Context, name: str, to: Annotated[str, typer.Option("--to", help="folder or fsspec URL")]
) -> None:
    """Export a model with all its versions, aliases and history."""
    st = state(ctx)
    with RichProgress() as progress:
        where = export_model(
            st.registry, name, to, storage_options=st.settings.registry.storage_options, progress=progress
        )
    console.print(f"exported {name} to {where}")


@app.command("import")
def import_(ctx: typer.Context, source: Annotated[str, typer.Argument(help="export folder or URL")]) -> None:
    """Import models exported by `moorage models export`."""
    st = state(ctx)
    with RichProgress() as progress:
        names = import_models(
            st.registry, source, storage_options=st.settings.registry.storage_options, progress=progress
        )
    for name in names:
        st.audit("import", name, source=source)
    console.print(f"imported {', '.join(names)}")


@app.command("new-master-key")
def new_master_key(path: Annotated[Path, typer.Argument(help="file to create (mode 0600)")]) -> None:
    """Write a new random master key (base64, 32 bytes) for encrypted artifacts."""
    from ..registry.crypto import MasterKey, generate_master_key

    if path.exists():
        raise BadRequest(f"{path} exists; refusing to overwrite a key", code="file_exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_master_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    console.print(f"wrote master key {MasterKey.from_text(key, str(path)).id} to {path} (keep a copy in your vault)")


@app.command()
def rekey(
    ctx: typer.Context,
    new_key_file: Annotated[Path, typer.Option("--new-key-file", help="the new master key (base64 file)")],
) -> None:
    """Re-wrap the data keys of encrypted versions under a new master key (the configured key is the
    old one). The encrypted files are not rewritten; afterwards configure the new key."""
    from ..registry.crypto import MasterKey

    st = state(ctx)
    new = MasterKey.from_file(new_key_file)
    old_id = st.registry.require_master_key("re-wrap data keys").id
    done, skipped = st.registry.rekey(new)
    st.audit("rekey", old_key=old_id, new_key=new.id, rewrapped=done, skipped=len(skipped))
    console.print(f"re-wrapped {done} data key(s) from master key {old_id} to {new.id}")
    for line in skipped:
        console.print(f"  skipped {line}")


def _size(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return str(num)
