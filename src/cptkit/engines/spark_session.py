"""Where Spark comes from: the active SparkSession (a notebook or job on a Databricks cluster), a
Databricks Connect session (`prepare.spark.remote: databricks`), or one cptkit starts on
`prepare.spark.master`.

A Databricks Connect session is authenticated exactly like the Databricks source: the same connection
keys (host, token, OAuth client, profile, with their DATABRICKS_* variables) resolved by the same SDK
configuration (`databricks_client.sdk_config`), so a credential is never written, logged or shown.
pyspark (`cptkit[spark]`) and databricks-connect (`cptkit[databricks-connect]`, which brings its own
pyspark) are optional extras, imported on use.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cptkit.config import DatabricksConfig, DatabricksConnection, SparkConfig
from cptkit.errors import StageError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Set by the CLI under --debug: Spark then logs with its default profile.
DEBUG_ENV = "CPTKIT_DEBUG"
_QUIET_LOG4J = Path(__file__).with_name("spark-log4j2.properties")
# pyspark logs each query error with its context before raising it (a JSON line on stderr); cptkit reports
# the error itself in one line.
_QUERY_ERROR_LOGGERS = ("SQLQueryContextLogger", "DataFrameQueryContextLogger")


def session(config: SparkConfig, connection: DatabricksConnection | None = None) -> SparkSession:
    """The session `config` asks for. `connection` authenticates a Databricks Connect session (default:
    the DATABRICKS_* variables and ~/.databrickscfg)."""
    if config.remote == "databricks":
        _quiet_query_errors()
        return databricks_session(config, connection if connection is not None else DatabricksConfig())
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise StageError("prepare.engine is spark, but pyspark is not installed: pip install 'cptkit[spark]'") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    require_java()
    _quiet_query_errors()
    # Spark's Python workers must run this interpreter, where cptkit and its dependencies are.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = cast(Any, SparkSession.builder).master(config.master).appName("cptkit-prepare")
    builder = builder.config("spark.ui.showConsoleProgress", "false").config("spark.ui.enabled", "false")
    builder = builder.config("spark.driver.memory", config.driver_memory)
    if not os.environ.get(DEBUG_ENV):
        # The driver JVM is not started yet: spark-submit passes this to it, so even Spark's start-up
        # lines (before setLogLevel could act) follow our errors-only configuration.
        builder = builder.config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_QUIET_LOG4J.as_uri()}")
    try:
        spark = builder.getOrCreate()
    except Exception as exc:
        raise StageError(f"prepare.spark.master={config.master}: Spark did not start: {first_line(exc)}") from exc
    spark.sparkContext.setLogLevel("ERROR")
    return cast("SparkSession", spark)


def databricks_session(config: SparkConfig, connection: DatabricksConnection) -> SparkSession:
    """A Databricks Connect session on `config.cluster_id` (else DATABRICKS_CLUSTER_ID or the profile's
    cluster_id) or on serverless compute."""
    try:
        from databricks.connect import DatabricksSession
    except ImportError:
        raise StageError(
            "prepare.spark.remote is databricks, but databricks-connect is not installed: "
            "pip install 'cptkit[databricks-connect]' (in an environment without pyspark, which it replaces)"
        ) from None
    from cptkit.sources.databricks_client import config_secrets, sdk_config

    secrets = config_secrets(connection)
    compute = {"serverless_compute_id": "auto"} if config.serverless else {"cluster_id": config.cluster_id}
    sdk = sdk_config(connection, secrets, compute)  # a one-line SourceError when auth is not configured
    try:
        spark = DatabricksSession.builder.sdkConfig(sdk).getOrCreate()
    except Exception as exc:
        # Not chained: a vendor's message or its cause may carry the credential.
        reason = secrets.scrub(first_line(exc))
        raise StageError(f"prepare.spark.remote=databricks: no Databricks Connect session: {reason}") from None
    return cast("SparkSession", spark)


def _quiet_query_errors() -> None:
    if not os.environ.get(DEBUG_ENV):
        for name in _QUERY_ERROR_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def is_remote(config: SparkConfig) -> bool:
    """Whether the session runs elsewhere (Databricks Connect): files on this machine are not its files."""
    return config.remote is not None


def require_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and Path(java_home, "bin", "java").is_file():
        return
    if shutil.which("java") is None:
        raise StageError(
            "prepare.engine is spark, but Java was not found (no JAVA_HOME, no java on PATH): install Java 17, "
            "e.g. apt-get install openjdk-17-jre-headless"
        )


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
