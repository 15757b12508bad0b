"""Real broker servers on 127.0.0.1 for the tests and benchmarks, started and stopped by them.

Redis and RabbitMQ come from Debian's packages (scripts/test.sh installs them); the Kafka-protocol
broker is librdkafka's mock cluster (kafka_mock.py). Each is a context manager yielding the URL
prefix clients use; each stops what it started, its epmd included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"server did not listen on 127.0.0.1:{port} within {timeout}s\n{tail}")


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def need(program: str) -> str:
    path = shutil.which(program) or (program if os.path.exists(program) else None)
    if path is None:
        raise RuntimeError(f"{program} is not installed: run scripts/test.sh (it installs the test services)")
    return path


@contextmanager
def redis_server():
    program = need("redis-server")  # before anything is made that would need cleaning up
    root = Path(tempfile.mkdtemp(prefix="moorage-redis-"))
    port = free_port()
    args = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(root), "--logfile", str(root / "log")]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, 15, proc, root / "log")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def rabbitmq_server():
    from tests.services.restartable import rabbitmq_service  # it builds on this module's helpers

    with rabbitmq_service() as service:
        yield service.url


@contextmanager
def kafka_mock():
    script = Path(__file__).with_name("kafka_mock.py")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("bootstrap="):
            raise RuntimeError(f"the Kafka mock cluster did not start: {line!r}")
        yield f"kafka://{line.split('=', 1)[1]}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _stop(proc)
