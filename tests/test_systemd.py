"""The shipped unit file: `systemd-analyze verify` says nothing about it, and its security score is <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

UNIT = ROOT / "systemd" / "audit-relay.service"
SHIPPED_EXEC = "/opt/audit-relay/bin/relay"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (.ci/run installs systemd)")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this virtualenv's `relay` (verify needs an executable there)."""
    relay = Path(sys.executable).parent / "relay"
    assert relay.exists(), "pip install -e . provides the relay script"
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} run --config /etc/audit-relay/relay.yaml" in text
    path = tmp_path / "audit-relay.service"
    path.write_text(text.replace(SHIPPED_EXEC, str(relay)))
    return path


def test_verify_prints_nothing(unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_is_not_blind(tmp_path: Path, unit: Path) -> None:
    """A typo'd key only warns (exit 0): the empty-stderr assertion above is what catches it."""
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectClock=yes", "ProtectClok=yes"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "Unknown key 'ProtectClok'" in result.stderr


def test_security_score_is_at_most_2(unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    match = re.search(r"Overall exposure level for audit-relay\.service: (\d+\.\d)", result.stdout)
    assert match and float(match.group(1)) <= 2.0, result.stdout[-500:]


def test_unit_has_what_the_relay_relies_on() -> None:
    directives = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                      if "=" in line and not line.startswith("#"))
    assert directives["Type"] == "notify", "READY=1 is sent once the journal is open and sources have started"
    assert directives["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert directives["StateDirectory"] == "audit-relay", "the default state_dir is $STATE_DIRECTORY"
    assert "AF_UNIX" in directives["RestrictAddressFamilies"], "sd_notify needs AF_UNIX"
    assert directives["LoadCredential"] == "relay:/etc/audit-relay/credentials"
    assert int(directives["TimeoutStopSec"].rstrip("s")) > 30, "longer than the default shutdown_timeout"
