"""Security overhead: the same server with the security edge off and on, side by side.

    python bench/security.py [--home DIR] [--seconds 8] [--out bench/results/security.json]

MiniLM embeddings over HTTP (one sentence per request, 1 and 16 clients), served by `moorage serve`
in two configurations started one after the other on 127.0.0.1:
  (off) security.auth=false, security.audit=false: no key check, no audit rows
  (on)  API key with a rate limit, content filter (deny list + e-mail/phone masking) and the
        hash-chained audit of every call (rows batched every security.audit_flush_ms)
Prints throughput, p50/p99 latency and the on/off ratios; then verifies the audit chain holds one
row per request that was sent to the secured server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, http_embed, sentences, start, wait_ready  # noqa: E402

from moorage.config import load_settings  # noqa: E402
from moorage.demo import assets  # noqa: E402
from moorage.demo.run import DEMO_MODELS, ensure_registered  # noqa: E402
from moorage.registry import Registry  # noqa: E402
from moorage.security.audit import AuditLog  # noqa: E402
from moorage.security.keys import KeyStore  # noqa: E402

FILTERS = {"minilm": {"input_deny": ["re:\\b(ssn|passport)\\s*\\d+"], "mask_email": True, "mask_phone": True}}


def measure(name: str, env: dict, texts: list[str], seconds: float, key: str) -> dict:
    port = free_port()
    server = start([sys.executable, "-m", "moorage", "serve", "-m", "minilm", "--port", str(port)], env)
    try:
        wait_ready(port, "/readyz", server)
        out = {}
        for clients in (1, 16):
            r = http_embed(port, "minilm", texts, clients, seconds, key)
            out[f"c{clients}"] = r
            latency = f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
            print(f"  {name:4s} {clients:2d} clients  {r['throughput_rps']:8.1f} req/s  {latency}")
        return out
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOORAGE_HOME", str(Path.home() / ".moorage")))
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load phase")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "security.json"))
    args = parser.parse_args()
    base = {**os.environ, "MOORAGE_HOME": args.home, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    settings = load_settings(environ=base)
    registry = Registry.from_settings(settings)
    name, task, package = next(m for m in DEMO_MODELS if m[0] == "minilm")
    ensure_registered(registry, name, task, package, assets.minilm_folder)
    texts = sentences()
    key = KeyStore(registry.catalog).create("invoker", name="bench-security", requests_per_minute=10**7)[1]
    audit = AuditLog(registry.catalog)
    before = audit.verify()[0]

    off_env = base | {"MOORAGE_SECURITY__AUTH": "false", "MOORAGE_SECURITY__AUDIT": "false"}
    on_env = base | {"MOORAGE_SECURITY__FILTERS": json.dumps(FILTERS)}
    print("MiniLM embeddings over HTTP, security edge off and on")
    results = {
        "off": measure("off", off_env, texts, args.seconds, ""),
        "on": measure("on", on_env, texts, args.seconds, key),
    }
    count, problems = audit.verify()
    sent = sum(sum(r["statuses"].values()) + r.get("warmup_requests", 0) for r in results["on"].values())
    ratios = {
        f"on_over_off_c{c}": round(
            results["on"][f"c{c}"]["throughput_rps"] / results["off"][f"c{c}"]["throughput_rps"], 3
        )
        for c in (1, 16)
    }
    results["ratios"] = ratios
    results["audit"] = {"rows_added": count - before, "requests_sent": sent, "chain_problems": problems}
    print("ratios (throughput, secured / open):", ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print(f"audit: {count - before} rows added for {sent} requests sent (warm-up included), problems: {len(problems)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    registry.close()


if __name__ == "__main__":
    main()
