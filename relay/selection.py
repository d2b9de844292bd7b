"""Per-destination selection: which entries a destination takes, and which fields it never sees."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import orjson

from relay.config import FilterSettings


class Selection:
    """Compiled `filter:` and `drop_fields:` of one destination."""

    def __init__(self, name: str, settings: FilterSettings, drop_fields: list[str]) -> None:
        self.name = name
        self._include = _compile(settings.actions)
        self._exclude = _compile(settings.exclude_actions)
        self._actor_types = frozenset(settings.actor_types)
        self._target_types = frozenset(settings.target_types)
        self._drop = [path.split(".") for path in drop_fields]
        self.takes_all = not (self._include or self._exclude or self._actor_types or self._target_types or self._drop)
        """No filter and no dropped fields: every entry routed here goes as it is (the delivery loop's fast path)."""

    def takes(self, route: str | None, action: str, actor_type: str, target_types: str) -> bool:
        if route is not None and route != self.name:
            return False
        if self._include is not None and not self._include.match(action):
            return False
        if self._exclude is not None and self._exclude.match(action):
            return False
        if self._actor_types and actor_type not in self._actor_types:
            return False
        return not self._target_types or not self._target_types.isdisjoint(target_types.split(","))

    def transform(self, data: bytes) -> bytes:
        if not self._drop:
            return data
        value = orjson.loads(data)
        for path in self._drop:
            _drop(value, path)
        return orjson.dumps(value)


def _compile(globs: list[str]) -> re.Pattern[str] | None:
    if not globs:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def _drop(value: Any, path: list[str]) -> None:
    for part in path[:-1]:
        if not isinstance(value, dict):
            return
        value = value.get(part)
    if isinstance(value, dict):
        value.pop(path[-1], None)
    elif isinstance(value, list):  # `targets.name` drops the key from every target
        for item in value:
            if isinstance(item, dict):
                item.pop(path[-1], None)
