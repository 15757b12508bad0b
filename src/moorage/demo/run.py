"""`moorage demo`: register the demo models with `production` aliases, then use them once."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.table import Table

from ..config import Settings
from ..errors import ModelNotFound
from ..registry import NoProgress, Progress, Registry, VersionInfo
from ..runtime import GenerateInput, GenerationParams, Runtime
from ..training.datasets import Datasets, DatasetVersion
from . import assets

DEMO_MODELS = (
    # name, task, package
    ("minilm", "embed", assets.MINILM_PACKAGE),
    ("smollm2", "generate", assets.SMOLLM2_PACKAGE),
)


def ensure_registered(
    registry: Registry,
    name: str,
    task: str,
    package: str,
    folder_fn: Callable[[], Path],
    progress: Progress | None = None,
) -> tuple[VersionInfo, bool]:
    """Register the demo model once per package version; later runs reuse that version."""
    source = f"{package}=={assets.package_version(package)}"
    try:
        for info in reversed(registry.list_versions(name)):
            if info.status == "ready" and info.tags.get("source") == source:
                if "production" not in info.aliases:
                    registry.set_alias(name, "production", info.version, "demo")
                return info, False
    except ModelNotFound:
        pass
    info = registry.register(
        folder_fn(),
        name,
        task,
        alias="production",
        tags={"source": source},
        description=f"demo model from the PyPI package {package}",
        reason="demo",
        progress=progress,
    )
    return info, True


class DemoState(Protocol):
    """What the demo needs from its caller (the CLI's state): settings and the registry."""

    @property
    def settings(self) -> Settings: ...

    @property
    def registry(self) -> Registry: ...


def _no_progress() -> AbstractContextManager[Progress]:
    return nullcontext(NoProgress())


def run_demo(
    state: DemoState,
    progress_bar: Callable[[], AbstractContextManager[Progress]] = _no_progress,
    console: Console | None = None,
) -> None:
    """Register the demo models and use each once. The caller draws: `progress_bar` makes the bar
    shown while the models are registered (the CLI passes its rich one), `console` prints the rest."""
    console = console or Console()
    settings, registry = state.settings, state.registry
    folders = {
        "minilm": assets.minilm_folder,
        "smollm2": lambda: assets.smollm2_folder(settings.cache_dir),
    }
    table = Table("model", "task", "version", "aliases", "status")
    with progress_bar() as progress:
        for name, task, package in DEMO_MODELS:
            info, created = ensure_registered(registry, name, task, package, folders[name], progress)
            table.add_row(name, task, str(info.version), "production", "registered" if created else "already there")
    console.print(table)
    path, _, count = assets.write_bbc_news(settings.home / "datasets")
    dataset, created = Datasets.from_registry(registry).ensure("bbc-news", path, description="demo: BBC News")
    console.print(
        f"dataset {dataset.ref}: {count} labelled articles in {path}, {dataset.stats['rows']} once duplicates are "
        f"removed, split {_split_sizes(dataset)} ({'registered' if created else 'already there'})"
    )

    runtime = Runtime(registry, settings.runtime)
    vector = runtime.predict("minilm", ["moorage puts language models into production"])[0]
    console.print(f"minilm@production embeds a sentence into {len(vector)} dimensions")
    params = GenerationParams(max_new_tokens=24)
    reply = runtime.predict(
        "smollm2",
        [GenerateInput(messages=({"role": "user", "content": "What is the capital of France?"},), params=params)],
    )[0]
    console.print(f"smollm2@production answers 'What is the capital of France?' with: {reply.text!r}")
    console.print(f"registry home: {settings.home}  (try: moorage models list)")


def _split_sizes(dataset: DatasetVersion) -> str:
    return " / ".join(f"{info.name} {info.rows}" for info in dataset.splits.values())
