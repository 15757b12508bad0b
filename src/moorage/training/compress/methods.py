"""The contract between the compression pipeline and its methods.

A method turns a parent version's local folder into a derived model folder and says what it did
(the precision of the result and every parameter it used, defaults included). It knows nothing of
reports, gates or the registry: the pipeline loads both folders through the runtime, measures
them against each other, and registers the result only when the gates pass."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import BadRequest

if TYPE_CHECKING:
    from ...config import Settings
    from ...registry import VersionInfo


@dataclass
class BuildContext:
    """What a method is given to build one derived model."""

    parent: VersionInfo  # the parent version (registry)
    parent_dir: Path  # a local plaintext copy of its files (decrypted if encrypted)
    out_dir: Path  # empty folder to write the derived model into
    params: dict[str, Any]  # user parameters (strings from the CLI already parsed)
    settings: Settings
    progress: Callable[[int, int, str], None] | None = None  # (done, total, what)

    def report(self, done: int, total: int, what: str) -> None:
        """Tell the caller how far the build is (nothing when nobody listens)."""
        if self.progress is not None:
            self.progress(done, total, what)


@dataclass
class BuildResult:
    """What a method made: recorded in the derived version's manifest in full."""

    precision: str  # "fp32", "int8", ...
    parameters: dict[str, Any]  # every parameter actually used, defaults included
    notes: list[str] = field(default_factory=list)


class Method(Protocol):
    name: str
    tasks: tuple[str, ...]  # tasks it supports; another task -> BadRequest code "unsupported_method"

    def build(self, ctx: BuildContext) -> BuildResult: ...


# name -> "module:Class", imported only when the method is used (its heavy dependencies with it).
METHODS: dict[str, str] = {
    "onnx": "moorage.training.compress.export:OnnxExport",
    "onnx-int8": "moorage.training.compress.quantize:OnnxInt8",
    "prune-heads": "moorage.training.compress.prune:PruneHeads",
    "distill": "moorage.training.compress.distill:Distill",
    "lm-int8": "moorage.training.compress.lm:LmInt8",
}


def method(name: str) -> Method:
    """The method called `name`; an unknown one is a 400 ``unknown_method`` listing the known names."""
    target = METHODS.get(name)
    if target is None:
        raise BadRequest(
            f"unknown compression method {name!r}; one of {', '.join(sorted(METHODS))}", code="unknown_method"
        )
    module, attr = target.split(":")
    made: Method = getattr(importlib.import_module(module), attr)()
    return made


def check_task(found: Method, task: str, ref: str) -> None:
    """Refuse a parent whose task the method does not compress: 400 ``unsupported_method``."""
    if task not in found.tasks:
        raise BadRequest(
            f"method {found.name!r} compresses {' and '.join(found.tasks)} models; {ref} is a {task} model",
            code="unsupported_method",
        )
