"""Registered datasets: read (JSONL, CSV, Parquet; local or any fsspec URL), map fields, refuse bad
rows, remove duplicates, split deterministically, hash, and store.

A dataset version is immutable and content-hashed: its rows live in the artifact store (one JSONL file
per split under ``_datasets/NAME/VERSION/``), its metadata in the catalog (tables in `tables`). Every
check runs before anything is stored, so a refused add leaves no row and no file.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..config import redact_url
from ..db import Catalog, as_utc
from ..errors import BadRequest, Conflict, IntegrityError, ModelNotFound, NotFound
from ..refs import parse_version, validate_name
from ..registry.store import ArtifactStore
from ..registry.tables import ModelVersion
from .rows import DatasetUnreadable, Example, Fields, Kind, Prepared, SplitSpec, encode_lines, prepare, read_rows
from .rows import split as split_rows
from .tables import Dataset, DatasetUse, DatasetVersionRow

__all__ = [
    "DatasetNotFound",
    "DatasetUnreadable",
    "DatasetVersion",
    "Datasets",
    "Example",
    "Fields",
    "SplitInfo",
    "SplitSpec",
]

log = logging.getLogger("moorage.datasets")

STORE_PREFIX = "_datasets"  # no model name starts with "_", so this never meets a model's folder


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


@dataclass(frozen=True)
class SplitInfo:
    name: str
    rows: int
    digest: str  # sha256 of the split's stored file (its canonical rows, sorted)


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: int
    kind: Kind
    digest: str  # sha256 of all deduplicated rows, canonical and sorted (order-free)
    label_map: dict[str, int]  # label -> id (sorted labels), fixed at add time; {} unless classify
    split: SplitSpec
    splits: dict[str, SplitInfo]
    stats: dict[str, int]  # rows_read, refused, exact_duplicates, normalized_duplicates, label_conflicts, rows
    source: str
    created_at: str
    created_by: str
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def lineage(self) -> dict[str, Any]:
        """What a model trained on this dataset records about it."""
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "seed": self.split.seed,
            "splits": {name: info.digest for name, info in self.splits.items()},
        }


class Datasets:
    """Versioned datasets: rows in the artifact store, metadata in the catalog."""

    def __init__(self, catalog: Catalog, store: ArtifactStore, *, user: str = "") -> None:
        self.catalog = catalog
        self.store = store
        self.root = f"{store.root}/{STORE_PREFIX}"
        self.user = user

    @classmethod
    def from_settings(cls, settings) -> Datasets:
        catalog = Catalog(settings.catalog_url, settings.registry.lock_timeout_s)
        store = ArtifactStore(settings.store_url, settings.registry.storage_options)
        return cls(catalog, store, user=settings.user)

    @classmethod
    def from_registry(cls, registry) -> Datasets:
        """The datasets next to `registry`, sharing its catalog connection and store."""
        return cls(registry.catalog, registry.store, user=registry.user)

    def close(self) -> None:
        """Release the catalog's connections (a `from_registry` instance shares them with its registry)."""
        self.catalog.dispose()

    def add(
        self,
        name: str,
        path: str | Path,
        *,
        text: str = "text",
        label: str | None = "label",
        messages: str | None = None,
        split: SplitSpec = SplitSpec(),
        storage_options: dict[str, Any] | None = None,
        description: str = "",
        skip_invalid: bool = False,
    ) -> DatasetVersion:
        """Register the file at `path` as the next version of `name` (or return the latest version when
        it holds the same rows split the same way). `label=None`: a text-only dataset; `messages`: the
        column of chat conversations. Rows without text or label, or of the wrong type, refuse the add
        (`skip_invalid`: they are dropped and counted instead)."""
        return self.ensure(
            name,
            path,
            fields=Fields(text=text, label=label, messages=messages),
            split=split,
            storage_options=storage_options,
            description=description,
            skip_invalid=skip_invalid,
        )[0]

    def ensure(
        self,
        name: str,
        path: str | Path,
        *,
        fields: Fields = Fields(),
        split: SplitSpec = SplitSpec(),
        storage_options: dict[str, Any] | None = None,
        description: str = "",
        skip_invalid: bool = False,
    ) -> tuple[DatasetVersion, bool]:
        """`add`, also saying whether a new version was stored (False: the latest one holds these rows)."""
        validate_name(name, "dataset")
        source = redact_url(str(path))
        prepared = prepare(read_rows(str(path), storage_options), fields, source, skip_invalid=skip_invalid)
        files = {
            name_: encode_lines(e.canonical() for e in rows) for name_, rows in split_rows(prepared, split).items()
        }
        latest = self._latest(name)
        if latest is not None and latest.digest == prepared.digest and latest.split == split:
            return latest, False
        row = self._reserve(name, prepared, split, files, source, description)
        try:
            self._write(row.path, files)
            with self.catalog.session() as session:
                session.execute(
                    update(DatasetVersionRow)
                    .where(DatasetVersionRow.dataset_name == name, DatasetVersionRow.version == row.version)
                    .values(status="ready")
                )
        except BaseException:
            try:
                self._discard(name, row.version, row.path)
            except Exception:  # the store or catalog failed twice: readers skip the pending row anyway
                log.warning("could not remove the pending dataset version %s:%s", name, row.version, exc_info=True)
            raise
        return _to_version(row), True

    def get(self, ref: str) -> DatasetVersion:
        """``NAME`` (the latest version) or ``NAME:VERSION``; `DatasetNotFound` otherwise."""
        name, _, version_text = ref.strip().partition(":")
        validate_name(name, "dataset")
        if not version_text:
            latest = self._latest(name)
            if latest is None:
                raise DatasetNotFound(f"no dataset {name!r} (moorage datasets list shows them)")
            return latest
        version = parse_version(version_text)
        with self.catalog.session() as session:
            row = session.get(DatasetVersionRow, (name, version))
        if row is None or row.status != "ready":
            raise DatasetNotFound(f"dataset {name!r} has no version {version} (moorage datasets show {name})")
        return _to_version(row)

    def list(self) -> builtins.list[DatasetVersion]:
        """The latest version of each dataset, by name."""
        latest = (
            select(DatasetVersionRow.dataset_name, func.max(DatasetVersionRow.version).label("version"))
            .where(DatasetVersionRow.status == "ready")
            .group_by(DatasetVersionRow.dataset_name)
            .subquery()
        )
        query = (
            select(DatasetVersionRow)
            .join(
                latest,
                (DatasetVersionRow.dataset_name == latest.c.dataset_name)
                & (DatasetVersionRow.version == latest.c.version),
            )
            .order_by(DatasetVersionRow.dataset_name)
        )
        with self.catalog.session() as session:
            return [_to_version(row) for row in session.scalars(query)]

    def versions(self, name: str) -> builtins.list[DatasetVersion]:
        """Every version of `name`, oldest first."""
        validate_name(name, "dataset")
        with self.catalog.session() as session:
            rows = session.scalars(
                select(DatasetVersionRow)
                .where(DatasetVersionRow.dataset_name == name, DatasetVersionRow.status == "ready")
                .order_by(DatasetVersionRow.version)
            ).all()
        if not rows:
            raise DatasetNotFound(f"no dataset {name!r} (moorage datasets list shows them)")
        return [_to_version(row) for row in rows]

    def examples(self, dataset: DatasetVersion, split: str) -> builtins.list[Example]:
        """The rows of one split, in their stored (sorted) order, checked against the split's digest."""
        info = dataset.splits.get(split)
        if info is None:
            raise BadRequest(
                f"dataset {dataset.ref} has no split {split!r} (it has {', '.join(dataset.splits)})",
                code="unknown_split",
            )
        with self.store.fs.open(self._split_path(dataset.name, dataset.version, split), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != info.digest:
            raise IntegrityError(f"split {split!r} of dataset {dataset.ref} does not match its digest: it was altered")
        return [Example.from_canonical(line) for line in data.decode().splitlines()]

    def record_use(self, dataset: DatasetVersion, model: str, version: int, role: str = "trained") -> None:
        """Remember that model `model:version` was made from `dataset` (idempotent)."""
        with self.catalog.session() as session:
            if session.get(ModelVersion, (model, version)) is None:
                raise ModelNotFound(f"model {model}:{version} is not registered")
            if session.get(DatasetVersionRow, (dataset.name, dataset.version)) is None:
                raise DatasetNotFound(f"dataset {dataset.ref} is not registered")
            known = session.scalar(
                select(DatasetUse.id).where(
                    DatasetUse.dataset_name == dataset.name,
                    DatasetUse.dataset_version == dataset.version,
                    DatasetUse.model_name == model,
                    DatasetUse.model_version == version,
                    DatasetUse.role == role,
                )
            )
            if known is None:
                session.add(
                    DatasetUse(
                        dataset_name=dataset.name,
                        dataset_version=dataset.version,
                        model_name=model,
                        model_version=version,
                        role=role,
                    )
                )

    def uses(self, name: str, version: int | None = None) -> builtins.list[tuple[str, int, str]]:
        """(model, version, role) of every model made from dataset `name` (one version, or all)."""
        if version is None:
            self.versions(name)  # DatasetNotFound for an unknown name
        else:
            self.get(f"{name}:{version}")
        query = select(DatasetUse.model_name, DatasetUse.model_version, DatasetUse.role).where(
            DatasetUse.dataset_name == name
        )
        if version is not None:
            query = query.where(DatasetUse.dataset_version == version)
        with self.catalog.session() as session:
            found = {(m, v, r) for m, v, r in session.execute(query)}
        return sorted(found)

    # ---- storage ---------------------------------------------------------------------------------
    def _latest(self, name: str) -> DatasetVersion | None:
        with self.catalog.session() as session:
            row = session.scalar(
                select(DatasetVersionRow)
                .where(DatasetVersionRow.dataset_name == name, DatasetVersionRow.status == "ready")
                .order_by(DatasetVersionRow.version.desc())
                .limit(1)
            )
        return _to_version(row) if row is not None else None

    def _reserve(
        self,
        name: str,
        prepared: Prepared,
        spec: SplitSpec,
        files: dict[str, bytes],
        source: str,
        description: str,
    ) -> DatasetVersionRow:
        """The next version's row, 'pending' until its files are written (readers skip it)."""
        with self.catalog.session() as session:
            dataset = _lock_dataset(session, name)
            if dataset is None:
                session.add(Dataset(name=name, description=description, created_by=self.user))
                session.flush()
            last = session.scalar(
                select(func.max(DatasetVersionRow.version)).where(DatasetVersionRow.dataset_name == name)
            )
            version = (last or 0) + 1
            row = DatasetVersionRow(
                dataset_name=name,
                version=version,
                status="pending",
                kind=prepared.kind,
                digest=prepared.digest,
                label_map=prepared.label_map,
                split=spec.model_dump(),
                splits={
                    s: {"rows": data.count(b"\n"), "digest": hashlib.sha256(data).hexdigest()}
                    for s, data in files.items()
                },
                stats=prepared.stats,
                source=source,
                path=f"{name}/{version}",
                description=description,
                created_by=self.user,
            )
            session.add(row)
            try:
                session.flush()
            except sa_exc.IntegrityError:  # another add of `name` took this version number first
                raise Conflict(f"dataset {name!r} was being added by someone else at the same time; retry") from None
        return row

    def _write(self, rel: str, files: dict[str, bytes]) -> None:
        folder = f"{self.root}/{rel}"
        self.store.fs.makedirs(folder, exist_ok=True)
        for split_name, data in files.items():
            with self.store.fs.open(f"{folder}/{split_name}.jsonl", "wb") as f:
                f.write(data)

    def _discard(self, name: str, version: int, rel: str) -> None:
        """Undo a failed add: its files, then its pending row (and the dataset's, if it was the first)."""
        folder = f"{self.root}/{rel}"
        if self.store.fs.exists(folder):
            self.store.fs.rm(folder, recursive=True)
        with self.catalog.session() as session:
            row = session.get(DatasetVersionRow, (name, version))
            if row is not None:
                session.delete(row)
                session.flush()
            remaining = session.scalar(select(func.count()).where(DatasetVersionRow.dataset_name == name))
            dataset = session.get(Dataset, name)
            if not remaining and dataset is not None:
                session.delete(dataset)

    def _split_path(self, name: str, version: int, split: str) -> str:
        return f"{self.root}/{name}/{version}/{split}.jsonl"


def _lock_dataset(session: Session, name: str) -> Dataset | None:
    """The dataset's row, locked until the transaction ends (PostgreSQL; SQLite's writers queue at BEGIN)."""
    return session.scalar(select(Dataset).where(Dataset.name == name).with_for_update())


def _to_version(row: DatasetVersionRow) -> DatasetVersion:
    return DatasetVersion(
        name=row.dataset_name,
        version=row.version,
        kind=row.kind,  # type: ignore[arg-type]
        digest=row.digest,
        label_map=dict(row.label_map),
        split=SplitSpec.model_validate(row.split),
        splits={name: SplitInfo(name, info["rows"], info["digest"]) for name, info in row.splits.items()},
        stats=dict(row.stats),
        source=row.source,
        created_at=as_utc(row.created_at).isoformat(),
        created_by=row.created_by,
        description=row.description,
    )
