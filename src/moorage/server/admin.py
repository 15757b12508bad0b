"""Admin API: the registry (operator: upload, alias, rollback), API keys, settings and the audit
log (admin). Every call is authorised by role here and audited by the security edge."""

from __future__ import annotations

import asyncio
import shutil
import stat
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..errors import BadRequest, InvalidArtifact, PayloadTooLarge
from ..refs import validate_alias, validate_name
from ..registry import Registry
from ..registry.artifacts import name_problem
from ..security.keys import Principal, parse_expiry
from .common import FastJSON
from .security import guard_of, require

router = APIRouter()
MAX_MEMBERS = 10_000


class AliasMove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1)
    reason: str = Field("", max_length=1000)


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=1000)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["invoker", "operator", "admin"]
    name: str = Field("", max_length=128)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=100)
    expires: str | None = Field(None, max_length=64, description="e.g. 30d, 12h or an ISO date")
    requests_per_minute: int | None = Field(None, ge=1, le=10**9)
    tokens_per_minute: int | None = Field(None, ge=1, le=10**12)


def _registry(request: Request, caller: Principal) -> Registry:
    return request.app.state.registry.acting_as(f"key:{caller.key_id}")


def _model_right(caller: Principal, name: str) -> str:
    validate_name(name)
    caller.require_model(name)
    return name


def _version(v) -> dict:
    return {
        "name": v.name,
        "version": v.version,
        "task": v.task,
        "framework": v.framework,
        "aliases": list(v.aliases),
        "size_bytes": v.manifest.size_bytes,
        "encrypted": bool(v.manifest.encryption),
        "created_at": v.created_at.isoformat(),
        "created_by": v.created_by,
        "tags": v.tags,
    }


# ---- registry (operator) -----------------------------------------------------------------------
operator = APIRouter(prefix="/v1/registry", tags=["registry"])


@operator.get("/models")
async def registry_models(request: Request, caller: Principal = Depends(require("manage_models"))) -> Response:
    """Registered models this key may manage, with their aliases."""
    models = await asyncio.to_thread(request.app.state.registry.list_models)
    data = [
        {"name": m.name, "task": m.task, "versions": m.num_versions, "latest": m.latest_version, "aliases": m.aliases}
        for m in models
        if caller.may_use(m.name)
    ]
    return FastJSON({"data": data})


@operator.get("/models/{name}")
async def registry_model(
    name: str, request: Request, caller: Principal = Depends(require("manage_models"))
) -> Response:
    """Every version of one model."""
    _model_right(caller, name)
    versions = await asyncio.to_thread(request.app.state.registry.list_versions, name)
    return FastJSON({"name": name, "versions": [_version(v) for v in versions]})


@operator.post("/models/{name}/versions", status_code=201)
async def upload_version(
    name: str,
    request: Request,
    task: Literal["embed", "classify", "generate"] = Query(...),
    alias: str | None = Query(None, max_length=32),
    description: str = Query("", max_length=1000),
    encrypt: bool | None = Query(None, description="default: security.encrypt_artifacts"),
    caller: Principal = Depends(require("manage_models")),
) -> Response:
    """Register a new version from a tar archive (optionally gzip) of the model folder, sent as the
    request body. Bounded by ``security.max_upload_bytes``; links, devices, fifos, sparse and
    setuid/setgid members and absolute or ``..`` names are refused (400 ``unsafe_archive``), and so
    is a malformed safetensors file (400 ``invalid_artifact``)."""
    _model_right(caller, name)
    if alias is not None:
        validate_alias(alias)
    limit = guard_of(request).settings.max_upload_bytes
    work = Path(tempfile.mkdtemp(prefix="moorage-upload-"))
    try:
        archive = work / "upload.tar"
        await _receive_to(request, archive, limit)
        folder = await asyncio.to_thread(_extract, archive, work / "model", limit)
        registry = _registry(request, caller)
        info = await asyncio.to_thread(
            registry.register,
            folder,
            name,
            task,
            alias=alias,
            description=description,
            reason="uploaded over HTTP",
            encrypt=encrypt,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    request.state.audit_version = info.version
    return FastJSON(_version(info), status_code=201)


async def _receive_to(request: Request, path: Path, limit: int) -> None:
    size = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the upload is larger than {limit} bytes", code="upload_too_large")
            f.write(chunk)
    if size == 0:
        raise BadRequest("the request body is empty: send the model folder as a tar archive", code="empty_upload")


def _extract(archive: Path, target: Path, limit: int) -> Path:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise BadRequest(f"the archive holds more than {MAX_MEMBERS} entries", code="unsafe_archive")
            for member in members:
                _check_member(member)
            if sum(m.size for m in members) > limit:
                raise PayloadTooLarge(f"the archive unpacks to more than {limit} bytes", code="upload_too_large")
            try:
                tar.extractall(target, filter="data")  # refuses absolute paths, '..' and links out of the folder
            except tarfile.FilterError as exc:
                raise BadRequest(f"unsafe archive entry: {exc}", code="unsafe_archive") from None
    except tarfile.TarError as exc:
        raise BadRequest(f"the body is not a tar archive: {exc}", code="invalid_archive") from None
    entries = [p for p in target.iterdir()] if target.is_dir() else []
    if len(entries) == 1 and entries[0].is_dir():  # an archive of the folder itself
        return entries[0]
    if not entries:
        raise BadRequest("the archive is empty", code="invalid_archive")
    return target


def _check_member(member: tarfile.TarInfo) -> None:
    """Refuse, rather than quietly rewrite, what tarfile's data filter would strip or clear: an absolute
    or ``..`` name, setuid/setgid bits; and links, devices, fifos and sparse members outright."""
    problem = name_problem(member.name)
    if problem is None and not (member.isfile() or member.isdir()):
        problem = "is a link, a device or a fifo"
    elif problem is None and member.issparse():
        problem = "is a sparse file"
    elif problem is None and member.isfile() and member.mode & (stat.S_ISUID | stat.S_ISGID):
        problem = "is setuid or setgid"  # (a setgid folder is common on shared machines, and harmless here)
    if problem is not None:
        raise InvalidArtifact(
            f"the archive entry {member.name!r} {problem}; send a tar of plain files and folders with relative names",
            code="unsafe_archive",
        )


@operator.put("/models/{name}/aliases/{alias}")
async def set_alias(
    name: str, alias: str, body: AliasMove, request: Request, caller: Principal = Depends(require("manage_models"))
) -> Response:
    """Point an alias at a version (servers following the alias swap to it without failing a request)."""
    _model_right(caller, name)
    entry = await asyncio.to_thread(_registry(request, caller).set_alias, name, alias, body.version, body.reason)
    request.state.audit_version = entry.to_version
    return FastJSON(_history(entry))


@operator.delete("/models/{name}/aliases/{alias}")
async def remove_alias(
    name: str,
    alias: str,
    request: Request,
    reason: str = Query("", max_length=1000),
    caller: Principal = Depends(require("manage_models")),
) -> Response:
    _model_right(caller, name)
    entry = await asyncio.to_thread(_registry(request, caller).remove_alias, name, alias, reason)
    return FastJSON(_history(entry))


@operator.post("/models/{name}/aliases/{alias}/rollback")
async def rollback_alias(
    name: str, alias: str, body: Reason, request: Request, caller: Principal = Depends(require("manage_models"))
) -> Response:
    """Move an alias back to its previous target."""
    _model_right(caller, name)
    entry = await asyncio.to_thread(_registry(request, caller).rollback, name, alias, body.reason)
    request.state.audit_version = entry.to_version
    return FastJSON(_history(entry))


def _history(e) -> dict:
    return {**asdict(e), "at": e.at.isoformat()}  # the same fields as `moorage models history --json`


# ---- keys, settings, audit (admin) -------------------------------------------------------------
admin = APIRouter(prefix="/admin", tags=["admin"])


@admin.get("/keys")
async def list_keys(
    request: Request,
    include_revoked: bool = False,
    caller: Principal = Depends(require("manage_keys")),
) -> Response:
    keys = await asyncio.to_thread(guard_of(request).keys.list, include_revoked)
    return FastJSON({"data": [k.as_dict() for k in keys]})


@admin.post("/keys", status_code=201)
async def create_key(
    body: KeyCreate, request: Request, caller: Principal = Depends(require("manage_keys"))
) -> Response:
    """A new key. The response is the only place the key appears: it is stored hashed."""
    expires = parse_expiry(body.expires) if body.expires else None
    info, key = await asyncio.to_thread(
        guard_of(request).keys.create,
        body.role,
        name=body.name,
        models=body.models,
        expires_at=expires,
        requests_per_minute=body.requests_per_minute,
        tokens_per_minute=body.tokens_per_minute,
        created_by=f"key:{caller.key_id}",
    )
    request.state.audit_detail = {"created_key": info.id, "role": info.role}
    return FastJSON({**info.as_dict(), "key": key}, status_code=201)


@admin.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request, caller: Principal = Depends(require("manage_keys"))) -> Response:
    info = await asyncio.to_thread(guard_of(request).keys.revoke, key_id[:32])
    request.state.audit_detail = {"revoked_key": info.id}
    return FastJSON(info.as_dict())


@admin.get("/settings")
async def effective_settings(request: Request, caller: Principal = Depends(require("read_settings"))) -> Response:
    """The server's effective settings, every credential masked (`Settings.redacted`)."""
    return FastJSON(request.app.state.settings.redacted())


@admin.get("/audit")
async def audit_rows(
    request: Request,
    key_id: str | None = Query(None, max_length=160),
    action: str | None = Query(None, max_length=64),
    model: str | None = Query(None, max_length=128),
    limit: int = Query(100, ge=1, le=10_000),
    caller: Principal = Depends(require("read_audit")),
) -> Response:
    """The newest audit rows first."""
    guard = guard_of(request)
    if guard.writer:
        await guard.writer.flush()
    rows = await asyncio.to_thread(
        guard.audit.rows, key_id=key_id, action=action, model=model, limit=limit, newest_first=True
    )
    return FastJSON({"data": rows})


@admin.get("/audit/verify")
async def audit_verify(request: Request, caller: Principal = Depends(require("read_audit"))) -> Response:
    """Recompute the hash chain: the rows checked and every problem found (empty when intact)."""
    guard = guard_of(request)
    if guard.writer:
        await guard.writer.flush()
    count, problems = await asyncio.to_thread(guard.audit.verify)
    return FastJSON({"rows": count, "ok": not problems, "problems": problems})


router.include_router(operator)
router.include_router(admin)
