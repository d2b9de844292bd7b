"""Shared by the benchmarks: how figures are printed (a table, or JSON lines for `run_all.py`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Report:
    bench: str
    as_json: bool = field(default_factory=lambda: "--json" in sys.argv)
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    def add(self, metric: str, value: float, unit: str) -> None:
        self.rows.append((metric, value, unit))
        if self.as_json:
            print(json.dumps({"bench": self.bench, "metric": metric, "value": round(value, 3), "unit": unit}),
                  flush=True)

    def print(self) -> None:
        if self.as_json:
            return
        width = max((len(m) for m, _, _ in self.rows), default=10)
        print(f"\n{self.bench}")
        for metric, value, unit in self.rows:
            shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3f}"
            print(f"  {metric.ljust(width)}  {shown:>14} {unit}")


def _status_bytes(pid: int, key: str) -> int:
    """A size from /proc/PID/status (`VmHWM`, `VmRSS`), in bytes; 0 if the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a running process (its peak resident set size)."""
    return _status_bytes(pid, "VmHWM")


def rss_bytes(pid: int) -> int:
    """VmRSS of a running process (its resident set size now)."""
    return _status_bytes(pid, "VmRSS")


def children(pid: int) -> list[int]:
    """The running child processes of `pid` (the relay's parse workers)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def workers_peak_rss_bytes(pid: int) -> int:
    """The sum of the peak RSS of `pid`'s child processes."""
    return sum(peak_rss_bytes(child) for child in children(pid))


def workers_rss_bytes(pid: int) -> int:
    """The sum of the RSS of `pid`'s child processes (the parse workers, multiprocessing's resource tracker)."""
    return sum(rss_bytes(child) for child in children(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and of its running children (parse workers: their work is the relay's)."""
    total = 0.0
    for one in (pid, *children(pid)):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def free_port() -> int:
    """A loopback TCP port free right now (for a listener the benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
