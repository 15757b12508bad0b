"""Wait until a moorage server is ready, then ask each demo model once (stdlib only)."""

import json
import sys
import time
import urllib.error
import urllib.request

url, log = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else ""


def call(path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


deadline = time.time() + 300
while True:
    try:
        ready = call("/readyz")
        break
    except (urllib.error.URLError, ConnectionError, OSError):
        if time.time() > deadline:
            sys.exit(f"the server did not become ready in 300 s; see {log}")
        time.sleep(0.5)
print(f"server ready on {url}: {ready['models']}")
emb = call("/v1/embeddings", {"model": "minilm", "input": "The capital of France is Paris."})
print(f"POST /v1/embeddings -> {len(emb['data'][0]['embedding'])} dimensions, {emb['usage']['prompt_tokens']} tokens")
chat = call(
    "/v1/chat/completions",
    {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
    },
)
print(f"POST /v1/chat/completions -> {chat['choices'][0]['message']['content']!r} ({chat['usage']})")
