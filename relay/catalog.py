"""The known audit entry types (from incident.io's public API schema), shipped with the package.

Used to count entries of types the relay has not seen documented (they are still relayed unchanged)
and by the demo source to produce realistic entries.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import orjson

ACTOR_TYPES = frozenset({"user", "api_key", "system", "workflow", "external_resource", "alert"})
ENTRY_FIELDS = frozenset(
    {"id", "object", "organization_id", "action", "version", "occurred_at", "actor", "targets", "context",
     "metadata"}
)


@cache
def load_catalog() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(resources.files("relay").joinpath("data/audit_catalog.json").read_bytes())
    return data


@cache
def known_versions() -> dict[str, frozenset[int]]:
    """action -> the versions documented for it."""
    versions: dict[str, set[int]] = {}
    for entry_type in load_catalog()["entry_types"]:
        versions.setdefault(entry_type["action"], set()).add(int(entry_type["version"]))
    return {action: frozenset(v) for action, v in versions.items()}
