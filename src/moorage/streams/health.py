"""Whether a stream worker is making progress, and the endpoint that says so.

A worker is unhealthy while an operation it depends on keeps failing: a receive or an ack on a
broker that is down, a sink write while the database is away. It reports that as a problem
(``receive: BrokerUnavailable: ...``) the moment a retry is needed a second time, and clears it on
the first success. `serve_health` answers ``/healthz`` (200, or 503 with the problems) and
``/metrics`` (Prometheus, where ``moorage_stream_healthy`` is 0 while any problem stands).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..observability import metrics


class Health:
    """The problems a worker has right now; empty while it makes progress."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        self._problems: dict[str, tuple[str, float]] = {}  # operation -> (error, since)
        self._lock = threading.Lock()

    def watch(self, source: str) -> None:
        """Report for this source (the worker's ``scheme:topic``, the label of its other metrics)."""
        self.source = source
        self._gauge().set(0 if self._problems else 1)

    def _gauge(self):
        return metrics.STREAM_HEALTHY.labels(self.source)

    def failing(self, operation: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        with self._lock:
            since = self._problems.get(operation, (error, time.time()))[1]
            self._problems[operation] = (error, since)
        self._gauge().set(0)

    def recovered(self, operation: str) -> None:
        with self._lock:
            self._problems.pop(operation, None)
            healthy = not self._problems
        if healthy:
            self._gauge().set(1)

    @property
    def is_healthy(self) -> bool:
        return not self._problems

    def report(self) -> dict:
        with self._lock:
            problems = {op: {"error": err, "since": since} for op, (err, since) in self._problems.items()}
        return {"status": "unhealthy" if problems else "ok", "source": self.source, "problems": problems}


def serve_health(port: int, health: Health, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """``/healthz`` and ``/metrics`` on HOST:PORT from a daemon thread; `shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] in ("/healthz", "/health"):
                report = health.report()
                body, kind = json.dumps(report).encode(), "application/json"
                status = 200 if report["status"] == "ok" else 503
            else:
                body, kind = metrics.render()
                status = 200
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="moorage-stream-health", daemon=True).start()
    return server
