"""The architecture's import rules, checked on the source (see shared/ARCHITECTURE.md)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "moorage"
EDGES = {"server", "streams", "cli", "engines", "demo"}
ALL = EDGES | {"config", "errors", "refs", "registry", "runtime", "batching", "security", "training", "observability"}


def _imports(path: Path) -> set[str]:
    """Top-level moorage subpackages/modules a file imports (relative or absolute)."""
    rel_parts = path.relative_to(PKG).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel_parts[: len(rel_parts) - node.level]
                target = list(base) + (node.module.split(".") if node.module else [])
                if not target and node.module is None:
                    target = [a.name for a in node.names]
                if target:
                    found.add(target[0])
            elif node.module and node.module.startswith("moorage."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("moorage.")}
    return found


def _files(sub: str):
    target = PKG / sub
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("runtime", EDGES),
        ("batching", EDGES),
        ("registry", {"server", "cli", "runtime", "streams", "engines", "demo"}),
        # The leaves: errors.py imports nothing of ours; config.py and refs.py only errors.py.
        ("errors.py", ALL - {"errors"}),
        ("config.py", ALL - {"errors"}),
        ("refs.py", ALL - {"errors"}),
    ],
)
def test_layers_do_not_import_upwards(layer, forbidden):
    if not (PKG / layer).exists():
        pytest.skip(f"{layer} does not exist yet")
    for path in _files(layer):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"
