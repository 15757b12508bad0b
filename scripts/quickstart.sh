#!/usr/bin/env bash
# README command 1: install, then register the demo models on embedded defaults (SQLite catalog,
# local artifact store under ~/.moorage or $MOORAGE_HOME) and use them once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh demo
export HF_HUB_OFFLINE=1
.venv/bin/moorage demo
