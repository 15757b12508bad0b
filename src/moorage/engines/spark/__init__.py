"""moorage on Apache Spark: registry models as UDFs, data sources for moorage brokers, exactly-once sinks.

Extra ``spark`` (pyspark, pandas, pyarrow); nothing here is JVM code. Importing this package needs
none of them: `require_spark` and `local_session` say in one line what is missing, and
`predict_udf` is imported from `udf` only when called.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import MoorageError, require

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from .udf import PredictUDF

EXTRA = "spark"
SPARK_MODULES = ("pyspark", "pandas", "pyarrow")


class SparkUnavailable(MoorageError):
    """A Spark session cannot start here (no Java, or the JVM did not come up)."""

    status = 503
    code = "spark_unavailable"


def require_spark() -> None:
    """pyspark, pandas and pyarrow, or a one-line `MissingDependency` naming the extra."""
    for module in SPARK_MODULES:
        require(module, EXTRA)


def java_problem(java_home: str | None) -> str | None:
    """Why Spark's launcher would find no Java (it runs ``$JAVA_HOME/bin/java``, else ``java`` on the
    PATH), or None. Checked before the launch, whose own failure is a page of shell and JVM output."""
    if java_home:
        if not (Path(java_home) / "bin" / "java").is_file():
            return f"JAVA_HOME={java_home} holds no bin/java; point it at a Java 17+ runtime or unset it"
        return None
    if shutil.which("java") is None:
        return (
            "no Java runtime found (Spark needs Java 17+): install one (e.g. openjdk-17-jre-headless) or set JAVA_HOME"
        )
    return None


def local_session(
    master: str = "local[2]", app_name: str = "moorage", conf: dict[str, Any] | None = None
) -> SparkSession:
    """A Spark session for `master`. On ``local[N]`` the driver binds to 127.0.0.1 and the UI is off
    (nothing listens beyond this machine); the Python workers run this interpreter, so they import
    the same moorage, and are reused across tasks, so a worker keeps its loaded model for the job."""
    require_spark()
    problem = java_problem(os.environ.get("JAVA_HOME"))  # Spark's launcher variable, not a moorage setting
    if problem is not None:
        raise SparkUnavailable(f"cannot start Spark: {problem}")
    from pyspark.sql import SparkSession

    # PySpark takes the workers' interpreter from this variable when the context starts (the
    # spark.pyspark.python setting only reaches spark-submit): this one, which imports moorage
    os.environ["PYSPARK_PYTHON"] = sys.executable
    builder = SparkSession.builder.master(master).appName(app_name)
    settings: dict[str, Any] = {"spark.python.worker.reuse": "true", "spark.ui.showConsoleProgress": "false"}
    if master.startswith("local"):
        os.environ.setdefault(
            "SPARK_LOCAL_IP", "127.0.0.1"
        )  # else the JVM binds its first address to another interface
        settings |= {
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false",
        }
    for key, value in (settings | (conf or {})).items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # the JVM did not start: py4j's or pyspark's error, first line only
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparkUnavailable(f"cannot start Spark ({master}): {first}") from None
    session.sparkContext.setLogLevel("ERROR")
    return session


def predict_udf(ref: str, task: str | None = None, batch_size: int = 32, **options: Any) -> PredictUDF:
    """A registry model as a Spark column function; see `moorage.engines.spark.udf.predict_udf`."""
    require_spark()
    from .udf import predict_udf as build

    return build(ref, task, batch_size, **options)


__all__ = ["EXTRA", "SparkUnavailable", "java_problem", "local_session", "predict_udf", "require_spark"]
