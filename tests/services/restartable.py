"""Real servers that a fault test can stop and start again on the same port with the same data.

Each is a context manager yielding a `Service`: `url`, `stop(kill=False)` (SIGTERM, or SIGKILL for a
crash), `start()` (same port, same data directory: durable queues and tables survive), `running`.
Everything started is stopped on exit, by pid; RabbitMQ's epmd is stopped once the node is gone.
"""

from __future__ import annotations

import glob
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.services.servers import RABBITMQ_SERVER, _stop, free_port, need, wait_port


class Service:
    def __init__(self, url: str, start: Callable[[], subprocess.Popen | None], stop: Callable[[bool], None]) -> None:
        self.url = url
        self._start, self._stop = start, stop
        self.running = False
        self.start()

    def start(self) -> None:
        if not self.running:
            self._start()
            self.running = True

    def stop(self, kill: bool = False) -> None:
        if self.running:
            self._stop(kill)
            self.running = False


def _kill_group(proc: subprocess.Popen, kill: bool, timeout: float) -> None:
    if kill:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    else:
        _stop(proc, timeout)


@contextmanager
def redis_service() -> Iterator[Service]:
    """Redis with append-only persistence, so a restart keeps the stream and its pending entries."""
    program = need("redis-server")
    root = Path(tempfile.mkdtemp(prefix="moorage-redis-"))
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start() -> None:
        args = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--dir", str(root), "--logfile", str(root / "log")]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        wait_port(port, 15, proc, root / "log")

    def stop(kill: bool) -> None:
        _kill_group(procs[-1], kill, 10)

    service = Service(f"redis://127.0.0.1:{port}/0", start, stop)
    try:
        yield service
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def rabbitmq_service() -> Iterator[Service]:
    program = need(RABBITMQ_SERVER)
    root = Path(tempfile.mkdtemp(prefix="moorage-rabbitmq-"))
    port, dist, epmd = free_port(), free_port(), free_port()
    (root / "enabled_plugins").write_text("[].\n")
    (root / "rabbitmq.conf").write_text("loopback_users = none\n")
    env = {
        **os.environ,
        "HOME": str(root),  # the Erlang cookie goes here, not into the user's home
        "RABBITMQ_NODENAME": f"moorage{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist),
        "ERL_EPMD_PORT": str(epmd),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    procs: list[subprocess.Popen] = []

    def start() -> None:
        out = root / f"out{len(procs)}.log"
        with open(out, "wb") as log:
            proc = subprocess.Popen([program], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        wait_port(port, 60, proc, out)

    def stop(kill: bool) -> None:
        _kill_group(procs[-1], kill, 20)

    service = Service(f"amqp://guest:guest@127.0.0.1:{port}/", start, stop)
    try:
        yield service
    finally:
        service.stop()
        subprocess.run([need("epmd"), "-kill"], env=env, capture_output=True, timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run scripts/test.sh (it installs postgresql)")
    return str(found[-1])


@contextmanager
def postgres_service(database: str = "moorage") -> Iterator[Service]:
    """A throw-away PostgreSQL cluster with one database; `url` names that database."""
    root = Path(tempfile.mkdtemp(prefix="moorage-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chown(sock, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "moorage", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)  # fmt: skip
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    ctl = [*as_user, _pg_bin("pg_ctl"), "-D", str(data)]

    def start() -> None:
        subprocess.run([*ctl, "-o", opts, "-l", str(root / "log"), "-w", "start"], check=True, capture_output=True)

    def stop(kill: bool) -> None:
        subprocess.run([*ctl, "-m", "immediate" if kill else "fast", "-w", "stop"], capture_output=True)

    service = Service(f"postgresql://moorage@127.0.0.1:{port}/{database}", start, stop)
    try:
        import psycopg

        with psycopg.connect(f"postgresql://moorage@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield service
    finally:
        service.stop(kill=True)
        shutil.rmtree(root, ignore_errors=True)


MOCK_ANSWER_S = 30.0
_KAFKA_MOCK = r"""
import ctypes, glob, os, sys
import confluent_kafka
libs = os.path.join(os.path.dirname(confluent_kafka.__file__), os.pardir, "confluent_kafka.libs")
rd = ctypes.CDLL(sorted(glob.glob(os.path.join(libs, "librdkafka*.so*")))[0])
rd.rd_kafka_conf_new.restype = ctypes.c_void_p
rd.rd_kafka_new.restype = ctypes.c_void_p
rd.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
rd.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
rd.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
rd.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
rd.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
for name in ("rd_kafka_mock_broker_set_down", "rd_kafka_mock_broker_set_up"):
    getattr(rd, name).argtypes = [ctypes.c_void_p, ctypes.c_int32]
errstr = ctypes.create_string_buffer(512)
rk = rd.rd_kafka_new(0, rd.rd_kafka_conf_new(), errstr, 512)  # a producer handle owns the cluster
cluster = rd.rd_kafka_mock_cluster_new(rk, 1)
print("bootstrap=" + rd.rd_kafka_mock_cluster_bootstraps(cluster).decode(), flush=True)
for line in sys.stdin:  # "down": drop every connection and refuse new ones; "up": accept again
    fn = rd.rd_kafka_mock_broker_set_down if line.strip() == "down" else rd.rd_kafka_mock_broker_set_up
    print("err=%d" % fn(cluster, 1), flush=True)
"""


@contextmanager
def kafka_service() -> Iterator[Service]:
    """librdkafka's mock cluster (one broker, in a child process). It cannot restart, but `stop()`
    takes its broker down (every connection dropped, new ones refused) and `start()` brings it up
    again with the same topics, offsets and address: a connection loss, as a network cut makes it."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KAFKA_MOCK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def command(word: str) -> None:  # bounded: a mock that stops answering fails the test, never hangs it
        stdin.write(word + "\n")
        stdin.flush()
        ready, _, _ = select.select([stdout], [], [], MOCK_ANSWER_S)
        answer = stdout.readline().strip() if ready else f"no answer within {MOCK_ANSWER_S:.0f} s"
        if answer != "err=0":
            raise RuntimeError(f"the Kafka mock did not take {word!r}: {answer!r}")

    try:
        line = stdout.readline().strip()
        if not line.startswith("bootstrap="):
            raise RuntimeError(f"the Kafka mock cluster did not start: {line!r}")
        first = [True]

        def start() -> None:  # the cluster is up from the start: only a later start() has work to do
            if not first[0]:
                command("up")
            first[0] = False

        yield Service(f"kafka://{line.split('=', 1)[1]}", start, lambda kill: command("down"))
    finally:
        _stop(proc)
