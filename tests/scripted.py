"""Throwaway plugins for engine tests: a destination that answers from a script, a source tests feed by hand.

Registered per test through `make_config(..., extra=[scripted])`, never through entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

import relay

Answer = relay.Result | Callable[[relay.Batch], relay.Result]


@dataclass
class Script:
    answers: list[Answer] = field(default_factory=list)
    """Answers used in order, one per attempt; when empty, every attempt is Delivered."""
    batches: list[relay.Batch] = field(default_factory=list)
    delivered: list[relay.Entry] = field(default_factory=list)
    gate: trio.Event | None = None
    """When set, attempts wait for this event first (a destination that hangs until released)."""
    attempts: int = 0
    """Attempts started (counted before the gate)."""
    _changed: trio.Event = field(default_factory=trio.Event)

    async def wait(self, predicate: Callable[[Script], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


SCRIPTS: dict[str, Script] = {}


class ScriptedSettings(relay.Settings):
    script: str


class ScriptedDestination(relay.Destination):
    type_name = "scripted"
    Settings = ScriptedSettings
    batch_defaults = relay.BatchDefaults(max_entries=10, max_bytes=1024 * 1024, max_wait=0.01)

    async def send(self, batch: relay.Batch) -> relay.Result:
        script = SCRIPTS[self.settings.script]
        script.attempts += 1
        script.notify()
        if script.gate is not None:
            await script.gate.wait()
        script.batches.append(batch)
        answer = script.answers.pop(0) if script.answers else relay.Delivered()
        result = answer(batch) if callable(answer) else answer
        if isinstance(result, relay.Delivered):
            script.delivered.extend(batch.entries)
        elif isinstance(result, relay.Rejected):
            cut = len(batch) if result.resend_from is None else result.resend_from
            script.delivered.extend(e for i, e in enumerate(batch.entries[:cut]) if i not in result.reasons)
        script.notify()
        return result


class ManualSource(relay.Source):
    """A source that does nothing by itself: tests call `service.sources[name].intake.submit(...)`."""

    type_name = "manual"

    async def run(self, intake: relay.Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        await trio.sleep_forever()


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(ScriptedDestination)


@relay.hookimpl
def register_source_types(register):  # type: ignore[no-untyped-def]
    register(ManualSource)
