"""Registered datasets: read (JSONL, CSV, Parquet; local or any fsspec URL), map fields, refuse bad
rows, remove duplicates, split deterministically, hash, and store.

A dataset version is immutable and content-hashed: its rows live in the artifact store (one JSONL file
per split under ``_datasets/NAME/VERSION/``), its metadata in the catalog (tables in `tables`). Every
check runs before anything is stored, so a refused add leaves no row and no file.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadRequest, NotFound

Kind = Literal["classify", "chat", "text"]


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class DatasetUnreadable(BadRequest):
    """The path cannot be opened or parsed (missing file, unknown format, broken Parquet)."""

    code = "dataset_unreadable"


class SplitSpec(BaseModel):
    """How the deduplicated rows are split: shares of train/validation/test, or k folds. Stratified by
    label for classify data; the same rows and seed always give the same splits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.2, ge=0.0, lt=1.0)
    folds: int | None = Field(None, ge=2, description="k folds instead: splits fold-0 .. fold-{k-1}")

    @model_validator(mode="after")
    def _check_shares(self) -> SplitSpec:
        if self.folds is None and self.validation + self.test >= 1.0:
            raise ValueError("validation + test must leave rows for train (their sum must be below 1)")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        if self.folds is not None:
            return tuple(f"fold-{i}" for i in range(self.folds))
        shares = (("train", 1.0), ("validation", self.validation), ("test", self.test))
        return tuple(name for name, share in shares if share > 0)


@dataclass(frozen=True)
class Example:
    text: str  # for chat data: the rendered conversation (what dedup and digests see)
    label: str | None = None  # classify data
    messages: tuple[dict[str, str], ...] | None = None  # chat data: ({"role", "content"}, ...)


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

    @classmethod
    def from_settings(cls, settings) -> Datasets:
        raise NotImplementedError

    def add(
        self,
        name: str,
        path: str,
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
        raise NotImplementedError

    def get(self, ref: str) -> DatasetVersion:
        """``NAME`` (the latest version) or ``NAME:VERSION``; `DatasetNotFound` otherwise."""
        raise NotImplementedError

    def list(self) -> list[DatasetVersion]:
        """The latest version of each dataset, by name."""
        raise NotImplementedError

    def examples(self, dataset: DatasetVersion, split: str) -> builtins.list[Example]:
        """The rows of one split, in their stored (sorted) order, checked against the split's digest."""
        raise NotImplementedError

    def record_use(self, dataset: DatasetVersion, model: str, version: int, role: str = "trained") -> None:
        """Remember that model `model:version` was made from `dataset` (idempotent)."""
        raise NotImplementedError

    def uses(self, name: str, version: int | None = None) -> builtins.list[tuple[str, int, str]]:
        """(model, version, role) of every model made from dataset `name` (one version, or all)."""
        raise NotImplementedError
