"""Test helpers: configs from dicts, the relay in-process or as a subprocess, and journal inspection.

In-process (`running_relay`) is for behaviour; the subprocess (`RelayProcess`) is for durability, which
is only ever tested by killing the process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import trio
import yaml

from relay.config import Config, parse_config
from relay.journal_schema import JOURNAL_FILE
from relay.plugins import Registry, load_registry
from relay.service import Service

ROOT = Path(__file__).resolve().parent.parent


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    [port] = free_ports(1, kind)
    return port


def free_ports(n: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """`n` different ports that were free on 127.0.0.1 a moment ago.

    All `n` sockets stay bound until every port is chosen: a port released and asked for again at once
    can come back from the kernel a second time, and two listeners on one port make the second one fail.
    """
    with ExitStack() as held:
        socks = [held.enter_context(socket.socket(socket.AF_INET, kind)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def config_dict(tmp_path: Path, sources: dict[str, Any] | None = None,
                destinations: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A complete configuration: state in `tmp_path/state`, quiet logs, no metrics endpoint unless asked."""
    data: dict[str, Any] = {"state_dir": str(tmp_path / "state"), "log": {"level": "info", "format": "json"},
                            "metrics": {"listen": None}, "shutdown_timeout": "10s"}
    data.update(top)
    data["sources"] = sources or {}
    data["destinations"] = destinations or {}
    return data


def write_config(path: Path, data: dict[str, Any] | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def registry(extra: Iterable[ModuleType | object] = ()) -> Registry:
    return load_registry(extra=extra)


def make_config(data: dict[str, Any] | str, *, extra: Iterable[ModuleType | object] = (),
                env: dict[str, str] | None = None, file: str = "relay.yaml") -> Config:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    return parse_config(text, file, registry(extra), env if env is not None else dict(os.environ))


@asynccontextmanager
async def running_relay(config: Config) -> AsyncIterator[Service]:
    """Run the whole relay in this trio run until the block ends (then a graceful stop)."""
    service = Service(config)
    stop = trio.Event()
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: service.run(stop, on_ready=lambda _: ready.set()))
        await ready.wait()
        try:
            yield service
        finally:
            stop.set()


async def wait_until(predicate: Callable[[], bool], deadline: float = 30.0, what: str = "condition") -> None:
    """Poll a condition that no event signals (a file another process writes, say), with a deadline."""
    with trio.move_on_after(deadline):
        while not predicate():  # noqa: ASYNC110 - an external condition: nothing to await
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {deadline}s waiting for {what}")


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class RelayProcess:
    """`python -m relay run` as a child process, for kill -9 tests."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> RelayProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, env=self.env, cwd=str(ROOT))
        log.close()
        if wait_ready:
            wait_until_sync(lambda: self._ready_logged() or self._exited(), timeout, "relay_ready in the log")
            if self._exited():
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _ready_logged(self) -> bool:
        return any(e.get("event") == "relay_ready" for e in self.events(since_start=True))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, since_start: bool = False) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(self._log_offset)
            lines = f.read().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the relay."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def journal_db(state_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{state_dir / JOURNAL_FILE}?mode=ro", uri=True)


def journal_entries(state_dir: Path) -> list[tuple[int, bytes]]:
    """(seq, data) of every entry the journal holds."""
    with journal_db(state_dir) as db:
        return list(db.execute("SELECT seq, data FROM entries ORDER BY seq"))


def destination_row(state_dir: Path, name: str) -> dict[str, Any]:
    db = journal_db(state_dir)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM destinations WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else {}
    finally:
        db.close()


def dead_letters(state_dir: Path, name: str) -> list[tuple[int, str, bytes]]:
    with journal_db(state_dir) as db:
        return list(db.execute("SELECT seq, reason, data FROM dead_letters WHERE destination = ? ORDER BY id",
                               (name,)))


def metric_value(name: str, **labels: str) -> float:
    """Current value of a sample in the relay's registry (0 if absent)."""
    from relay.metrics import REGISTRY

    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def entry(action: str = "api_key.created", occurred_at: str = "2024-05-14T09:30:00.123456Z", **extra: Any
          ) -> dict[str, Any]:
    """A valid audit entry in incident.io's shape."""
    value: dict[str, Any] = {
        "action": action, "version": 1, "occurred_at": occurred_at,
        "actor": {"type": "user", "id": "01G0J1EXE7AXZ2C93K61WBPYEH", "name": "Kelsey Mills",
                  "metadata": {"user_base_role_slug": "admin"}},
        "targets": [{"type": "api_key", "id": "01FCNDV6P870EA6S7TK1DSYDG0", "name": "CI key"}],
        "context": {"location": "192.0.2.10", "user_agent": "curl/8.5.0"},
    }
    value.update(extra)
    return value
