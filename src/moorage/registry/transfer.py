"""Move a model with all its versions, aliases and history between registries.

An export is a folder (local or any fsspec URL): ``<dest>/<name>/export.json`` plus one folder per
version holding its files and its ``moorage.json``. Import copies the files into the target store,
re-hashing every byte against the manifest, then writes the catalog rows in one transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any

import fsspec
from sqlalchemy import select

from ..db import as_utc
from ..errors import BadRequest, Conflict, IntegrityError, InvalidArtifact
from ..refs import validate_name
from .artifacts import check_onnx, check_safetensors, check_stored_name, is_onnx, is_safetensors
from .manifest import MANIFEST_NAME, Manifest, check_safe, sha256_bytes
from .service import Registry
from .store import NoProgress, Progress
from .tables import Alias, AliasEvent, ArtifactKey, Model, ModelVersion

EXPORT_NAME = "export.json"
EXPORT_FORMAT = 1


def export_model(
    registry: Registry,
    name: str,
    dest: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> str:
    """Write model `name` under `dest`; return the folder written."""
    validate_name(name)
    progress = progress or NoProgress()
    fs, root = fsspec.core.url_to_fs(dest, **(storage_options or {}))
    base = f"{root.rstrip('/')}/{name}"
    if fs.exists(f"{base}/{EXPORT_NAME}"):
        raise Conflict(f"{dest} already holds an export of {name!r}; choose an empty destination")
    with registry.catalog.session() as s:
        model = registry._model_or_404(s, name)
        versions = list(
            s.scalars(
                select(ModelVersion)
                .where(ModelVersion.model_name == name, ModelVersion.status == "ready")
                .order_by(ModelVersion.version)
            )
        )
        aliases = list(s.scalars(select(Alias).where(Alias.model_name == name)))
        # encrypted versions travel as ciphertext with their wrapped data key: the importer needs the same master key
        keys = {k.version: k for k in s.scalars(select(ArtifactKey).where(ArtifactKey.model_name == name))}
        events = list(s.scalars(select(AliasEvent).where(AliasEvent.model_name == name).order_by(AliasEvent.id)))
    doc = {
        "format": EXPORT_FORMAT,
        "model": {
            "name": model.name,
            "task": model.task,
            "description": model.description,
            "tags": model.tags,
            "created_at": _iso(model.created_at),
            "created_by": model.created_by,
        },
        "versions": [
            {
                "version": v.version,
                "framework": v.framework,
                "manifest": v.manifest,
                "manifest_sha256": v.manifest_sha256,
                "description": v.description,
                "tags": v.tags,
                "created_at": _iso(v.created_at),
                "created_by": v.created_by,
                **(
                    {
                        "data_key": {
                            "master_key_id": keys[v.version].master_key_id,
                            "wrapped": keys[v.version].wrapped_key,
                        }
                    }
                    if v.version in keys
                    else {}
                ),
            }
            for v in versions
        ],
        "aliases": [
            {"alias": a.alias, "version": a.version, "updated_at": _iso(a.updated_at), "updated_by": a.updated_by}
            for a in aliases
        ],
        "history": [
            {
                "alias": e.alias,
                "action": e.action,
                "from_version": e.from_version,
                "to_version": e.to_version,
                "actor": e.actor,
                "reason": e.reason,
                "at": _iso(e.at),
            }
            for e in events
        ],
    }
    progress.start(f"export {name}", sum(v.size_bytes for v in versions))
    for v in versions:
        manifest = Manifest.model_validate(v.manifest)
        for entry in manifest.files:
            _copy(registry.store.open(name, v.version, entry.path), fs, f"{base}/{v.version}/{entry.path}", progress)
        with fs.open(f"{base}/{v.version}/{MANIFEST_NAME}", "wb") as f:
            f.write(registry.store.read_manifest_bytes(name, v.version))
    with fs.open(f"{base}/{EXPORT_NAME}", "wb") as f:  # written last: its presence means complete
        f.write(json.dumps(doc, indent=2).encode())
    return f"{dest.rstrip('/')}/{name}"


def import_models(
    registry: Registry,
    source: str,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Import every model exported under `source` (one model's folder, or a folder of them)."""
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.exists(f"{root}/{EXPORT_NAME}"):
        folders = [root]
    else:
        folders = sorted(p.rsplit("/", 1)[0] for p in fs.glob(f"{root}/*/{EXPORT_NAME}"))
    if not folders:
        raise BadRequest(f"{source} holds no moorage export ({EXPORT_NAME} not found)", code="export_not_found")
    return [_import_one(registry, fs, folder, progress or NoProgress()) for folder in folders]


def _read_export(fs, folder: str) -> tuple[dict[str, Any], list[Manifest]]:
    """The export document and its versions' manifests, checked before anything is written: names,
    file paths (relative, no ``..``), no pickle files, each manifest agreeing with its version."""
    where = f"{folder}/{EXPORT_NAME}"
    try:
        with fs.open(where, "rb") as f:
            doc = json.loads(f.read())
        if doc.get("format") != EXPORT_FORMAT:
            raise BadRequest(f"{where} has export format {doc.get('format')!r}; expected {EXPORT_FORMAT}")
        name = validate_name(doc["model"]["name"])
        manifests = [Manifest.model_validate(v["manifest"]) for v in doc["versions"]]
        for v, manifest in zip(doc["versions"], manifests):
            if (manifest.name, manifest.version) != (name, v["version"]):
                raise InvalidArtifact(
                    f"refusing {where}: version {v['version']!r} carries the manifest of "
                    f"{manifest.name}:{manifest.version}"
                )
            paths = [e.path for e in manifest.files]
            for path in paths:
                check_stored_name(path, f"{name}:{manifest.version}")
            if len(set(paths)) != len(paths) or MANIFEST_NAME in paths:
                raise InvalidArtifact(
                    f"refusing {where}: {name}:{manifest.version} lists a file twice, or lists {MANIFEST_NAME}"
                )
            check_safe(paths)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise BadRequest(
            f"{where} is not a moorage export ({type(exc).__name__}: {exc})".splitlines()[0], code="invalid_export"
        ) from None
    return doc, manifests


def _import_one(registry: Registry, fs, folder: str, progress: Progress) -> str:
    doc, manifests = _read_export(fs, folder)
    m = doc["model"]
    name = m["name"]
    with registry.catalog.session() as s:
        if s.get(Model, name) is not None:
            raise Conflict(f"model {name!r} already exists in the target registry; delete it or import elsewhere")
        s.add(
            Model(
                name=name,
                task=m["task"],
                description=m["description"],
                tags=m["tags"],
                created_at=_dt(m["created_at"]),
                created_by=m["created_by"],
            )
        )
        for v in doc["versions"]:
            s.add(
                ModelVersion(
                    model_name=name,
                    version=v["version"],
                    status="pending",
                    task=m["task"],
                    framework=v["framework"],
                    path=f"{name}/{v['version']}",
                    manifest=v["manifest"],
                    manifest_sha256=v["manifest_sha256"],
                    size_bytes=0,
                    description=v["description"],
                    tags=v["tags"],
                    created_at=_dt(v["created_at"]),
                    created_by=v["created_by"],
                )
            )
    try:
        progress.start(f"import {name}", sum(mf.size_bytes for mf in manifests))
        for v, manifest in zip(doc["versions"], manifests):
            _copy_version(registry, fs, folder, manifest, v["manifest_sha256"], progress)
    except BaseException:
        for v in doc["versions"]:
            registry.store.remove(name, v["version"])
        with registry.catalog.session() as s:
            s.delete(s.get(Model, name))
        raise
    with registry.catalog.session() as s:
        for v, manifest in zip(doc["versions"], manifests):
            row = s.get_one(ModelVersion, (name, v["version"]))
            row.status, row.size_bytes = "ready", manifest.size_bytes
            if "data_key" in v:
                key = v["data_key"]
                s.add(
                    ArtifactKey(
                        model_name=name,
                        version=v["version"],
                        master_key_id=key["master_key_id"],
                        wrapped_key=key["wrapped"],
                    )
                )
        s.flush()
        for a in doc["aliases"]:
            s.add(
                Alias(
                    model_name=name,
                    alias=a["alias"],
                    version=a["version"],
                    updated_at=_dt(a["updated_at"]),
                    updated_by=a["updated_by"],
                )
            )
        for e in doc["history"]:
            s.add(
                AliasEvent(
                    model_name=name,
                    alias=e["alias"],
                    action=e["action"],
                    from_version=e["from_version"],
                    to_version=e["to_version"],
                    actor=e["actor"],
                    reason=e["reason"],
                    at=_dt(e["at"]),
                )
            )
    return name


def _copy_version(
    registry: Registry, fs, folder: str, manifest: Manifest, manifest_sha: str, progress: Progress
) -> None:
    src = f"{folder}/{manifest.version}"
    entries = registry.store.write_version(
        ((e.path, partial(fs.open, f"{src}/{e.path}", "rb"), e.size) for e in manifest.files),
        manifest.name,
        manifest.version,
        progress,
    )
    for written, expected in zip(entries, manifest.files):
        if written.sha256 != expected.sha256 or written.size != expected.size:
            raise IntegrityError(
                f"export of {manifest.name}:{manifest.version} is corrupt: file {expected.path} "
                "does not match its checksum"
            )
        if is_safetensors(expected.path) and not manifest.encryption:  # ciphertext is checked at load
            with registry.store.open(manifest.name, manifest.version, expected.path) as f:
                check_safetensors(f, expected.size, f"{manifest.name}:{manifest.version} {expected.path}")
        elif is_onnx(expected.path) and not manifest.encryption:
            with registry.store.open(manifest.name, manifest.version, expected.path) as f:
                check_onnx(f, expected.size, f"{manifest.name}:{manifest.version} {expected.path}")
    with fs.open(f"{src}/{MANIFEST_NAME}", "rb") as f:
        data = f.read()
    if sha256_bytes(data) != manifest_sha:
        raise IntegrityError(f"export of {manifest.name}:{manifest.version}: {MANIFEST_NAME} was altered")
    with registry.store.fs.open(
        f"{registry.store.version_path(manifest.name, manifest.version)}/{MANIFEST_NAME}", "wb"
    ) as f:
        f.write(data)


def _copy(src_file, fs, target: str, progress: Progress) -> None:
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with src_file as src, fs.open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            progress.advance(len(chunk))


def _iso(value: datetime) -> str:
    return as_utc(value).isoformat()


def _dt(text: str) -> datetime:
    return as_utc(datetime.fromisoformat(text))
