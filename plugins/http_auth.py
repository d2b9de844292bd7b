"""Who may push entries to the `http` source: bearer tokens, a custom static header, a WorkOS signature.

Every comparison runs in constant time over every configured token (SHA-256 both sides, then
`hmac.compare_digest`), so neither timing nor token length tells a caller how close it came. Missing
credentials answer 401 with `WWW-Authenticate`; credentials that are present but wrong answer 403. The
reasons name what was wrong, never a token.

Log events: `http_token_generated` (the token file's path, never the token) when `generate_token`
creates one; `http_token_file_permissions` when a token file can be read by other users.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

import relay

__all__ = ["AuthSettings", "Authenticator", "Denied", "load_tokens", "sign"]

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
REALM = 'realm="audit-relay"'


class AuthSettings(relay.Settings):
    bearer_tokens: list[relay.Secret] = []
    """Accepted `Authorization: Bearer <token>` values; several, so a token can be rotated without a gap."""
    bearer_tokens_file: Path | None = None
    """A file of accepted tokens, one per line (`#` comments), read at start."""
    generate_token: bool = False
    """Create the tokens file with one random token at first start (mode 0600) and print it on a terminal.
    Without `bearer_tokens_file` the file is `<state_dir>/<source name>.token`."""
    header: str | None = None
    """A custom header that must carry `value` (e.g. `X-Relay-Key`), instead of bearer tokens."""
    value: relay.Secret | None = None
    signature_secret: relay.Secret | None = None
    """Also require a valid `WorkOS-Signature: t=<unix ms>, v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    signature_tolerance: relay.Duration = Field(default=180.0, gt=0)
    """How far a signature's timestamp may be from this host's clock (either way)."""

    @model_validator(mode="after")
    def _one_scheme(self) -> AuthSettings:
        if (self.header is None) != (self.value is None):
            raise ValueError("`header` and `value` go together: set both or neither")
        if self.header is not None and not _HEADER_NAME.match(self.header):
            raise ValueError(f"header {self.header[:60]!r} is not a valid HTTP header name")
        if self.bearer and self.header is not None:
            raise ValueError("choose bearer tokens or a custom `header`, not both")
        if not (self.bearer or self.header or self.signature_secret):
            raise ValueError("no credentials configured: set bearer_tokens, bearer_tokens_file (or generate_token),"
                             " header + value, or signature_secret; write `auth: none` to accept anyone")
        return self

    @property
    def bearer(self) -> bool:
        return bool(self.bearer_tokens or self.bearer_tokens_file or self.generate_token)


@dataclass(frozen=True)
class Denied:
    status: int
    """401: credentials missing; 403: present but wrong."""
    reason: str
    challenge: str | None = None
    """The `WWW-Authenticate` value for a 401."""


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Authenticator:
    """Checks a request's credentials against the configured scheme; `None` settings means `auth: none`."""

    def __init__(self, settings: AuthSettings | None, tokens: Sequence[relay.Secret] = ()) -> None:
        self.settings = settings
        self._tokens = [_digest(t.reveal().encode()) for t in tokens]
        self._header = settings.header.lower().encode() if settings and settings.header else None
        self._value = _digest(settings.value.reveal().encode()) if settings and settings.value else None
        self._secret = settings.signature_secret.reveal().encode() if settings and settings.signature_secret else None
        if settings is not None and settings.bearer and not self._tokens:
            raise ValueError("bearer authentication is configured but no token was loaded")

    def describe(self) -> str:
        if self.settings is None:
            return "none"
        parts = []
        if self._tokens:
            parts.append(f"bearer ({len(self._tokens)} token{'s' * (len(self._tokens) != 1)})")
        if self._header is not None:
            parts.append(f"header {self.settings.header}")
        if self._secret is not None:
            parts.append("WorkOS-Signature")
        return " + ".join(parts)

    def check_headers(self, headers: dict[bytes, bytes]) -> Denied | None:
        """Bearer token or custom header; `headers` has lower-case names."""
        if self._tokens:
            given = headers.get(b"authorization")
            scheme, _, token = (given or b"").strip().partition(b" ")
            if given is None or scheme.lower() != b"bearer" or not token.strip():
                what = "missing" if given is None else "not a bearer token"
                return Denied(401, f"the Authorization header is {what}: send `Authorization: Bearer <token>`",
                              f"Bearer {REALM}")
            if not self._matches(self._tokens, token.strip()):
                return Denied(403, "the bearer token is not accepted")
        if self._header is not None and self._value is not None:
            given = headers.get(self._header)
            if given is None:
                return Denied(401, f"the {self.settings.header} header is missing",  # type: ignore[union-attr]
                              f'Header {REALM}, header="{self.settings.header}"')  # type: ignore[union-attr]
            if not self._matches([self._value], given.strip()):
                return Denied(403, f"the {self.settings.header} header's value is not accepted")  # type: ignore[union-attr]
        return None

    @staticmethod
    def _matches(accepted: list[bytes], given: bytes) -> bool:
        digest = _digest(given)
        found = False
        for candidate in accepted:  # no early exit: every token costs the same
            found |= hmac.compare_digest(candidate, digest)
        return found

    def _signature(self, headers: dict[bytes, bytes], now: float) -> Denied | tuple[bytes, list[bytes]] | None:
        """The signature header's timestamp and `v1` values, or why it is refused (None: not required)."""
        if self._secret is None:
            return None
        assert self.settings is not None
        header = headers.get(b"workos-signature")
        if header is None:
            return Denied(401, "the WorkOS-Signature header is missing", f"WorkOS-Signature {REALM}")
        fields: dict[bytes, list[bytes]] = {}
        for item in header.split(b","):
            key, _, value = item.strip().partition(b"=")
            fields.setdefault(key.strip().lower(), []).append(value.strip())
        timestamps, signatures = fields.get(b"t", []), fields.get(b"v1", [])
        if len(timestamps) != 1 or not timestamps[0].isdigit() or not signatures:
            return Denied(403, "the WorkOS-Signature header is malformed (expected `t=<unix ms>, v1=<hex>`)")
        skew = abs(now - int(timestamps[0]) / 1000)
        if skew > self.settings.signature_tolerance:
            return Denied(403, f"the WorkOS-Signature timestamp is {skew:.0f}s away from this host's clock "
                               f"(tolerance {self.settings.signature_tolerance:g}s): stale or replayed")
        return timestamps[0], signatures

    def check_signature_header(self, headers: dict[bytes, bytes], now: float) -> Denied | None:
        """What can be refused before the body is read: a missing, malformed or stale signature."""
        found = self._signature(headers, now)
        return found if isinstance(found, Denied) else None

    def check_signature(self, headers: dict[bytes, bytes], body: bytes, now: float) -> Denied | None:
        """WorkOS-Signature over the raw body (as received, before any decompression)."""
        found = self._signature(headers, now)
        if found is None or isinstance(found, Denied):
            return found
        assert self._secret is not None
        timestamp, signatures = found
        expected = hmac.new(self._secret, timestamp + b"." + body, hashlib.sha256).hexdigest().encode()
        valid = False
        for signature in signatures:
            valid |= hmac.compare_digest(expected, signature.lower())
        if not valid:
            return Denied(403, "the WorkOS-Signature does not match the body")
        return None


def sign(secret: str, body: bytes, timestamp_ms: int) -> str:
    """A `WorkOS-Signature` header value, as WorkOS computes it (for tests, the benchmark and docs)."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_ms}, v1={digest}"


def load_tokens(settings: AuthSettings, token_file: Path, log: Any) -> tuple[list[relay.Secret], str | None]:
    """The accepted bearer tokens, and the token if this call generated one (so the caller can show it once).

    `token_file` is read when `bearer_tokens_file` or `generate_token` is set (and created by the latter).
    Blocking (file I/O): call it in a worker thread.
    """
    tokens = list(settings.bearer_tokens)
    generated = None
    if settings.bearer_tokens_file is None and not settings.generate_token:
        return tokens, None
    path = token_file
    if settings.generate_token and not path.exists():
        generated = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # created meanwhile by another process: use theirs
            generated = None
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"# bearer token for audit-relay's http source; one token per line\n{generated}\n")
                f.flush()
                os.fsync(f.fileno())
            log.info("http_token_generated", file=str(path))
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read auth.bearer_tokens_file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("http_token_file_permissions", file=str(path), mode=oct(stat.S_IMODE(mode)),
                    hint=f"chmod 600 {path}")
    from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not from_file:
        raise ValueError(f"auth.bearer_tokens_file {path} holds no token")
    tokens.extend(relay.Secret(token) for token in from_file)
    return tokens, generated
