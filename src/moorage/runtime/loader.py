"""Registry version -> loaded task handler, verified and cached."""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RuntimeSettings
from ..errors import BadRequest, ModelLoadFailed, MoorageError
from ..refs import ModelRef
from ..registry import Progress, Registry, VersionInfo
from ..registry.artifacts import checked_format, structure_problem
from ..registry.crypto import MemoryFolder
from ..registry.manifest import check_safe
from .base import TaskHandler
from .cache import ModelCache

log = logging.getLogger(__name__)

# (task, framework) -> "module:Class", imported only when such a model is loaded.
HANDLERS: dict[tuple[str, str], str] = {
    ("embed", "fake"): "moorage.runtime.fake:FakeEmbedder",
    ("classify", "fake"): "moorage.runtime.fake:FakeClassifier",
    ("generate", "fake"): "moorage.runtime.fake:FakeGenerator",
    ("embed", "sentence-transformers"): "moorage.runtime.hf:SentenceEmbedder",
    ("embed", "transformers"): "moorage.runtime.hf:SentenceEmbedder",
    ("classify", "transformers"): "moorage.runtime.hf:SequenceClassifier",
    ("generate", "transformers"): "moorage.runtime.hf:CausalGenerator",
    ("embed", "onnx"): "moorage.runtime.onnx:OnnxEmbedder",
    ("classify", "onnx"): "moorage.runtime.onnx:OnnxClassifier",
}


@dataclass
class LoadedModel:
    info: VersionInfo
    handler: TaskHandler
    load_seconds: float

    @property
    def task(self) -> str:
        return self.info.task

    def predict(self, inputs: list[Any]) -> list[Any]:
        return self.handler(inputs)


def handler_for(task: str, framework: str) -> TaskHandler:
    target = HANDLERS.get((task, framework))
    if target is None:
        raise BadRequest(f"no handler for task {task!r} with framework {framework!r}", code="unsupported_model")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)()


def load_version(
    registry: Registry, info: VersionInfo, settings: RuntimeSettings, progress: Progress | None = None
) -> LoadedModel:
    """Fetch (if remote), verify every checksum and safetensors header, then load. Nothing unverified
    reaches a handler; a handler that fails is a `ModelLoadFailed` (422) naming the version, its
    traceback in the log only."""
    started = time.perf_counter()
    check_safe([f.path for f in info.manifest.files])
    folder = registry.local_path(info, progress)
    handler = handler_for(info.task, info.framework)
    try:
        if info.manifest.encryption:
            with MemoryFolder(registry.read_plaintext(info, folder)) as plain:  # plaintext only in memory
                _check_headers(plain, info)
                handler.load(plain, info.manifest, settings)
        else:
            _check_headers(folder, info)
            handler.load(folder, info.manifest, settings)
    except MoorageError:
        raise
    except Exception as exc:
        log.error("could not load %s", info.ref, exc_info=True)
        raise ModelLoadFailed(
            f"cannot load {info.ref}: its {info.framework} handler failed ({type(exc).__name__}; the server "
            f"log has the details); serve another version, e.g. `moorage models rollback {info.name} ALIAS`"
        ) from exc
    elapsed = time.perf_counter() - started
    log.info("loaded %s (%s, %s) in %.2fs", info.ref, info.task, info.framework, elapsed)
    return LoadedModel(info, handler, elapsed)


def _check_headers(folder: Path, info: VersionInfo) -> None:
    """Versions registered before headers were checked at registration (and encrypted ones, whose
    plaintext only exists now) are checked here, cheaply: safetensors headers, ONNX structure."""
    for entry in info.manifest.files:
        kind = checked_format(entry.path)
        if kind is None:
            continue
        path = folder / entry.path
        with open(path, "rb") as f:
            problem = structure_problem(entry.path, f, os.fstat(f.fileno()).st_size)
        if problem is not None:
            raise ModelLoadFailed(f"cannot load {info.ref}: {entry.path} is not a valid {kind} file ({problem})")


class Runtime:
    """Resolves references and keeps loaded models in a memory-bounded LRU cache."""

    def __init__(self, registry: Registry, settings: RuntimeSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.cache: ModelCache[LoadedModel] = ModelCache(settings.max_loaded_bytes, lambda m: m.handler.memory_bytes)

    def get(self, ref: str | ModelRef, progress: Progress | None = None) -> LoadedModel:
        return self.load(self.registry.resolve(ref), progress)

    def load(self, info: VersionInfo, progress: Progress | None = None) -> LoadedModel:
        return self.cache.get_or_load(
            (info.name, info.version), lambda: load_version(self.registry, info, self.settings, progress)
        )

    def unload(self, name: str, version: int) -> None:
        self.cache.pop((name, version))

    def predict(self, ref: str | ModelRef, inputs: list[Any]) -> list[Any]:
        return self.get(ref).predict(inputs)
