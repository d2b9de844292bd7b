"""Shared by the benchmarks: how figures are printed (a table, or JSON lines for `run_all.py`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
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

    def __post_init__(self) -> None:
        warn_if_busy()

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


BUSY_WARNING = 0.10
"""Share of the machine's CPU in use, before a benchmark starts, above which it warns."""


def warn_if_busy(seconds: float = 1.0) -> None:
    """Say so on stderr when something else is using the CPU before a benchmark starts, naming the busiest
    processes: the relay shares the cores with whatever runs, and a forgotten busy process makes every
    figure low without any other sign (it happened while measuring for issue 9)."""
    before, busy_before = _cpu_times(), _process_ticks()
    if before is None:
        return  # no /proc: not Linux
    time.sleep(seconds)
    after, busy_after = _cpu_times(), _process_ticks()
    assert after is not None
    total, idle = after[0] - before[0], after[1] - before[1]
    busy = 1 - idle / total if total > 0 else 0.0
    if busy <= BUSY_WARNING:
        return
    top = sorted(((ticks - busy_before.get(pid, (0, ""))[0], name) for pid, (ticks, name) in busy_after.items()),
                 reverse=True)[:3]
    hz = os.sysconf("SC_CLK_TCK")
    names = ", ".join(f"{name} {ticks / hz / seconds:.0%} of a core" for ticks, name in top
                      if ticks / hz / seconds >= 0.05)
    print(f"warning: the machine was {busy:.0%} busy before this benchmark started{f' ({names})' if names else ''};"
          " its figures will be low: run nothing else meanwhile", file=sys.stderr, flush=True)


def _cpu_times() -> tuple[int, int] | None:
    """(all, idle + iowait) jiffies since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return sum(fields), fields[3] + fields[4]


def _process_ticks() -> dict[int, tuple[int, str]]:
    """User + system jiffies and the name of every process now."""
    found: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                found[int(entry.name)] = _stat(int(entry.name))
    return found


def _stat(pid: int) -> tuple[int, str]:
    """User + system CPU in jiffies and the name of a process, from /proc/PID/stat (raises OSError when it
    is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    name, fields = stat.split("(", 1)[1].rsplit(")", 1)
    numbers = fields.split()
    return int(numbers[11]) + int(numbers[12]), name


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
            total += _stat(one)[0] / os.sysconf("SC_CLK_TCK")
    return total

