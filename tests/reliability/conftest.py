"""Fixtures of the reliability suite: every test is checked for leaked secrets and isolated from the
machine's AWS settings. The moto server it shares with tests/test_s3.py is in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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


@pytest.fixture(autouse=True)
def _no_ambient_aws(no_ambient_aws: None) -> None:
    """Every test of the suite sees only the AWS settings it gives the relay (tests/conftest.py)."""
