"""`relay check --connect`: each destination's and source's own connectivity test, as table rows.

A destination's `check()` tests its receiver and credentials without sending an entry; a source's tests
what it can without taking entries (a receiver binds its listen address and releases it, a poller
authenticates). Every check runs concurrently with a timeout; results never contain a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from relay.config import Config
from relay.context import CheckFailed, Context
from relay.logs import scrub

__all__ = ["CHECK_TIMEOUT", "CheckResult", "check_all"]

CHECK_TIMEOUT = 20.0


@dataclass(frozen=True)
class CheckResult:
    kind: str
    name: str
    type: str
    ok: bool
    detail: str


async def _one(instance: Any) -> tuple[bool, str]:
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


async def check_all(config: Config) -> list[CheckResult]:
    """Run every check concurrently; results sorted by kind (destinations first) and name."""
    results: list[CheckResult] = []

    async def run(kind: str, name: str, type_name: str, make: Any, settings: Any) -> None:
        try:
            instance = make(Context(name, kind, config.state_dir), settings)  # type: ignore[arg-type]
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        else:
            ok, detail = await _one(instance)
        results.append(CheckResult(kind, name, type_name, ok, scrub(" ".join(str(detail).split()))))

    async with trio.open_nursery() as nursery:
        for name, dest in config.destinations.items():
            nursery.start_soon(run, "destination", name, dest.type, dest.plugin.cls, dest.settings)
        for name, src in config.sources.items():
            nursery.start_soon(run, "source", name, src.type, src.plugin.cls, src.settings)
    return sorted(results, key=lambda r: (r.kind != "destination", r.name))
