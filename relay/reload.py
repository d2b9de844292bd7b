"""What a configuration reload changes: the plan (pure), and the outcome the relay reports.

Components are compared by their validated settings (frozen pydantic models and dataclasses compare by
value, secrets included), so an unchanged source or destination is not touched at all: a receiver keeps
its socket, a delivery loop keeps its batches in flight. Settings that live below the components (the
state dir, the journal's limits) cannot change under a running journal; the plan lists them so the relay
can say clearly that they need a restart, and keeps the running values meanwhile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from relay.config import Config

__all__ = ["OUTCOME_FILE", "Outcome", "Plan", "effective", "plan", "read_outcome", "write_outcome"]

OUTCOME_FILE = "last-reload.json"
"""In the state dir: the outcome of the newest reload, for `relay reload` to report."""


@dataclass(frozen=True)
class Changes:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items() if v}


@dataclass(frozen=True)
class Plan:
    sources: Changes
    destinations: Changes
    restart_required: tuple[str, ...]
    """Keys whose new value only takes effect at the next start."""
    live: tuple[str, ...]
    """Top-level keys applied now (`log`, `metrics.listen`, `shutdown_timeout`)."""

    def __bool__(self) -> bool:
        return bool(self.sources or self.destinations or self.restart_required or self.live)


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> Changes:
    return Changes(
        added=tuple(sorted(set(new) - set(old))),
        removed=tuple(sorted(set(old) - set(new))),
        changed=tuple(sorted(name for name in set(old) & set(new) if old[name] != new[name])),
    )


def plan(old: Config, new: Config) -> Plan:
    restart = []
    if Path(old.state_dir).resolve() != Path(new.state_dir).resolve():
        restart.append("state_dir")
    restart += [f"journal.{key}" for key in type(old.journal).model_fields
                if getattr(old.journal, key) != getattr(new.journal, key)]
    if old.parse_workers != new.parse_workers:
        restart.append("parse_workers")
    live = [key for key, changed in (("log", old.log != new.log),
                                     ("metrics.listen", old.metrics != new.metrics),
                                     ("shutdown_timeout", old.shutdown_timeout != new.shutdown_timeout)) if changed]
    return Plan(_diff(old.sources, new.sources), _diff(old.destinations, new.destinations), tuple(restart),
                tuple(live))


def effective(old: Config, new: Config) -> Config:
    """The configuration the relay runs after the reload: `new`, except what needs a restart."""
    return dataclasses.replace(new, state_dir=old.state_dir, journal=old.journal, parse_workers=old.parse_workers)


@dataclass
class Outcome:
    result: str
    """`applied`, `rejected` (invalid configuration: nothing changed) or `partial` (some components failed)."""
    sequence: int
    pid: int = field(default_factory=os.getpid)
    finished_at: float = field(default_factory=time.time)
    problems: list[str] = field(default_factory=list)
    changes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    restart_required: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{kind} {what}: {', '.join(names)}" for kind, change in self.changes.items()
                 for what, names in change.items()]
        return "; ".join(parts) or "no changes"


def write_outcome(state_dir: Path, outcome: Outcome) -> None:
    """Write atomically (temp file, fsync, rename), so a reader never sees half of it."""
    path = state_dir / OUTCOME_FILE
    temp = path.with_name(f".{OUTCOME_FILE}.tmp")
    with open(temp, "wb") as f:
        f.write(orjson.dumps(dataclasses.asdict(outcome), option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def read_outcome(state_dir: Path) -> Outcome | None:
    try:
        data = orjson.loads((state_dir / OUTCOME_FILE).read_bytes())
        return Outcome(**data)
    except (OSError, ValueError, TypeError):
        return None
