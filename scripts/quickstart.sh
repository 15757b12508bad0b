#!/usr/bin/env bash
# README command 1: install, register the demo models on embedded defaults (SQLite catalog, local
# artifact store under ~/.moorage or $MOORAGE_HOME), use them once, then serve them on 127.0.0.1
# (port 8000 or $MOORAGE_SERVE__PORT) in the background and ask the server once over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh demo
export HF_HUB_OFFLINE=1
.venv/bin/moorage demo

home="${MOORAGE_HOME:-$HOME/.moorage}"
port="${MOORAGE_SERVE__PORT:-8000}"
pidfile="$home/serve.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "stopping the server a previous quickstart started (pid $(cat "$pidfile"))"
  kill "$(cat "$pidfile")"
  for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.2; done
fi
# The server requires an API key (security.auth): a fresh invoker key for this quickstart.
keyfile="$home/quickstart.key"
(umask 077; .venv/bin/moorage keys create --role invoker --name quickstart --expires 30d -q >"$keyfile")
nohup .venv/bin/moorage serve -m minilm@production -m smollm2@production --port "$port" \
  >"$home/serve.log" 2>&1 </dev/null &
echo $! >"$pidfile"
.venv/bin/python scripts/ask_server.py "http://127.0.0.1:$port" "$home/serve.log" "$(cat "$keyfile")"
cat <<MSG

The server keeps running on http://127.0.0.1:$port (pid $(cat "$pidfile"), log $home/serve.log).
Its API key (invoker role) is in $keyfile:
  KEY=\$(cat $keyfile)
  curl -s 127.0.0.1:$port/v1/embeddings -H "authorization: Bearer \$KEY" -H 'content-type: application/json' \\
       -d '{"model": "minilm", "input": "hello"}'
  curl -sN 127.0.0.1:$port/v1/chat/completions -H "authorization: Bearer \$KEY" -H 'content-type: application/json' \\
       -d '{"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "Hi!"}]}'
Any OpenAI client works with base_url http://127.0.0.1:$port/v1 and api_key=\$KEY. Stop it: kill \$(cat $pidfile)
MSG
