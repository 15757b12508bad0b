"""The manifest (``moorage.json``) that describes one model version, and folder inspection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ..errors import BadRequest, InvalidArtifact, UnsafeArtifact

MANIFEST_NAME = "moorage.json"
TASKS = ("embed", "classify", "generate")
# Formats that need pickle to load: never stored, never loaded.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
CHUNK = 1 << 20


class FileEntry(BaseModel):
    path: str
    sha256: str
    size: int


class Lineage(BaseModel):
    """Where a version came from. Every field is optional: a version registered by hand names what
    its user gave; a trained one names all of it (see `moorage.training.publish`)."""

    parent: str | None = Field(None, description="NAME:VERSION this version was derived from")
    parent_manifest_sha256: str | None = Field(None, description="digest of the parent's manifest")
    dataset_sha256: str | None = None
    dataset: dict[str, Any] | None = Field(
        None, description="the training data: name, version, digest, split seed and each split's digest"
    )
    label_map: dict[str, int] | None = Field(None, description="label -> class id of a classifier")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="every training parameter, in full")
    validation: list[dict[str, Any]] = Field(default_factory=list, description="every validation evaluation")
    packages: dict[str, str] = Field(default_factory=dict, description="versions of the packages that trained it")
    code_version: str | None = None


class Manifest(BaseModel):
    format: int = 1
    name: str
    version: int
    task: str
    framework: str
    files: list[FileEntry]
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: Lineage = Field(default_factory=Lineage)
    description: str = ""
    source: str = ""
    created_by: str = ""
    created_at: str = ""
    encryption: dict[str, Any] | None = Field(None, description="set when the files are encrypted at rest")

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        data = self.model_dump(mode="json", exclude={"encryption"} if self.encryption is None else None)
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_model_files(folder: Path) -> list[Path]:
    """Files of a model folder, relative, sorted; hidden files and an old manifest are skipped. A
    device, fifo, socket or broken link is refused rather than skipped: the folder is not what it seems."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir() or rel.as_posix() == MANIFEST_NAME:
            continue
        if not path.is_file():
            raise InvalidArtifact(
                f"refusing {rel.as_posix()}: it is not a regular file (a device, a fifo, a socket or a broken "
                "link); a model folder holds plain files only"
            )
        files.append(rel)
    return files


def check_safe(paths: list[str]) -> None:
    unsafe = [p for p in paths if p.lower().endswith(UNSAFE_SUFFIXES)]
    if unsafe:
        raise UnsafeArtifact(
            f"refusing pickle-based file(s) {', '.join(unsafe)}: moorage stores and loads only "
            "safetensors weights; save the model with save_pretrained(dir, safe_serialization=True) "
            "and leave training state (*.bin, *.pt) out of the folder"
        )


def detect_framework(folder: Path, task: str) -> str:
    """Say which loader fits the folder, and refuse a folder that does not fit `task`."""
    if task not in TASKS:
        raise BadRequest(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if (folder / "fake.json").is_file():
        fake_task = _read_json(folder / "fake.json").get("task")
        _check_task(folder, task, fake_task, "fake.json")
        return "fake"
    if (folder / "onnx.json").is_file():  # a derived ONNX folder (see moorage.runtime.onnx)
        _check_task(folder, task, _read_json(folder / "onnx.json").get("task"), "onnx.json")
        if not (folder / "model.onnx").is_file():
            raise BadRequest(f"{folder} has an onnx.json but no model.onnx: export the model again")
        return "onnx"
    if any(folder.glob("*.gguf")):
        raise BadRequest(
            f"{folder} holds a GGUF file: load it with transformers (gguf_file=...) and "
            "save_pretrained() it as safetensors first (see `moorage demo`)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BadRequest(f"{folder} has no config.json: it is not a model folder moorage can load")
    archs = _read_json(config_path).get("architectures") or []
    arch_task = _task_of_architectures(archs)
    if (folder / "modules.json").is_file():
        _check_task(folder, task, "embed", "modules.json (a sentence-transformers folder)")
        return "sentence-transformers"
    if arch_task not in (None, task) and not (task == "embed" and arch_task is None):
        _check_task(folder, task, arch_task, f"architecture {archs[0]}")
    return "transformers"


def _task_of_architectures(archs: list[str]) -> str | None:
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return "classify"
        if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            return "generate"
    return None


def _check_task(folder: Path, task: str, found: str | None, source: str) -> None:
    if found != task:
        raise BadRequest(
            f"wrong task for {folder}: --task {task} was given but {source} says {found!r}",
            code="wrong_task",
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"{path} must hold a JSON object")
    return data
