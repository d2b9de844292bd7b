"""Recognisable secret values for the reliability suite, and the scan that proves none of them leaks.

Every test in `tests/reliability/` runs with these values as its credentials (through `${VAR}`,
`${file:...}` and `$CREDENTIALS_DIRECTORY`), and the `leaks` fixture fails the test if any of them, or a
form a careless program could turn it into (base64, a Basic credential, a signing key without its
`whsec_` prefix), shows up in a log line, an error, a metric, or the output of a `relay` command.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import generate_latest

from relay.logs import configure_logging
from relay.metrics import REGISTRY

HEC_TOKEN = "hec-LEAKCHECK-7c1e9f03-token"
WEBHOOK_BEARER = "webhook-LEAKCHECK-bearer-81d2"
WEBHOOK_HEADER = "webhook-LEAKCHECK-header-5c0a"
WEBHOOK_USER = "audit-relay"
WEBHOOK_PASSWORD = "webhook-LEAKCHECK-password-77e3"
WEBHOOK_BASIC = base64.b64encode(f"{WEBHOOK_USER}:{WEBHOOK_PASSWORD}".encode()).decode()
"""The Basic credential on the wire: as bad to print as the password."""
WEBHOOK_SIGNING = "whsec_" + base64.b64encode(b"LEAKCHECK webhook signing key 01").decode()
RECEIVER_TOKEN = "receiver-LEAKCHECK-bearer-0b6f"
RECEIVER_SIGNING = "receiver-LEAKCHECK-signing-secret-4a2d"

ALL_SECRETS = (HEC_TOKEN, WEBHOOK_BEARER, WEBHOOK_HEADER, WEBHOOK_PASSWORD, WEBHOOK_BASIC, WEBHOOK_SIGNING,
               RECEIVER_TOKEN, RECEIVER_SIGNING)

ENV = {
    "HEC_TOKEN": HEC_TOKEN,
    "WEBHOOK_TOKEN": WEBHOOK_BEARER,
    "WEBHOOK_API_KEY": WEBHOOK_HEADER,
    "WEBHOOK_PASSWORD": WEBHOOK_PASSWORD,
    "WEBHOOK_SIGNING_SECRET": WEBHOOK_SIGNING,
    "RECEIVER_TOKEN": RECEIVER_TOKEN,
}
"""The environment a relay under test gets; `RECEIVER_SIGNING` arrives as a credential file instead."""


def forms(secret: str) -> set[str]:
    """The secret and the encodings of it that would be just as bad to print."""
    out = {secret, base64.b64encode(secret.encode()).decode()}
    if secret.startswith("whsec_"):
        out.add(secret.removeprefix("whsec_"))
    return {form for form in out if len(form) >= 8}


@dataclass
class Leaks:
    """What a test produced that a user could see, checked for secrets when the test ends."""

    secrets: set[str] = field(default_factory=lambda: set(ALL_SECRETS))
    texts: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    log: io.StringIO = field(default_factory=io.StringIO)
    """Every log line the relay wrote in this process (JSON, debug level, through the real scrubber)."""

    def secret(self, value: str) -> str:
        """Add a secret made at run time (moto's access keys); returns it."""
        self.secrets.add(value)
        return value

    def text(self, where: str, text: str) -> str:
        """Output to check (a command's stdout and stderr, an error message); returns it."""
        self.texts[f"{where} #{len(self.texts)}"] = text
        return text

    def file(self, where: str, path: Path) -> Path:
        """A file another process writes (a relay's log); read when the test ends."""
        self.files[where] = path
        return path

    def found(self) -> list[str]:
        """Where each secret (or a form of it) appears, as 'where: which secret ... context'."""
        texts = dict(self.texts)
        texts["log lines of the test process"] = self.log.getvalue()
        texts["/metrics"] = generate_latest(REGISTRY).decode()
        for where, path in self.files.items():
            if path.exists():
                texts[where] = path.read_text(errors="replace")
        problems = []
        for secret in sorted(self.secrets):
            for form in forms(secret):
                for where, text in texts.items():
                    at = text.find(form)
                    if at >= 0:
                        context = text[max(0, at - 80):at].replace("\n", " ")
                        problems.append(f"{where}: the secret {_hint(secret)} after ...{context!r}")
        return problems


def _hint(secret: str) -> str:
    return f"{secret[:6]}...({len(secret)} chars)"


def capture_logs(stream: io.StringIO) -> tuple[list[logging.Handler], int]:
    """Send the relay's logs (debug level, JSON) to `stream`; returns what to restore."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("debug", "json", stream)
    return saved


def restore_logs(saved: tuple[list[logging.Handler], int]) -> None:
    root = logging.getLogger()
    root.handlers[:], level = saved
    root.setLevel(level)


def assert_clean(leaks: Leaks, extra: Iterable[str] = ()) -> None:
    problems = leaks.found() + list(extra)
    assert not problems, "secrets leaked:\n  " + "\n  ".join(problems)
