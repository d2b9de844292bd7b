"""The journal stops cleanly when writes race its stop (regression: a write queued by the pruner while the
writer was being cancelled waited forever in its shielded wait, so the relay never finished stopping)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio
import trio.testing

from relay.errors import JournalUnavailable
from relay.journal import Journal


def _within(seconds: float, scenario: object, *args: object) -> object:
    """Run `trio.run(scenario, *args)` in a thread; fail (instead of hanging the suite) if it does not end."""
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(trio.run(scenario, *args)), daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(seconds)
    assert outcome, f"the journal did not stop within {seconds}s"
    return outcome[0]


async def _prune_racing_stop(state_dir: Path) -> str:
    journal = Journal(state_dir, max_size=1 << 30, retention=3600)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.request_prune()  # the pruner wakes and queues a write ...
        nursery.cancel_scope.cancel()  # ... while the writer is being cancelled
    await journal.close()
    return "stopped"


async def _write_in_flight_at_stop(state_dir: Path) -> tuple[str, int]:
    journal = Journal(state_dir, max_size=1 << 30, retention=3600)
    await journal.open()
    result: list[object] = []
    async with trio.open_nursery() as outer:
        run_scope = trio.CancelScope()

        async def run_journal() -> None:
            with run_scope:
                await journal.run()

        await outer.start(lambda *, task_status: _started(run_journal, task_status))

        async def writer() -> None:
            try:
                result.append(await journal.write(lambda db: (time.sleep(0.3), 7)[1]))
            except JournalUnavailable as exc:
                result.append(exc)

        outer.start_soon(writer)
        await trio.sleep(0.1)  # the slow write is now in the writer's thread
        run_scope.cancel()
    await journal.close()
    return "stopped", result[0]  # type: ignore[return-value]


async def _started(fn: object, task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    await fn()  # type: ignore[operator]


def test_a_write_queued_while_the_journal_stops_fails_instead_of_hanging(tmp_path: Path) -> None:
    for attempt in range(5):
        assert _within(20, _prune_racing_stop, tmp_path / str(attempt)) == "stopped"


def test_a_write_in_flight_when_the_journal_stops_is_finished_and_reported(tmp_path: Path) -> None:
    assert _within(20, _write_in_flight_at_stop, tmp_path) == ("stopped", 7)



def test_writes_taken_by_a_writer_cancelled_before_its_thread_started_fail(tmp_path: Path) -> None:
    """The writer takes the queued writes, then is cancelled at the thread call's first checkpoint (here:
    waiting for the connection's limiter): those writes must fail, not wait forever (each waits shielded)."""

    async def scenario() -> list[str]:
        journal = Journal(tmp_path, max_size=1 << 30, retention=0)
        await journal.open()
        outcome: list[str] = []

        async def writer() -> None:
            try:
                await journal.write(lambda db: db.execute("SELECT 1"))
                outcome.append("done")
            except JournalUnavailable:
                outcome.append("unavailable")

        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            await journal._limiter.acquire()  # the writer blocks acquiring it inside to_thread
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        journal._limiter.release()
        await journal.close()
        return outcome

    assert _within(15, scenario) == ["unavailable"]
