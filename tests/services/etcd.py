"""A real etcd on 127.0.0.1 for the tests and benchmarks of the config center's etcd backend.

Debian's ``etcd-server`` (3.4, /usr/bin/etcd; scripts/test.sh installs it) with a throw-away data
folder, on free ports, in its own process group; stopped by pid when the block ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.services.servers import _stop, free_port, need, wait_port

ETCD = "/usr/bin/etcd"


@contextmanager
def etcd_server():
    """Yields the client URL (``http://127.0.0.1:PORT``) of a fresh single-member etcd."""
    program = need(ETCD)
    root = Path(tempfile.mkdtemp(prefix="moorage-etcd-"))
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    args = [program, "--name", "test", "--data-dir", str(root / "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}", "--logger", "zap", "--log-outputs", "stderr"]  # fmt: skip
    log = root / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(client, 30, proc, log)
        _wait_healthy(client_url, proc, log)
        yield client_url
    finally:
        _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Listening is not serving: wait until the member has elected itself (``/health`` says true)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("health") == "true":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"etcd at {url} did not become healthy\n{log.read_text(errors='replace')[-2000:]}")
