"""The model registry: versions, aliases, history, verification. The Python API behind the CLI."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ..db import Catalog, as_utc, utcnow
from ..errors import BadRequest, Conflict, EncryptionError, IntegrityError, ModelNotFound
from ..refs import DEFAULT_ALIAS, ModelRef, parse_ref, validate_alias, validate_name
from . import crypto
from .artifacts import check_folder_files, checked_format, structure_problem
from .manifest import Lineage, Manifest, check_safe, detect_framework, list_model_files, sha256_bytes
from .store import ArtifactStore, NoProgress, Progress, verify_local
from .tables import Alias, AliasEvent, ArtifactKey, Model, ModelVersion


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    task: str
    framework: str
    status: str
    manifest: Manifest
    manifest_sha256: str
    created_at: datetime
    created_by: str
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ModelSummary:
    name: str
    task: str
    num_versions: int
    latest_version: int | None
    aliases: dict[str, int]
    tags: dict[str, str]


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    name: str
    alias: str
    action: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    at: datetime


class Registry:
    """Versioned models in an artifact store, their metadata in a SQL catalog."""

    def __init__(
        self,
        catalog_url: str,
        store_url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        user: str = "",
        cache_dir: Path | None = None,
        lock_timeout_s: float = 30.0,
        security=None,
    ) -> None:
        self.catalog = Catalog(catalog_url, lock_timeout_s)
        self.store = ArtifactStore(store_url, storage_options)
        self.user = user
        self.cache_dir = cache_dir or Path("~/.moorage/cache").expanduser()
        self.security = security  # SecuritySettings: the master key and whether new versions are encrypted
        self._master: crypto.MasterKey | None = None

    @classmethod
    def from_settings(cls, settings) -> Registry:
        return cls(
            settings.catalog_url,
            settings.store_url,
            storage_options=settings.registry.storage_options,
            user=settings.user,
            cache_dir=settings.cache_dir,
            lock_timeout_s=settings.registry.lock_timeout_s,
            security=settings.security,
        )

    def close(self) -> None:
        self.catalog.dispose()

    def acting_as(self, user: str) -> Registry:
        """The same registry (catalog, store, keys) recording `user` as the actor of its changes."""
        clone = copy.copy(self)
        clone.user = user
        return clone

    # ---- register -------------------------------------------------------------------------
    def register(
        self,
        path: str | Path,
        name: str,
        task: str,
        *,
        alias: str | None = None,
        description: str = "",
        params: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        lineage: Lineage | dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        reason: str = "",
        progress: Progress | None = None,
        encrypt: bool | None = None,
    ) -> VersionInfo:
        """Copy a model folder into the store as the next version of `name` (encrypted at rest
        when `encrypt`, default ``security.encrypt_artifacts``)."""
        validate_name(name)
        if alias is not None:
            validate_alias(alias)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise BadRequest(f"model folder {folder} does not exist (or is not a folder)", code="folder_not_found")
        framework = detect_framework(folder, task)
        rel_files = list_model_files(folder)
        check_safe([p.as_posix() for p in rel_files])
        check_folder_files(folder, rel_files)  # before anything is reserved or copied: a refusal leaves nothing
        if lineage is not None and not isinstance(lineage, Lineage):
            lineage = Lineage.model_validate(lineage)
        if encrypt is None:
            encrypt = bool(self.security and self.security.encrypt_artifacts)
        master = self.require_master_key("encrypt new versions") if encrypt else None
        version, is_new_model = self._reserve_version(name, task, framework, description)
        progress = progress or NoProgress()
        data_key = crypto.new_data_key() if master else None
        try:
            sizes = [(folder / p).stat().st_size for p in rel_files]
            progress.start(f"register {name}:{version}", sum(sizes))
            entries = self.store.write_version(
                ((p.as_posix(), self._opener(folder, p, data_key), s) for p, s in zip(rel_files, sizes)),
                name,
                version,
                progress,
            )
            manifest = Manifest(
                name=name,
                version=version,
                task=task,
                framework=framework,
                files=entries,
                params=params or {},
                metrics=metrics or {},
                lineage=lineage or Lineage(),
                description=description,
                source=str(folder.resolve()),
                created_by=self.user,
                created_at=utcnow().isoformat(),
                encryption={"algorithm": crypto.ALGORITHM, "chunk_bytes": crypto.CHUNK} if master else None,
            )
            data = self.store.write_manifest(manifest)
        except BaseException:
            self._abandon(name, version, is_new_model)
            raise
        with self.catalog.session() as s:
            row = s.get_one(ModelVersion, (name, version))
            row.status, row.manifest = "ready", manifest.model_dump(mode="json")
            row.manifest_sha256, row.size_bytes = sha256_bytes(data), manifest.size_bytes
            row.tags = dict(tags or {})
            if master is not None and data_key is not None:
                wrapped = crypto.wrap_key(master, data_key, f"{name}:{version}")
                s.add(ArtifactKey(model_name=name, version=version, master_key_id=master.id, wrapped_key=wrapped))
            if alias:
                self._move_alias(s, name, alias, version, "set", reason or "registered")
        return self.resolve(ModelRef(name, version=version))

    @staticmethod
    def _opener(folder: Path, rel: Path, data_key: bytes | None):
        if data_key is None:
            return lambda: open(folder / rel, "rb")
        return lambda: crypto.EncryptingReader(open(folder / rel, "rb"), data_key, rel.as_posix())

    # ---- encryption at rest -----------------------------------------------------------------
    @property
    def master_key(self) -> crypto.MasterKey | None:
        if self._master is None and self.security is not None:
            self._master = crypto.master_key_from_settings(self.security)
        return self._master

    def require_master_key(self, purpose: str) -> crypto.MasterKey:
        master = self.master_key
        if master is None:
            raise EncryptionError(
                f"a master key is needed to {purpose}: set MOORAGE_SECURITY__MASTER_KEY (base64, 32 bytes) or "
                "security.master_key_file (make one with `moorage models new-master-key FILE`)",
                code="missing_master_key",
            )
        return master

    def data_key(self, info: VersionInfo) -> bytes:
        """The unwrapped data key of an encrypted version (kept in memory only)."""
        with self.catalog.session() as s:
            row = s.get(ArtifactKey, (info.name, info.version))
        if row is None:
            raise EncryptionError(f"{info.ref} is encrypted but its data key is missing from the catalog")
        master = self.require_master_key(f"load {info.ref}, which is encrypted")
        if row.master_key_id != master.id:
            raise EncryptionError(
                f"{info.ref} is encrypted under master key {row.master_key_id}; the configured master key is "
                f"{master.id}",
                code="wrong_master_key",
            )
        return crypto.unwrap_key(master, row.wrapped_key, f"{info.name}:{info.version}")

    def read_plaintext(self, info: VersionInfo, folder: Path) -> dict[str, bytes]:
        """Every file of an encrypted version, decrypted in memory from its verified local copy."""
        key = self.data_key(info)
        out = {}
        for entry in info.manifest.files:
            with open(folder / entry.path, "rb") as f:
                out[entry.path] = crypto.decrypt_file(f, key, entry.path, info.ref)
        return out

    def rekey(self, new: crypto.MasterKey) -> tuple[int, list[str]]:
        """Re-wrap every data key held under the configured master key with `new`; the artifacts'
        ciphertext is not touched. Returns (re-wrapped, skipped: versions under another key)."""
        old = self.require_master_key("re-wrap data keys")
        done, skipped = 0, []
        with self.catalog.session() as s:
            for row in s.scalars(select(ArtifactKey).with_for_update()):
                owner = f"{row.model_name}:{row.version}"
                if row.master_key_id == new.id:
                    continue
                if row.master_key_id != old.id:
                    skipped.append(f"{owner} (under master key {row.master_key_id})")
                    continue
                data_key = crypto.unwrap_key(old, row.wrapped_key, owner)
                row.wrapped_key, row.master_key_id = crypto.wrap_key(new, data_key, owner), new.id
                row.updated_at = utcnow()
                done += 1
        self._master = new
        return done, skipped

    def _reserve_version(self, name: str, task: str, framework: str, description: str) -> tuple[int, bool]:
        """The next version number, held by a pending row; and whether the model row is new."""
        with self.catalog.session() as s:
            model = _lock_model(s, name)
            is_new_model = model is None
            if model is None:
                s.add(Model(name=name, task=task, description=description, tags={}, created_by=self.user))
                s.flush()
            elif model.task != task:
                raise Conflict(
                    f"model {name!r} holds {model.task!r} models; register this {task!r} model under another name",
                    code="task_mismatch",
                )
            last = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_name == name))
            version = (last or 0) + 1
            s.add(
                ModelVersion(
                    model_name=name,
                    version=version,
                    status="pending",
                    task=task,
                    framework=framework,
                    path=f"{name}/{version}",
                    manifest={},
                    manifest_sha256="",
                    size_bytes=0,
                    description=description,
                    tags={},
                    created_by=self.user,
                )
            )
        return version, is_new_model

    def _abandon(self, name: str, version: int, is_new_model: bool) -> None:
        """Undo a registration that failed half-way: its files, its row, and the model row it created
        (unless another registration has added a version meanwhile)."""
        self.store.remove(name, version)
        with self.catalog.session() as s:
            s.execute(delete(ModelVersion).where(ModelVersion.model_name == name, ModelVersion.version == version))
            if is_new_model and _lock_model(s, name) is not None:
                left = s.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.model_name == name))
                if not left:
                    s.execute(delete(Model).where(Model.name == name))

    # ---- read -------------------------------------------------------------------------------
    def resolve(self, ref: str | ModelRef) -> VersionInfo:
        """The ready version a reference points at. Bare NAME: alias 'production', else latest."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.catalog.session() as s:
            self._model_or_404(s, ref.name)
            version = ref.version
            if version is None and ref.alias is not None:
                version = self._alias_target(s, ref.name, ref.alias)
                if version is None:
                    raise ModelNotFound(f"model {ref.name!r} has no alias {ref.alias!r}", code="alias_not_found")
            if version is None:
                version = self._alias_target(s, ref.name, DEFAULT_ALIAS) or s.scalar(
                    select(func.max(ModelVersion.version)).where(
                        ModelVersion.model_name == ref.name, ModelVersion.status == "ready"
                    )
                )
            row = s.get(ModelVersion, (ref.name, version)) if version else None
            if row is None or row.status != "ready":
                raise ModelNotFound(
                    f"model {ref.name!r} has no version {version or '(none ready)'}", code="version_not_found"
                )
            return self._info(s, row)

    def list_models(self) -> list[ModelSummary]:
        with self.catalog.session() as s:
            out = []
            for model in s.scalars(select(Model).order_by(Model.name)):
                versions = list(
                    s.scalars(
                        select(ModelVersion.version).where(
                            ModelVersion.model_name == model.name, ModelVersion.status == "ready"
                        )
                    )
                )
                aliases = {a.alias: a.version for a in s.scalars(select(Alias).where(Alias.model_name == model.name))}
                out.append(
                    ModelSummary(
                        model.name, model.task, len(versions), max(versions, default=None), aliases, dict(model.tags)
                    )
                )
            return out

    def list_versions(self, name: str) -> list[VersionInfo]:
        validate_name(name)
        with self.catalog.session() as s:
            self._model_or_404(s, name)
            rows = s.scalars(select(ModelVersion).where(ModelVersion.model_name == name).order_by(ModelVersion.version))
            return [self._info(s, r) for r in rows]

    def history(self, name: str, alias: str | None = None) -> list[HistoryEntry]:
        validate_name(name)
        with self.catalog.session() as s:
            self._model_or_404(s, name)
            query = select(AliasEvent).where(AliasEvent.model_name == name)
            if alias is not None:
                query = query.where(AliasEvent.alias == validate_alias(alias))
            return [_entry(e) for e in s.scalars(query.order_by(AliasEvent.id))]

    # ---- aliases ----------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int, reason: str = "") -> HistoryEntry:
        validate_name(name), validate_alias(alias)
        with self.catalog.session() as s:
            return self._move_alias(s, name, alias, version, "set", reason)

    def remove_alias(self, name: str, alias: str, reason: str = "") -> HistoryEntry:
        validate_name(name), validate_alias(alias)
        with self.catalog.session() as s:
            return self._move_alias(s, name, alias, None, "remove", reason)

    def rollback(self, name: str, alias: str, reason: str = "") -> HistoryEntry:
        """Move `alias` back to the target it had before its current one (repeatable, like undo)."""
        validate_name(name), validate_alias(alias)
        with self.catalog.session() as s:
            self._model_or_404(s, name, lock=True)
            events = s.scalars(
                select(AliasEvent)
                .where(AliasEvent.model_name == name, AliasEvent.alias == alias)
                .order_by(AliasEvent.id)
            )
            targets: list[int | None] = []
            for event in events:
                if event.action == "rollback":
                    targets.pop()
                else:
                    targets.append(event.to_version)
            if len(targets) < 2 or targets[-2] is None:
                raise Conflict(
                    f"alias {name}@{alias} has no earlier target to roll back to", code="nothing_to_rollback"
                )
            return self._move_alias(s, name, alias, targets[-2], "rollback", reason)

    def _move_alias(
        self, s: Session, name: str, alias: str, version: int | None, action: str, reason: str
    ) -> HistoryEntry:
        self._model_or_404(s, name, lock=True)
        if version is not None:
            row = s.get(ModelVersion, (name, version))
            if row is None or row.status != "ready":
                raise ModelNotFound(f"model {name!r} has no version {version}", code="version_not_found")
        current = s.get(Alias, (name, alias))
        previous = current.version if current else None
        if version is None:
            if current is None:
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}", code="alias_not_found")
            s.delete(current)
        elif current is None:
            s.add(Alias(model_name=name, alias=alias, version=version, updated_by=self.user))
        else:
            current.version, current.updated_at, current.updated_by = version, utcnow(), self.user
        event = AliasEvent(
            model_name=name,
            alias=alias,
            action=action,
            from_version=previous,
            to_version=version,
            actor=self.user,
            reason=reason or "",
            at=utcnow(),
        )
        s.add(event)
        s.flush()
        return _entry(event)

    # ---- tags and deletion ------------------------------------------------------------------
    def tag(self, ref: str, set_tags: dict[str, str], remove: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
        """Tag a model (``NAME``) or one version (``NAME:VERSION`` or ``NAME@ALIAS``)."""
        parsed = parse_ref(ref)
        target = self.resolve(parsed) if (parsed.version or parsed.alias) else None
        with self.catalog.session() as s:
            row = (
                s.get_one(ModelVersion, (target.name, target.version))
                if target
                else self._model_or_404(s, parsed.name, lock=True)
            )
            tags = {**row.tags, **{str(k): str(v) for k, v in set_tags.items()}}
            for key in remove:
                tags.pop(key, None)
            row.tags = tags
            return tags

    def delete_version(self, name: str, version: int, reason: str = "") -> None:
        validate_name(name)
        with self.catalog.session() as s:
            self._model_or_404(s, name, lock=True)
            row = s.get(ModelVersion, (name, version))
            if row is None:
                raise ModelNotFound(f"model {name!r} has no version {version}", code="version_not_found")
            pointing = sorted(s.scalars(select(Alias.alias).where(Alias.model_name == name, Alias.version == version)))
            if pointing:
                raise Conflict(
                    f"{name}:{version} is the target of alias(es) {', '.join(pointing)}; "
                    "move them first (moorage models alias ...)",
                    code="alias_in_use",
                )
            s.delete(row)
        self.store.remove(name, version)

    # ---- integrity and local copies ---------------------------------------------------------
    def verify(self, ref: str | ModelRef, progress: Progress | None = None) -> list[str]:
        """Recompute every checksum of a version; an empty list means it is intact."""
        info = self.resolve(ref)
        problems = self.store.verify(info.manifest, progress)
        problems += self._header_problems(info, {p.split(":", 1)[0] for p in problems})
        try:
            stored = self.store.read_manifest_bytes(info.name, info.version)
            if sha256_bytes(stored) != info.manifest_sha256:
                problems.insert(0, "moorage.json: differs from the catalog's manifest")
        except FileNotFoundError:
            problems.insert(0, "moorage.json: missing")
        return problems

    def _header_problems(self, info: VersionInfo, already_bad: set[str]) -> list[str]:
        """One line per safetensors or ONNX file whose structure is malformed (files already reported
        missing or changed are skipped). Encrypted files are ciphertext at rest: they are checked at load."""
        if info.manifest.encryption:
            return []
        problems = []
        for entry in info.manifest.files:
            kind = checked_format(entry.path)
            if entry.path in already_bad or kind is None:
                continue
            with self.store.open(info.name, info.version, entry.path) as f:
                problem = structure_problem(entry.path, f, entry.size)
            if problem is not None:
                problems.append(f"{entry.path}: not a valid {kind} file ({problem})")
        return problems

    def local_path(self, info: VersionInfo, progress: Progress | None = None) -> Path:
        """A verified local folder with the version's files (fetched into the cache if remote)."""
        progress = progress or NoProgress()
        folder = self.store.local_copy(info.manifest, self.cache_dir, progress)
        try:
            verify_local(folder, info.manifest)
        except IntegrityError:
            if self.store.is_local:
                raise
            # a damaged cached copy of a remote version: fetch it again, then verify that copy
            shutil.rmtree(folder, ignore_errors=True)
            folder = self.store.local_copy(info.manifest, self.cache_dir, progress)
            verify_local(folder, info.manifest)
        return folder

    # ---- helpers ----------------------------------------------------------------------------
    def _model_or_404(self, s: Session, name: str, *, lock: bool = False) -> Model:
        """The model row; with `lock`, held against other writers until the transaction ends."""
        model = _lock_model(s, name) if lock else s.get(Model, name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}; `moorage models list` shows the registered ones")
        return model

    def _alias_target(self, s: Session, name: str, alias: str) -> int | None:
        row = s.get(Alias, (name, alias))
        return row.version if row else None

    def _info(self, s: Session, row: ModelVersion) -> VersionInfo:
        aliases = tuple(
            sorted(
                s.scalars(select(Alias.alias).where(Alias.model_name == row.model_name, Alias.version == row.version))
            )
        )
        manifest = (
            Manifest.model_validate(row.manifest)
            if row.status == "ready"
            else Manifest(name=row.model_name, version=row.version, task=row.task, framework=row.framework, files=[])
        )
        return VersionInfo(
            row.model_name,
            row.version,
            row.task,
            row.framework,
            row.status,
            manifest,
            row.manifest_sha256,
            as_utc(row.created_at),
            row.created_by,
            row.description,
            dict(row.tags),
            aliases,
        )


def _entry(e: AliasEvent) -> HistoryEntry:
    return HistoryEntry(
        e.id, e.model_name, e.alias, e.action, e.from_version, e.to_version, e.actor, e.reason, as_utc(e.at)
    )


def _lock_model(s: Session, name: str) -> Model | None:
    """Read the model row, holding a write lock on it until the transaction ends."""
    return s.scalar(select(Model).where(Model.name == name).with_for_update())
