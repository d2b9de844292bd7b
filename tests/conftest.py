from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import scripted


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak variants of the reliability suite")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def script() -> Iterator[scripted.Script]:
    """A fresh script for the `scripted` destination, registered under the name `main`."""
    scripted.SCRIPTS["main"] = s = scripted.Script()
    try:
        yield s
    finally:
        scripted.SCRIPTS.pop("main", None)
