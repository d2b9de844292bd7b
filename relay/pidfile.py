"""`relay.pid` in the state dir: who is using this journal, and the lock that keeps it to one process.

The file holds the pid and what the process is doing (`run`, `cursor set`). Whoever holds it keeps an
exclusive `flock()` on it for as long as it runs, so a pid file left by a crash (`kill -9`, power loss) is
told apart from a live one by the lock, never by guessing from the pid (pids are reused). A new file is
written under a temporary name, locked, and then hard-linked into place, which fails if the name exists
(the O_EXCL guarantee) and never shows a half-written or unlocked file. A stale file is removed only while
holding its lock and only if it is still the file under that name.

`relay reload` reads the pid and signals it; `relay cursor set` takes the lock itself, so a relay cannot
start while a cursor is being changed. Log events: `stale_pid_file_replaced` (warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from relay.errors import RelayError

__all__ = ["PID_FILE", "PidFile", "StateDirBusy", "holder"]

PID_FILE = "relay.pid"
log = structlog.get_logger("relay.pidfile")


class StateDirBusy(RelayError):
    """Another live process holds the state dir's pid file."""

    def __init__(self, path: Path, pid: int | None, what: str) -> None:
        self.pid = pid
        self.what = what
        super().__init__(f"another process (pid {pid if pid is not None else '?'}: relay {what or 'run'}) is using "
                         f"{path.parent}; only one relay may use a state_dir at a time")


@dataclass(frozen=True)
class Holder:
    pid: int | None
    what: str


def _read(fd: int) -> Holder:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").split("\n")
    pid = int(text[0]) if text and text[0].strip().isdigit() else None
    return Holder(pid, text[1].strip() if len(text) > 1 else "")


def _locked(fd: int) -> bool:
    """Try the lock; True if we now hold it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class PidFile:
    """A held pid file; `release()` (or leaving the `with` block) removes it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path, what: str = "run") -> PidFile:
        """Take the state dir for this process, replacing a stale pid file; raise `StateDirBusy` if held."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / PID_FILE
        busy = 0
        for _ in range(10):
            temp = state_dir / f".{PID_FILE}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()  # our own leftover from an earlier attempt in this process
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can have this new file yet
                os.write(fd, f"{os.getpid()}\n{what}\n".encode())
                os.fsync(fd)
                os.link(temp, path)
            except FileExistsError:
                os.close(fd)
            except BaseException:
                os.close(fd)
                temp.unlink()
                raise
            else:
                temp.unlink()
                return cls(path, fd)
            temp.unlink()
            try:
                cls._remove_if_stale(path)
            except StateDirBusy:
                busy += 1
                if busy >= 3:
                    raise
                time.sleep(0.05)  # `holder()` in another command may be testing the lock for an instant
        raise RelayError(f"could not take {path}: it keeps changing (several relays starting at once?)")

    @staticmethod
    def _remove_if_stale(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # its holder removed it meanwhile: try again
        try:
            if not _locked(fd):
                holder = _read(fd)
                raise StateDirBusy(path, holder.pid, holder.what)
            try:
                same = os.fstat(fd).st_ino == path.stat().st_ino
            except FileNotFoundError:
                return
            if same:  # still the file under that name, and nobody holds it: left by a dead process
                holder = _read(fd)
                log.warning("stale_pid_file_replaced", path=str(path), pid=holder.pid,
                            hint="the previous relay did not stop cleanly; its journal is intact")
                path.unlink()
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == self.path.stat().st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # closing drops the lock

    def __enter__(self) -> PidFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(state_dir: Path) -> Holder | None:
    """The live process holding the state dir's pid file, or None (no file, or a stale one)."""
    path = state_dir / PID_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if _locked(fd):
            return None  # nobody holds it: stale
        return _read(fd)
    finally:
        os.close(fd)
