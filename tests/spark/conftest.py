"""One Spark session (`local[2]`, bound to 127.0.0.1) shared by every Spark test, stopped at the end.

A session starts in 7-20 s (a JVM), so the tests share it; each test uses its own paths, tables and
stream names. The executors' Python workers run this interpreter (`PYSPARK_PYTHON`), so they import
the moorage under test.
"""

from __future__ import annotations

import os
import sys

import pytest

# the brokers and PostgreSQL of the integration tests (one server per session, a fresh topic or
# database per test), for the Spark sources and sinks
from tests.integration.conftest import kafka_base, pg_url, postgres_server, redis_base  # noqa: F401

pytest.importorskip("pyspark")


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    warehouse = tmp_path_factory.mktemp("spark-warehouse")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("moorage-tests")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
