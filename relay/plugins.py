"""Builds the plugin manager and the registry of source and destination types.

Built-in types arrive through the `audit_relay` entry-point group exactly like third-party ones, so
`relay_plugins.file` is also the example to copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from relay import hookspecs
from relay.destination import Destination
from relay.errors import PluginError
from relay.source import Source

ENTRY_POINT_GROUP = "audit_relay"
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PluginType:
    kind: str
    name: str
    cls: type[Any]
    package: str
    """The distribution (`name version`) that provides the type, or the module for unpackaged plugins."""


@dataclass
class Registry:
    sources: dict[str, PluginType] = field(default_factory=dict)
    destinations: dict[str, PluginType] = field(default_factory=dict)

    def all(self) -> list[PluginType]:
        return sorted([*self.sources.values(), *self.destinations.values()], key=lambda t: (t.kind, t.name))


def get_plugin_manager(
    load_entrypoints: bool = True, extra: Iterable[ModuleType | object] = ()
) -> pluggy.PluginManager:
    """A fresh manager: the hook specs, every installed `audit_relay` plugin, and `extra` (for tests)."""
    pm = pluggy.PluginManager("audit_relay")
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # an installed plugin failed to import
            raise PluginError(f"loading plugins from entry-point group {ENTRY_POINT_GROUP!r}: {exc}") from exc
    for plugin in extra:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def _package_of(pm: pluggy.PluginManager, plugin: object) -> str:
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            return f"{dist.project_name} {dist.version}"
    return getattr(plugin, "__name__", type(plugin).__name__)


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin for its types; refuse duplicates, naming both packages."""
    registry = Registry()
    for kind, hook, base, table in (
        ("source", pm.hook.register_source_types, Source, registry.sources),
        ("destination", pm.hook.register_destination_types, Destination, registry.destinations),
    ):
        for impl in hook.get_hookimpls():
            package = _package_of(pm, impl.plugin)

            def register(cls: type[Any], *, _package: str = package, _kind: str = kind,
                         _base: type[Any] = base, _table: dict[str, PluginType] = table) -> None:
                name = getattr(cls, "type_name", None)
                if not isinstance(cls, type) or not issubclass(cls, _base):
                    raise PluginError(f"{_package} registered {cls!r}, which is not a {_base.__name__} subclass")
                if not isinstance(name, str) or not _TYPE_NAME.match(name):
                    raise PluginError(f"{_package}: {cls.__name__}.type_name must match [a-z][a-z0-9_]*")
                if name in _table:
                    raise PluginError(
                        f"{_kind} type {name!r} is registered twice: by {_table[name].package} and by {_package}"
                    )
                _table[name] = PluginType(_kind, name, cls, _package)

            impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
    return registry


def load_registry(load_entrypoints: bool = True, extra: Iterable[ModuleType | object] = ()) -> Registry:
    return build_registry(get_plugin_manager(load_entrypoints, extra))
