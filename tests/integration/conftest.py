"""Real services for integration tests, started on 127.0.0.1 by the test run and stopped after.

PostgreSQL comes from Debian's package (scripts/test.sh installs it); the S3 endpoint is moto's
standalone server, which speaks the S3 HTTP protocol to s3fs/botocore like any S3-compatible store.
"""

from __future__ import annotations

import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL cluster; yields an admin URL without a database name."""
    from tests.services.restartable import postgres_service

    with postgres_service() as service:
        yield service.url.rsplit("/", 1)[0]


@pytest.fixture
def pg_url(postgres_server):
    """A fresh database per test."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_server}/{name}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server):
    """A fresh bucket: (store URL, fsspec storage options)."""
    import boto3

    options = {
        "key": "test",
        "secret": "test",
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
    }
    bucket = "b-" + uuid.uuid4().hex[:12]
    boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models", options


@pytest.fixture(scope="session")
def etcd_url():
    """A real etcd (Debian's etcd-server) for the session; each test takes its own key prefix."""
    from tests.services.etcd import etcd_server

    with etcd_server() as url:
        yield url


# -- brokers: one real server per test session, a fresh topic per test ---------------------------
@pytest.fixture(scope="session")
def redis_base():
    from tests.services.servers import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def rabbitmq_base():
    from tests.services.servers import rabbitmq_server

    with rabbitmq_server() as url:
        yield url


@pytest.fixture(scope="session")
def kafka_base():
    from tests.services.servers import kafka_mock

    with kafka_mock() as url:
        yield url


BROKERS = ["sqlite", "redis", "amqp", "kafka"]


@pytest.fixture(params=BROKERS)
def broker_url(request, tmp_path):
    """Factory: URL of a fresh topic on a real broker of each kind, with short redelivery timers."""
    kind = request.param
    base = {
        "sqlite": lambda: f"sqlite:///{tmp_path}/queue.db",
        "redis": lambda: request.getfixturevalue("redis_base"),
        "amqp": lambda: request.getfixturevalue("rabbitmq_base"),
        "kafka": lambda: request.getfixturevalue("kafka_base"),
    }[kind]()
    fast = {
        "sqlite": "visibility_timeout=2",
        "redis": "claim_idle_ms=2000",
        "amqp": "prefetch=64",
        "kafka": "create=auto&session_timeout_ms=6000",
    }[kind]

    def make(**options) -> str:
        topic = f"t{uuid.uuid4().hex[:10]}"
        extra = "".join(f"&{k}={v}" for k, v in options.items())
        return f"{base}?topic={topic}&{fast}{extra}"

    make.kind = kind
    return make
