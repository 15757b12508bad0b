"""The rows of a dataset before it is stored: read a file (JSONL, CSV, Parquet; local or any fsspec
URL), map its fields, refuse bad rows, remove duplicates, split, and write each split canonically.

Everything here works in memory and raises before anything is stored; `datasets` stores the result.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadRequest, require

Kind = Literal["classify", "chat", "text"]
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
MAX_EXAMPLES = 3  # bad rows quoted in a refusal


class DatasetUnreadable(BadRequest):
    """The path cannot be opened or parsed (missing file, unknown format, broken Parquet or CSV)."""

    code = "dataset_unreadable"


class SplitSpec(BaseModel):
    """How the deduplicated rows are split: shares of train/validation/test, or k folds. Stratified by
    label for classify data; the same rows and seed always give the same splits. With `folds` the
    shares are not used: every row is in exactly one fold."""

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

    def canonical(self) -> str:
        """One JSON line that identifies the row: what is stored, sorted and hashed."""
        row: dict[str, Any] = {"text": self.text}
        if self.label is not None:
            row["label"] = self.label
        if self.messages is not None:
            row["messages"] = list(self.messages)
        return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_canonical(cls, line: str) -> Example:
        row = json.loads(line)
        messages = row.get("messages")
        return cls(row["text"], row.get("label"), tuple(messages) if messages is not None else None)


@dataclass(frozen=True)
class Fields:
    """Which columns hold what. `messages` set: chat data; `label` None: text-only data."""

    text: str = "text"
    label: str | None = "label"
    messages: str | None = None

    @property
    def kind(self) -> Kind:
        if self.messages is not None:
            return "chat"
        return "classify" if self.label is not None else "text"


@dataclass
class Prepared:
    """The rows that survived: deduplicated, sorted by their canonical line."""

    kind: Kind
    examples: list[Example]
    stats: dict[str, int]
    label_map: dict[str, int] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return digest_lines(e.canonical() for e in self.examples)


def digest_lines(lines: Iterable[str]) -> str:
    return hashlib.sha256(encode_lines(lines)).hexdigest()


def encode_lines(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def normalize(text: str) -> str:
    """The text two rows must share to count as one: NFKC, casefolded, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


# ---- reading -----------------------------------------------------------------------------------
def read_rows(path: str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, Any]]:
    """(row number, record) of every row of the file; a JSON line that does not parse is kept as an
    `_Unparsed` record, so it is refused with the other bad rows."""
    fmt = _format(path)
    try:
        with fsspec.open(path, "rb", compression=None if fmt == "parquet" else "infer", **(storage_options or {})) as f:
            data = f.read()
    except (OSError, ValueError, ImportError) as exc:
        raise DatasetUnreadable(f"cannot read dataset {path}: {_reason(exc)}") from None
    try:
        if fmt == "parquet":
            return _parquet(data)
        text = data.decode("utf-8-sig")
        if fmt == "csv":
            return _csv(text)
        return _json(text, fmt)
    except UnicodeDecodeError as exc:
        raise DatasetUnreadable(
            f"cannot read dataset {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except (csv.Error, ValueError, OSError) as exc:
        raise DatasetUnreadable(f"cannot read dataset {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _format(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    if suffix not in FORMATS:
        raise DatasetUnreadable(
            f"cannot read dataset {path}: unknown format {suffix or '(no suffix)'}; "
            "use .jsonl, .csv or .parquet (JSON Lines and CSV may be compressed: .gz, .bz2, .xz, .zst)"
        )
    return FORMATS[suffix]


@dataclass(frozen=True)
class _Unparsed:
    reason: str


def _json(text: str, fmt: str) -> list[tuple[int, Any]]:
    if fmt == "json" and text.lstrip().startswith("["):  # one JSON array rather than JSON Lines
        records = json.loads(text)
        return list(enumerate(records, start=1))
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError:
            rows.append((number, _Unparsed("not valid JSON")))
    return rows


def _csv(text: str) -> list[tuple[int, Any]]:
    csv.field_size_limit(1 << 30)  # one article per cell is common; the default refuses 128 KiB
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return [(number, row) for number, row in enumerate(reader, start=1)]


def _parquet(data: bytes) -> list[tuple[int, Any]]:
    pq = require("pyarrow.parquet", "training")
    table = pq.read_table(io.BytesIO(data))
    return list(enumerate(table.to_pylist(), start=1))


# ---- checking and deduplicating ----------------------------------------------------------------
def prepare(rows: Sequence[tuple[int, Any]], fields: Fields, source: str, *, skip_invalid: bool = False) -> Prepared:
    """Map, check and deduplicate `rows`. Bad rows refuse the whole dataset unless `skip_invalid`."""
    if not rows:
        raise BadRequest(f"dataset {source} has no rows", code="dataset_empty")
    _check_columns(rows, fields, source)
    examples, refusals = [], _Refusals()
    for number, record in rows:
        example, problem = _example(record, fields)
        if example is not None:
            examples.append(example)
        elif problem is not None:
            refusals.add(number, *problem)
    if refusals.count and not skip_invalid:
        raise BadRequest(refusals.message(len(rows)), code="invalid_rows")
    kept, stats = deduplicate(examples)
    stats = {"rows_read": len(rows), "refused": refusals.count, **refusals.by_kind(), **stats}
    if not kept:
        raise BadRequest(f"dataset {source} has no usable rows ({_describe(stats)})", code="dataset_empty")
    prepared = Prepared(fields.kind, kept, stats)
    if fields.kind == "classify":
        labels = sorted({e.label for e in kept if e.label is not None})
        if len(labels) < 2:
            raise BadRequest(
                f"dataset {source} has a single class ({labels[0]!r}): a classifier needs at least two labels",
                code="single_class",
            )
        prepared.label_map = {label: i for i, label in enumerate(labels)}
    return prepared


def _check_columns(rows: Sequence[tuple[int, Any]], fields: Fields, source: str) -> None:
    columns: dict[str, None] = {}
    for _, record in rows:
        if isinstance(record, dict):
            columns.update(dict.fromkeys(record))
    found = ", ".join(map(str, columns)) or "none"
    wanted = [("messages", fields.messages, "--messages")] if fields.messages is not None else []
    if fields.messages is None:
        wanted.append(("text", fields.text, "--text"))
        if fields.label is not None:
            wanted.append(("label", fields.label, "--label (or --text-only for unlabelled text)"))
    for role, column, flag in wanted:
        if column not in columns:
            raise BadRequest(
                f"dataset {source} has no {role} column {column!r} (columns: {found}); name it with {flag}",
                code=f"{role}_missing",
            )


def _example(record: Any, fields: Fields) -> tuple[Example, None] | tuple[None, tuple[str, str]]:
    """The row as an `Example`, or (kind of problem, what is wrong)."""
    if not isinstance(record, dict):
        what = record.reason if isinstance(record, _Unparsed) else f"a JSON {type(record).__name__}, not an object"
        return None, ("wrong_type", what)
    if fields.messages is not None:
        return _chat_example(record.get(fields.messages), fields.messages)
    text = record.get(fields.text)
    if text is None or (isinstance(text, str) and not text.strip()):
        return None, ("missing", f"no text in {fields.text!r}")
    if not isinstance(text, str):
        return None, ("wrong_type", f"{fields.text!r} is {_type(text)}, not a string")
    if fields.label is None:
        return Example(text), None
    label = record.get(fields.label)
    if label is None or (isinstance(label, str) and not label.strip()):
        return None, ("missing", f"no label in {fields.label!r}")
    if isinstance(label, bool) or not isinstance(label, str | int):
        return None, ("wrong_type", f"{fields.label!r} is {_type(label)}, not a string or integer")
    return Example(text, str(label).strip()), None


def _chat_example(messages: Any, column: str) -> tuple[Example, None] | tuple[None, tuple[str, str]]:
    if messages is None or (isinstance(messages, list | tuple) and not messages):
        return None, ("missing", f"no messages in {column!r}")
    if not isinstance(messages, list | tuple):
        return None, ("wrong_type", f"{column!r} is {_type(messages)}, not a list of messages")
    turns = []
    for turn in messages:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            return None, ("wrong_type", f"{column!r} holds {_type(turn)}, not a {{'role', 'content'}} message")
        turns.append({"role": turn["role"], "content": turn["content"]})
    text = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
    return Example(text, messages=tuple(turns)), None


def _type(value: Any) -> str:
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


class _Refusals:
    """Bad rows: counted by kind, the first few quoted."""

    KINDS = ("missing", "wrong_type")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def add(self, number: int, kind: str, what: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"row {number}: {what}")

    def by_kind(self) -> dict[str, int]:
        return {kind: self.counts[kind] for kind in self.KINDS}

    def message(self, rows_read: int) -> str:
        parts = [f"{self.counts['missing']} without text or label"] if self.counts["missing"] else []
        if self.counts["wrong_type"]:
            parts.append(f"{self.counts['wrong_type']} of the wrong type")
        return (
            f"{self.count} of {rows_read} rows refused ({', '.join(parts)}), e.g. {'; '.join(self.examples)}; "
            "fix them, or drop them with --skip-invalid"
        )


def deduplicate(examples: Sequence[Example]) -> tuple[list[Example], dict[str, int]]:
    """One row per normalised text, sorted by canonical line. Copies of a text that disagree on its
    label are all dropped: neither label can be trusted, and keeping one would pick it by chance."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        groups[normalize(example.text)].append(example)
    kept, exact, normalized, conflicts = [], 0, 0, 0
    for group in groups.values():
        if len({e.label for e in group}) > 1:
            conflicts += len(group)
            continue
        lines = {e.canonical() for e in group}
        exact += len(group) - len(lines)
        normalized += len(lines) - 1
        kept.append(min(lines))
    stats = {
        "exact_duplicates": exact,
        "normalized_duplicates": normalized,
        "label_conflicts": conflicts,
        "rows": len(kept),
    }
    return [Example.from_canonical(line) for line in sorted(kept)], stats


def _describe(stats: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in stats.items() if v)


# ---- splitting ---------------------------------------------------------------------------------
def split(prepared: Prepared, spec: SplitSpec) -> dict[str, list[Example]]:
    """The rows of each split (stratified by label for classify data), each kept in canonical order."""
    import numpy as np

    model_selection = require("sklearn.model_selection", "training")
    examples = prepared.examples
    labels = np.array([e.label or "" for e in examples])
    stratified = prepared.kind == "classify"
    placeholder = np.zeros(len(examples))
    try:
        if spec.folds is not None:
            _check_folds(labels, spec.folds, stratified)
            kfold = (model_selection.StratifiedKFold if stratified else model_selection.KFold)(
                n_splits=spec.folds, shuffle=True, random_state=spec.seed
            )
            parts = {f"fold-{i}": held for i, (_, held) in enumerate(kfold.split(placeholder, labels))}
        else:
            parts = _shares(np.arange(len(examples)), labels, spec, stratified, model_selection)
    except ValueError as exc:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(labels.tolist()).items()))
        where = f" stratified by label ({counts})" if stratified else ""
        raise BadRequest(
            f"cannot split {len(examples)} rows{where} as asked: {exc}; add rows or lower the shares",
            code="split_impossible",
        ) from None
    return {name: [examples[i] for i in sorted(idx.tolist())] for name, idx in parts.items()}


def _check_folds(labels, folds: int, stratified: bool) -> None:
    smallest = min(Counter(labels.tolist()).values()) if stratified else len(labels)
    if smallest < folds:
        raise ValueError(f"{folds} folds need at least {folds} rows of every class, the smallest has {smallest}")


def _shares(indices, labels, spec: SplitSpec, stratified: bool, model_selection) -> dict[str, Any]:
    """train / validation / test: the test rows first, then validation out of what is left. Each share
    becomes a whole number of rows of the whole dataset (at least one), so no float rounding moves a row."""
    parts = {}
    rest = indices
    for name, share in (("test", spec.test), ("validation", spec.validation)):
        if share <= 0:
            continue
        splitter = (model_selection.StratifiedShuffleSplit if stratified else model_selection.ShuffleSplit)(
            n_splits=1, test_size=max(1, round(share * len(indices))), random_state=spec.seed
        )
        keep, held = next(splitter.split(rest, labels[rest]))
        parts[name] = rest[held]
        rest = rest[keep]
    parts["train"] = rest
    return {name: parts[name] for name in spec.names}
