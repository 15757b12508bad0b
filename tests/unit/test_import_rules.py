"""The architecture's import rules (shared/ARCHITECTURE.md) are import-linter contracts in
pyproject.toml, which scripts/check.sh runs. These tests keep the contracts honest: they hold on the
source, every top-level package is named in them, and each contract breaks when the import it
forbids is planted in a copy of the source tree."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "moorage"
CONFIG = ROOT / "pyproject.toml"
CONTRACTS = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]["contracts"]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter comes with the test extra")


def _lint_imports(src: Path, *contract_ids: str) -> subprocess.CompletedProcess[str]:
    """Run the contracts on the `moorage` package found under `src`."""
    selected = [arg for cid in contract_ids for arg in ("--contract", cid)]
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "200"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *selected, str(CONFIG)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _top_level() -> set[str]:
    """moorage's top-level packages and modules, by their dotted names."""
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    return {f"moorage.{name}" for name in packages | modules}


def test_the_contracts_hold():
    result = _lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_top_level_package_is_named_in_a_contract():
    named = set()
    for contract in CONTRACTS:
        for key in ("source_modules", "forbidden_modules", "modules", "layers"):
            for entry in contract.get(key, []):
                named |= {m.strip() for m in entry.replace(":", "|").split("|")}
    missing = sorted(_top_level() - named)
    assert not missing, f"add {missing} to the import contracts in pyproject.toml (an edge, or a layer below them)"


@pytest.mark.parametrize("contract_id", ["leaves", "errors"])
def test_the_leaves_may_import_no_other_package(contract_id):
    (contract,) = [c for c in CONTRACTS if c["id"] == contract_id]
    missing = sorted(_top_level() - {"moorage.errors"} - set(contract["forbidden_modules"]))
    assert not missing, f"add {missing} to the forbidden_modules of contract {contract_id!r} in pyproject.toml"


@pytest.mark.parametrize(
    ("contract_id", "path", "planted"),
    [
        ("acyclic", "streams/producer.py", "import moorage.server"),  # server imports streams
        ("acyclic", "demo/run.py", "import moorage.cli.context"),  # the CLI runs the demo
        ("acyclic", "registry/manifest.py", "import moorage.registry.service"),  # service imports manifest
        ("edges", "runtime/cache.py", "import moorage.cli.context"),
        ("edges", "batching/__init__.py", "import moorage.server.errors"),
        ("edges", "registry/store.py", "import moorage.demo.assets"),
        ("engine-runtime-registry", "registry/store.py", "import moorage.runtime"),
        ("engine-runtime-registry", "runtime/cache.py", "import moorage.batching"),
        ("runtime-security", "runtime/loader.py", "import moorage.security.keys"),
        ("registry-security", "registry/manifest.py", "import moorage.security.policy"),
        ("registry-security", "security/keys.py", "import moorage.registry.manifest"),
        ("leaves", "config.py", "import moorage.observability.metrics"),
        ("leaves", "refs.py", "import moorage.config"),
        ("leaves", "db/base.py", "import moorage.registry.tables"),
        ("errors", "errors.py", "import moorage.refs"),
    ],
)
def test_a_planted_import_breaks_its_contract(tmp_path, contract_id, path, planted):
    src = tmp_path / "src"
    shutil.copytree(PKG, src / "moorage", ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "moorage" / path, "a") as f:
        f.write(f"\n{planted}  # noqa\n")
    result = _lint_imports(src, contract_id)
    assert result.returncode == 1, result.stdout + result.stderr
    # the report names the planted import (the whole chain, or the packages it joins in a cycle)
    names = planted.split()[-1].split(".")[1:]
    arrows = [line for line in result.stdout.splitlines() if "->" in line]
    assert any(name in line for line in arrows for name in names), result.stdout
