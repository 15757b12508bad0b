#!/usr/bin/env bash
# The checks CI runs before the tests (scripts/test.sh), and a developer runs before committing:
# formatting, lint, types and the import contracts of the architecture (pyproject.toml). Every check
# runs, so one run shows every problem; the exit status is 1 if any failed. Needs the test extra:
# bash scripts/install.sh all,test
set -euo pipefail
cd "$(dirname "$0")/.."

paths=(src tests bench scripts)
failed=()
check() {
    local name="$1"
    shift
    echo "== $name"
    "$@" || failed+=("$name")
}
check "ruff format" .venv/bin/ruff format --check "${paths[@]}"
check "ruff check" .venv/bin/ruff check "${paths[@]}"
check "mypy" .venv/bin/mypy src
check "import contracts" .venv/bin/lint-imports --no-logo

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all checks passed"
