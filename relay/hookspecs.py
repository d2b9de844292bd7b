"""The plugin contract: the hooks through which packages provide source and destination types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("audit_relay")
hookimpl = pluggy.HookimplMarker("audit_relay")


@hookspec
def register_source_types(register: Callable[[type[Any]], None]) -> None:
    """Called once at start-up: call `register(SourceClass)` for each source type the plugin provides."""


@hookspec
def register_destination_types(register: Callable[[type[Any]], None]) -> None:
    """Called once at start-up: call `register(DestinationClass)` for each destination type provided."""
