#!/usr/bin/env bash
# The checks CI runs before the tests (scripts/test.sh), and a developer runs before committing:
# formatting, lint, types and the import contracts of the architecture. Needs the test extra:
# bash scripts/install.sh all,test
set -euo pipefail
cd "$(dirname "$0")/.."

paths=(src tests bench scripts)
echo "ruff format --check"
.venv/bin/ruff format --check "${paths[@]}"
echo "ruff check"
.venv/bin/ruff check "${paths[@]}"
echo "mypy src"
.venv/bin/mypy src
echo "lint-imports"
.venv/bin/lint-imports
