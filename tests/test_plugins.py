"""The plugin system: entry points, the registry, duplicate names, a real third-party package."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import trio

import relay
from relay import hookspecs
from relay.errors import PluginError
from relay.plugins import load_registry
from tests.helpers import ROOT, config_dict, make_config, running_relay


class _Duplicate:
    class File(relay.Destination):
        type_name = "file"

    @relay.hookimpl
    def register_destination_types(self, register):  # type: ignore[no-untyped-def]
        register(self.File)


def test_hook_register_destination_types_refuses_a_duplicate_name() -> None:
    with pytest.raises(PluginError, match=r"destination type 'file' is registered twice: by audit-relay \S+ and by"):
        load_registry(extra=[_Duplicate()])


def test_hook_register_source_types_checks_the_class() -> None:
    class NotASource:
        type_name = "nope"

    class Bad:
        @relay.hookimpl
        def register_source_types(self, register):  # type: ignore[no-untyped-def]
            register(NotASource)

    with pytest.raises(PluginError, match="not a Source subclass"):
        load_registry(extra=[Bad()])


def test_a_typo_in_a_hook_name_fails_loudly() -> None:
    class Typo:
        @relay.hookimpl
        def register_destinaton_types(self, register):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(PluginError, match="register_destinaton_types"):
        load_registry(extra=[Typo()])


def test_builtins_arrive_through_the_entry_point_group() -> None:
    registry = load_registry()
    assert {"file", "stdout", "batch_files"} <= set(registry.destinations)
    assert registry.destinations["file"].package.startswith("audit-relay ")
    assert registry.destinations["batch_files"].package == "audit-relay-example 1.0.0"
    assert "file" not in load_registry(load_entrypoints=False).destinations


def test_the_third_party_example_is_under_50_lines() -> None:
    import audit_relay_example

    lines = [line for line in inspect.getsource(audit_relay_example).splitlines() if line.strip()]
    assert len(lines) <= 50


async def test_third_party_destination_delivers_with_retries(tmp_path: Path) -> None:
    out = tmp_path / "batches"
    config = make_config(config_dict(
        tmp_path, {"demo": {"type": "demo", "rate": 1000, "count": 250}},
        {"files": {"type": "batch_files", "directory": str(out), "fail_first": 2,
                   "retry": {"initial_backoff": "10ms", "max_backoff": "20ms"}}}))
    async with running_relay(config) as service:
        with trio.fail_after(20):
            await service.destinations["files"].loop.wait_offset(250)
    lines = [line for f in sorted(out.glob("*.jsonl")) for line in f.read_bytes().splitlines()]
    assert len(lines) == 250 == len(set(lines))


def test_hooks_are_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, "audit_relay_spec"):
            assert f"{name}{inspect.signature(fn)}".replace("'", "") in docs.replace("'", ""), name


def test_exported_members() -> None:
    """The package root is the plugin author's surface: sorted, complete, nothing dangling."""
    assert len(relay.__all__) == len(set(relay.__all__))
    for name in relay.__all__:
        assert hasattr(relay, name), name


def test_every_builtin_type_has_a_docs_page() -> None:
    for plugin_type in load_registry().all():
        if not plugin_type.package.startswith("audit-relay "):
            continue
        page = ROOT / "docs" / f"{plugin_type.name.replace('_', '-')}.md"
        alt = ROOT / "docs" / f"{plugin_type.name}.md"
        assert page.exists() or alt.exists() or _documented_elsewhere(plugin_type.kind, plugin_type.name), \
            f"no docs page for {plugin_type.kind} {plugin_type.name}"


def _documented_elsewhere(kind: str, name: str) -> bool:
    """A type documented on a page named after its kind and type, e.g. docs/file-import.md for source file."""
    for page in (ROOT / "docs").glob("*.md"):
        if re.search(rf"^# (Source|Destination) `{name}`", page.read_text(), re.M) and kind in page.read_text():
            return True
    return False
