"""The image's health check: exit 0 when URL answers 2xx within the timeout, else 1 with one line why.

    moorage-healthcheck                                   # the server: /healthz on serve.port
    moorage-healthcheck http://127.0.0.1:9400/healthz     # a stream worker's --metrics-port

The slim image has no curl; this needs only the standard library. Without a URL it asks the server
in this container: ``/healthz`` (it answers while models load) on ``MOORAGE_SERVE__PORT`` (8000),
over HTTPS, unverified (it is the container's own listener), when ``MOORAGE_SERVE__SSL_CERTFILE`` is set.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def default_url(environ: dict[str, str]) -> str:
    port = environ.get("MOORAGE_SERVE__PORT") or "8000"
    scheme = "https" if environ.get("MOORAGE_SERVE__SSL_CERTFILE") else "http"
    return f"{scheme}://127.0.0.1:{port}/healthz"


def check(url: str) -> str | None:
    """None when healthy, else why not."""
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323 - own listener
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:  # noqa: S310
            return None if 200 <= response.status < 300 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {getattr(exc, 'reason', None) or exc}"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url(dict(os.environ))
    problem = check(url)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
