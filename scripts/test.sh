#!/usr/bin/env bash
# README command 2: install the services the tests start (PostgreSQL, Redis, RabbitMQ, Prometheus,
# Chromium and Java for Spark from Debian's packages; the Kafka-protocol broker comes with
# confluent-kafka) and every extra, run the checks (scripts/check.sh: ruff, mypy, import contracts),
# then run the whole test suite. Extra pytest arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need_pkgs+=(postgresql)
command -v runuser > /dev/null || need_pkgs+=(util-linux)
command -v redis-server > /dev/null || need_pkgs+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_pkgs+=(rabbitmq-server)
command -v promtool > /dev/null || need_pkgs+=(prometheus)  # the alert rules' tests and a real scraper
command -v chromium > /dev/null || need_pkgs+=(chromium fonts-dejavu-core)  # pages a person looks at (the report)
command -v java > /dev/null || need_pkgs+=(openjdk-17-jre-headless)  # PySpark's JVM (the Spark jobs)
command -v etcd > /dev/null || need_pkgs+=(etcd-server)  # the config center's etcd backend
if [ ${#need_pkgs[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    # policy-rc.d 101: install the servers without starting them; the tests start their own on 127.0.0.1
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d > /dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" > /dev/null
    [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
    $SUDO pkill -x epmd 2> /dev/null || true  # a package script may have left Erlang's port mapper running
fi

bash scripts/install.sh "all,test"
bash scripts/check.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
