#!/usr/bin/env bash
# README command 2: install the services the tests start (PostgreSQL from Debian's packages) and
# every extra, then run the whole test suite. Extra pytest arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need_pkgs+=(postgresql)
command -v runuser > /dev/null || need_pkgs+=(util-linux)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" > /dev/null
fi

bash scripts/install.sh "all,test"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
