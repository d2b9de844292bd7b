"""`relay import`: run a `file` source once, outside the daemon, with progress on a terminal.

It writes the same journal a running relay uses (SQLite allows a second writer; the daemon's delivery
loops pick the entries up within seconds) under the source's name, so an interrupted import resumes where
it stopped and a finished one is not repeated.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from relay.config import Config
from relay.context import Context
from relay.errors import ConfigError, ConfigIssue, PluginError
from relay.intake import JournalIntake
from relay.journal import Journal, JournalStateStore
from relay.plugins import Registry
from relay.progress import format_duration
from relay.workers import open_workers

__all__ = ["ImportProgress", "import_file"]

REPORT_EVERY = 0.5
"""Seconds between progress lines on a terminal (elsewhere: every `LOG_EVERY`)."""
LOG_EVERY = 10.0


@dataclass
class ImportProgress:
    """What an import has done so far; a source that runs to completion keeps one up to date.

    The total number of entries is not known before the end, so the ETA comes from bytes read
    (`relay.progress.Progress` counts against a known total of entries instead)."""

    total_bytes: int = 0
    done_bytes: int = 0
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    finished: bool = False
    already_done: bool = False
    """The file had been imported completely before: nothing was read this time."""
    error: str | None = None


def source_settings(config: Config, registry: Registry, name: str, file: Path, fmt: str | None) -> Any:
    """The settings of source `name` with `path` set to `file`: a configured `file` source's, or defaults."""
    plugin = registry.sources.get("file")
    if plugin is None:
        raise PluginError("no `file` source type is installed")
    configured = config.sources.get(name)
    if configured is not None and configured.type != "file":
        raise ConfigError([ConfigIssue(f"sources.{name}", f"is a {configured.type!r} source; "
                                       "`relay import` runs sources of type 'file'", config.file)])
    base = configured.settings.model_dump() if configured is not None else {}
    base["path"] = file
    if fmt is not None:
        base["format"] = fmt
    return plugin.cls, plugin.cls.Settings.model_validate(base)


def import_file(config: Config, registry: Registry, name: str, file: Path, fmt: str | None = None,
                out: TextIO | None = None) -> int:
    """Import `file` as source `name`; returns the exit code (0 done, 1 failed, 130 interrupted)."""
    out = out or sys.stderr
    cls, settings = source_settings(config, registry, name, file, fmt)
    return trio.run(_run, config, cls, settings, name, out)


async def _run(config: Config, cls: type[Any], settings: Any, name: str, out: TextIO) -> int:
    journal = Journal(config.state_dir, max_size=config.journal.max_size, retention=config.journal.retention)
    await journal.open()
    # This process's pruner must never outrun a destination of the relay daemon, whose configuration may
    # differ from the one given here: every destination the journal knows holds pruning back.
    known = await journal.read(lambda db: [row[0] for row in db.execute("SELECT name FROM destinations")])
    journal.active_destinations = set(config.destinations) | set(known)
    interrupted = False
    context = Context(name, "source", config.state_dir, JournalStateStore(journal, f"source:{name}"))
    source = cls(context, settings)
    progress: ImportProgress = source.progress
    started = time.monotonic()
    try:
        async with open_workers(config.parse_workers) as context.workers, trio.open_nursery() as outer:
            await outer.start(journal.run)
            intake = JournalIntake(name, journal, await journal.load_cursor(name))
            async with trio.open_nursery() as nursery:
                async def until_signal() -> None:
                    nonlocal interrupted
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for _ in signals:
                            interrupted = True
                            nursery.cancel_scope.cancel()

                async def run_source() -> None:
                    try:
                        await source.open()
                        await source.run(intake)
                    except Exception as exc:  # reported like any other failed import, with what went wrong
                        progress.error = progress.error or f"{type(exc).__name__}: {exc}"
                    finally:
                        with trio.CancelScope(shield=True):
                            await source.close()
                        nursery.cancel_scope.cancel()

                nursery.start_soon(until_signal)
                nursery.start_soon(_report, progress, started, out)
                nursery.start_soon(run_source)
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await journal.close()
    _line(out, _summary(progress, time.monotonic() - started, interrupted), final=True)
    if interrupted:
        return 130
    return 1 if progress.error else 0


async def _report(progress: ImportProgress, started: float, out: TextIO) -> None:
    tty = out.isatty()
    while True:
        await trio.sleep(REPORT_EVERY if tty else LOG_EVERY)
        _line(out, _status(progress, time.monotonic() - started), final=not tty)


def _status(p: ImportProgress, elapsed: float) -> str:
    rate = p.records / elapsed if elapsed > 0 else 0.0
    text = f"{p.records:,} records  {rate:,.0f}/s"
    if p.total_bytes:
        share = p.done_bytes / p.total_bytes
        text += f"  {share:6.1%}"
        if 0 < share < 1:
            text += f"  ETA {format_duration(elapsed * (1 - share) / share)}"
    return text + f"  ({p.accepted:,} new, {p.duplicates:,} duplicates, {p.quarantined:,} quarantined)"


def _summary(p: ImportProgress, elapsed: float, interrupted: bool) -> str:
    if p.already_done:
        return (f"nothing to do: this file was imported completely before ({p.records:,} records); "
                "a file with different content would be imported")
    counts = (f"{p.records:,} records: {p.accepted:,} new entries, {p.duplicates:,} already in the journal, "
              f"{p.quarantined:,} quarantined, in {elapsed:.1f}s")
    if interrupted:
        return f"interrupted after {counts}; run the same command again to resume"
    if p.error:
        return f"import stopped after {counts}: {p.error}"
    return f"import finished: {counts}"


def _line(out: TextIO, text: str, *, final: bool) -> None:
    if out.isatty():
        out.write("\r\033[K" + text + ("\n" if final else ""))
    else:
        out.write(text + "\n")
    out.flush()
