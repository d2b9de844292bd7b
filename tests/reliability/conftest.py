"""Fixtures of the reliability suite: every test is checked for leaked secrets; peers shared by the suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.moto_s3 import MotoS3
from tests.reliability.leaks import Leaks, assert_clean, capture_logs, restore_logs


@pytest.fixture(autouse=True)
def leaks() -> Iterator[Leaks]:
    """Capture this process's logs; when the test ends, fail it if a secret appears in them, in /metrics,
    or in any output or file the test handed over with `leaks.text()` / `leaks.file()`."""
    found = Leaks()
    saved = capture_logs(found.log)
    try:
        yield found
    finally:
        restore_logs(saved)
    assert_clean(found)


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """One moto S3 server (SigV4 checked) for the whole suite; each test makes its own bucket."""
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the AWS settings a test gives the relay count, never the machine's."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
