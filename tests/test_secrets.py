"""The one vocabulary of secrets: secret keys, masked URLs and values, and masking of what cptkit and
the libraries it uses print (log records, warnings, console lines, error messages)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from conftest import write_config
from cptkit.secrets import (
    MASK,
    ScrubbedStream,
    Secrets,
    is_secret_key,
    mask_data,
    mask_url,
    mask_value,
    remember,
    scrub,
    scrub_logs,
)

CPTKIT = [sys.executable, "-m", "cptkit"]
URL_PASSWORD = "url-PASSWORD-7c1e9b42"


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token", True),
        ("databricks.token", True),
        ("DATABRICKS_TOKEN", True),
        ("accessToken", True),
        ("apiKey", True),
        ("openai_api_key", True),
        ("client_secret", True),
        ("db_password", True),
        ("storage_options", True),
        ("source.storage_options.AWS_REGION", True),
        ("aws_access_key_id", True),
        ("refresh_token", True),
        ("x-amz-security-token", True),
        ("tune.token_levels", False),  # a list of shares: masked, tuned.yaml could not be read back
        ("token_budget", False),
        ("tokenizer", False),
        ("prepare.tokenize", False),
        ("tokens", False),
        ("max_new_tokens", False),
        ("rapi_keyboard", False),  # "api_key" only as consecutive words
        ("max_seq_length", False),
        ("host", False),
    ],
)
def test_secret_keys(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://user:dapiTOKEN@adb-1.azuredatabricks.net", "https://***@adb-1.azuredatabricks.net"),
        ("s3://AKIAKEY:secret/with+chars@bucket/x/y", "s3://***@bucket/x/y"),  # a raw / in the password
        ("http://host:8080/a@b", "http://host:8080/a@b"),  # a port, then a path
        ("abfss://container@account.dfs.core.windows.net/t", "abfss://container@account.dfs.core.windows.net/t"),
        ("abfss://container:key@account.dfs.core.windows.net/t", "abfss://***@account.dfs.core.windows.net/t"),
        ("postgresql+psycopg2://u:p@ss@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
        ("https://TOKENONLY@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        (
            "Failed to fetch host metadata from http://u:dapiX@127.0.0.1:9/.well-known/databricks-config: refused",
            "Failed to fetch host metadata from http://***@127.0.0.1:9/.well-known/databricks-config: refused",
        ),
        ("'http://a:b@h' and 'https://c:d@k/p'", "'http://***@h' and 'https://***@k/p'"),
        ("http://host/path?mail=a@b.com", "http://host/path?mail=a@b.com"),  # no userinfo: unchanged
        ("write to ops@example.com", "write to ops@example.com"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("C:/Users/me@corp/x", "C:/Users/me@corp/x"),
        # MLflow model URIs name an alias after the @: not a credential.
        ("models:/python-docs-smollm2@champion", "models:/python-docs-smollm2@champion"),
        ("serve -m 'models:/main.docs.model@challenger'", "serve -m 'models:/main.docs.model@challenger'"),
        ("s3:/AKIAKEY:secret@bucket/x", "s3:/***@bucket/x"),  # one slash (a URL typed as a path), a password
    ],
)
def test_url_userinfo_is_masked_and_the_rest_kept(text: str, masked: str) -> None:
    assert mask_url(text) == masked


def test_scrub_masks_known_values_environment_bearer_and_signed_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-env-value-123456")
    monkeypatch.setenv("HF_TOKEN", "1")  # too short to mask as text
    secrets = Secrets(["given-secret-abc", None, "abc"])
    text = (
        "token dapi-env-value-123456, given-secret-abc, abc, 1 and Bearer eyJhbGciOiJIUzI1 "
        "at https://s3/x?X-Amz-Signature=deadbeef&part=1 via https://u:pw-xyz@h/p"
    )
    assert secrets.scrub(text) == (
        "token ***, ***, abc, 1 and Bearer *** at https://s3/x?X-Amz-Signature=***&part=1 via https://***@h/p"
    )
    remember("remembered-value-42")
    assert scrub("a remembered-value-42 b") == "a *** b"  # remembered process-wide


def test_masked_data_keeps_shape_and_unset_secrets() -> None:
    data = {
        "token": SecretStr("x"),
        "unset": None,
        "ratios": {2: 0.2},
        "paths": [Path("s3://k:v@b/p"), "plain"],
        "tracking_uri": "https://user:pass@mlflow",
    }
    assert mask_value(data) == {
        "token": MASK,
        "unset": None,
        "ratios": {2: 0.2},
        "paths": ["s3:/***@b/p", "plain"],  # a Path keeps one slash
        "tracking_uri": "https://***@mlflow",
    }
    # untyped data: by key too
    assert mask_data({"auth_token": "t", "n": 1, "nested": {"password": None, "url": "http://a:b@h"}}) == {
        "auth_token": MASK,
        "n": 1,
        "nested": {"password": MASK, "url": "http://***@h"},
    }


def test_log_records_and_warnings_are_masked_whatever_prints_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A vendor logger with its own handler and no propagation, a record with args and a traceback, and a
    warning: all masked once scrub_logs is on."""
    scrub_logs()
    remember("known-secret-value-1")
    out = io.StringIO()
    vendor = logging.getLogger("some.vendor.sdk")
    handler = logging.StreamHandler(out)
    vendor.addHandler(handler)
    monkeypatch.setattr(vendor, "propagate", False)
    try:
        vendor.warning("Failed to fetch %s (%s)", f"http://user:{URL_PASSWORD}@h/x", "known-secret-value-1")
        try:
            raise ValueError(f"boom at https://u:{URL_PASSWORD}@h")
        except ValueError:
            vendor.exception("failed")
    finally:
        vendor.removeHandler(handler)
    logged = out.getvalue()
    assert "Failed to fetch http://***@h/x (***)" in logged
    assert "ValueError: boom at https://***@h" in logged  # the traceback too
    assert URL_PASSWORD not in logged and "known-secret-value-1" not in logged

    shown = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", _show_to(shown))
        warnings.warn(f"cannot reach s3://k:{URL_PASSWORD}@bucket", UserWarning, stacklevel=1)
    assert "s3://***@bucket" in shown.getvalue() and URL_PASSWORD not in shown.getvalue()


def _show_to(stream: io.StringIO) -> Any:
    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    return show


def test_scrubbed_stream_writes_to_the_current_stream(capsys: pytest.CaptureFixture[str]) -> None:
    stream = ScrubbedStream("stderr")
    stream.write(f"reading s3://k:{URL_PASSWORD}@bucket/x\n")
    stream.flush()
    assert capsys.readouterr().err == "reading s3://***@bucket/x\n"
    with pytest.raises(ValueError, match="no standard stream"):
        ScrubbedStream("stdin")


def test_cli_masks_url_userinfo_in_config_show_and_errors(tmp_path: Path) -> None:
    """The real CLI: config show, and the error line of a Delta source whose URL carries credentials."""
    write_config(
        tmp_path / "cfg.yaml",
        {
            "source": {"type": "delta", "path": f"s3://AKIAKEY:{URL_PASSWORD}@bucket/table"},
            "tracking": {"tracking_uri": f"https://user:{URL_PASSWORD}@mlflow.example.com"},
            "databricks": {"host": f"https://user:{URL_PASSWORD}@adb-1.azuredatabricks.net"},
        },
    )
    shown = subprocess.run([*CPTKIT, "config", "show", "-c", "cfg.yaml"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "path: s3://***@bucket/table" in shown.stdout
    assert "tracking_uri: https://***@mlflow.example.com" in shown.stdout
    assert "host: https://***@adb-1.azuredatabricks.net" in shown.stdout

    # No instance-metadata lookup: it takes seconds and delta-rs logs its failure on stderr itself.
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": "us-east-1"}
    failed = subprocess.run([*CPTKIT, "extract", "-c", "cfg.yaml"], capture_output=True, text=True, env=env)
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: s3://***@bucket/table: cannot open Delta table"), failed.stderr
    for text in (shown.stdout, shown.stderr, failed.stdout, failed.stderr):
        assert URL_PASSWORD not in text
