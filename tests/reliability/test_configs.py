"""A corpus of malformed configurations, each run through `relay check` as a subprocess.

Every file in `configs/` says in its header what is wrong with it and where (`# expect: LINE KEYPATH ::
MESSAGE`, `-` for a problem of the whole file). `relay check` must exit 2 and print exactly those problems,
each as `FILE:LINE: KEYPATH: MESSAGE`, in file order, with no traceback, and without the value of any
secret the file references (they come from the environment, as in production).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.reliability.leaks import ENV, Leaks

CONFIGS = Path(__file__).parent / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))
_EXPECT = re.compile(rb"^# expect: (\d+) (.+?) :: (.+)$")


@dataclass(frozen=True)
class Expected:
    line: int
    path: str
    message: str


@dataclass(frozen=True)
class Checked:
    returncode: int
    stdout: str
    stderr: str


def expectations(path: Path) -> list[Expected]:
    out = []
    for raw in path.read_bytes().splitlines():
        if match := _EXPECT.match(raw):
            line, key, message = match.groups()
            out.append(Expected(int(line), key.decode(), message.decode()))
    return out


def relay_check(path: Path) -> Checked:
    env = {**os.environ, **ENV}
    env.pop("HEC_TOKN", None)
    done = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(path)], capture_output=True,
                          env=env, cwd=str(ROOT), timeout=60)
    return Checked(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def checked() -> dict[Path, Checked]:
    """`relay check` of every file, four at a time (each is a fresh interpreter: ~1 s of imports)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(FILES, pool.map(relay_check, FILES), strict=True))


def test_the_corpus_is_large_and_every_file_says_what_to_expect() -> None:
    assert len(FILES) >= 30
    for path in FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_relay_check_names_file_line_and_key_path(path: Path, checked: dict[Path, Checked], leaks: Leaks) -> None:
    result = checked[path]
    output = leaks.text(f"relay check {path.name}", result.stdout + result.stderr)
    assert "Traceback" not in output
    assert result.returncode == 2, output
    assert result.stdout == ""
    expected = sorted(expectations(path), key=lambda e: (e.line, e.path))
    lines = result.stderr.splitlines()
    count = len(expected)
    assert lines[0] == f"relay: invalid configuration ({count} problem{'s' * (count != 1)}):", output
    assert len(lines) == 1 + count, output
    for want, got in zip(expected, lines[1:], strict=True):
        where = f"  {path}:{want.line}: " + ("" if want.path == "-" else f"{want.path}: ")
        assert got.startswith(where), f"expected {where!r}..., got {got!r}"
        assert want.message in got, f"expected {want.message!r} in {got!r}"


@pytest.mark.parametrize(("content", "message"), [
    (None, "/missing.env: cannot read the environment file: No such file or directory"),
    (b"HEC_TOKEN=ok\nWEBHOOK_TOKEN=\xff\xfe\n", "/bad.env:2: the environment file is not UTF-8 text"),
    (b"HEC_TOKEN ok\n", "/bad.env:1: expected KEY=VALUE"),
])
def test_an_unreadable_env_file_is_a_clear_error(tmp_path: Path, leaks: Leaks, content: bytes | None,
                                                  message: str) -> None:
    env_file = tmp_path / ("missing.env" if content is None else "bad.env")
    if content is not None:
        env_file.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "relay", "check", "--config", str(CONFIGS / "hec_url_with_path.yaml"),
                           "--env-file", str(env_file)], capture_output=True, cwd=str(ROOT), timeout=60)
    output = leaks.text("relay check --env-file", (done.stdout + done.stderr).decode(errors="replace"))
    assert done.returncode == 2 and "Traceback" not in output
    assert output.splitlines()[1].endswith(message), output
