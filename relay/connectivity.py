"""`relay check --connect`: each destination's and source's own connectivity test, as a table."""

from __future__ import annotations

from typing import Any

import trio

from relay.config import Config
from relay.context import CheckFailed, Context
from relay.logs import scrub

CHECK_TIMEOUT = 20.0


async def _one(kind: str, name: str, instance: Any) -> tuple[bool, str]:
    try:
        with trio.fail_after(CHECK_TIMEOUT):
            await instance.open()
            try:
                return True, await instance.check()
            finally:
                await instance.close()
    except trio.TooSlowError:
        return False, f"no answer within {CHECK_TIMEOUT:g}s"
    except CheckFailed as exc:
        return False, str(exc)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


async def check_all(config: Config) -> bool:
    """Run every check (concurrently), print one line each, return True if all passed."""
    results: dict[tuple[str, str], tuple[bool, str]] = {}

    async def run(kind: str, name: str, instance: Any) -> None:
        results[(kind, name)] = await _one(kind, name, instance)

    async with trio.open_nursery() as nursery:
        for name, dest in config.destinations.items():
            instance = dest.plugin.cls(Context(name, "destination", config.state_dir), dest.settings)
            nursery.start_soon(run, "destination", name, instance)
        for name, src in config.sources.items():
            instance = src.plugin.cls(Context(name, "source", config.state_dir), src.settings)
            nursery.start_soon(run, "source", name, instance)
    width = max((len(f"{k} {n}") for k, n in results), default=0)
    for (kind, name), (ok, detail) in sorted(results.items()):
        print(f"{'ok  ' if ok else 'FAIL'}  {f'{kind} {name}'.ljust(width)}  {scrub(detail)}")
    return all(ok for ok, _ in results.values())
