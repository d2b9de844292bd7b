"""A real webhook receiver for the tests, served by hypercorn on 127.0.0.1.

It checks every signature independently of the relay's code: with the `standardwebhooks` package from
PyPI, and with a verifier written here from the Standard Webhooks specification for bodies that package
cannot take (gzip bytes are not text). It keeps a receiver's dedupe view (`processed`: the entries of the
first accepted request of each `webhook-id`), and answers whatever a test scripts: 429 with Retry-After,
500, 401, 413 for a poisoned entry, redirects.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay import asgi

POISON = "POISONED-ENTRY"
"""An entry whose JSON contains this is refused with 413 wherever it appears."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    processed: bool = False
    """Take the entries, then answer this anyway (as when a proxy times out after the receiver is done)."""


@dataclass
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    """The body exactly as sent (compressed, if it was)."""
    entries: list[Any]
    status: int = 0
    verified_by: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")


def verify_from_spec(secret: str, headers: dict[str, str], raw: bytes) -> bool:
    """Standard Webhooks: some `v1,<sig>` equals base64(HMAC-SHA256(base64decode(secret), "id.ts.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.partition(",")[2] for s in headers.get("webhook-signature", "").split(" ") if s.startswith("v1,")]
    return any(hmac.compare_digest(candidate, expected) for candidate in offered)


def verify_with_library(secret: str, headers: dict[str, str], raw: bytes) -> bool:
    try:
        Webhook(secret).verify(raw, headers, json_parse=False)
    except WebhookVerificationError:
        return False
    return True


class Receiver:
    def __init__(self) -> None:
        self.url = ""
        self.verifiers: dict[str, str] = {}
        """name -> whsec secret; a request must verify with every one of them or it is answered 401."""
        self.expect_authorization: str | None = None
        self.script: deque[Answer | None] = deque()
        """Answers for the next POST/PUT requests, in order; None means "handle normally"."""
        self.always: Answer | None = None
        self.redirects: dict[str, Answer] = {}
        self.options_status = 204
        self.requests: list[Received] = []
        self.processed: dict[str, list[Any]] = {}
        self.duplicates = 0
        self._changed = trio.Event()

    # -- what the tests look at -------------------------------------------------------------------------

    def processed_entries(self) -> list[Any]:
        return [entry for entries in self.processed.values() for entry in entries]

    def deliveries(self) -> list[Received]:
        return [r for r in self.requests if r.method in ("POST", "PUT")]

    async def wait_for(self, predicate: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
        """Wait until `predicate()` holds, re-checking after every request (no polling)."""
        with trio.move_on_after(deadline):
            while not predicate():
                await self._changed.wait()
            return
        raise AssertionError(f"the receiver did not see {what} within {deadline}s")

    # -- the ASGI app -----------------------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        received = Received(scope["method"], scope["path"], headers, raw, [])
        answer = self._answer(received)
        received.status = answer.status
        self.requests.append(received)
        self._changed.set()
        self._changed = trio.Event()
        await asgi.respond(send, answer.status, answer.body, "application/json",
                           [(k.encode(), v.encode()) for k, v in answer.headers])

    def _answer(self, received: Received) -> Answer:
        if received.path in self.redirects:
            return self.redirects[received.path]
        if received.method in ("OPTIONS", "HEAD"):
            return self.always or Answer(self.options_status if received.method == "OPTIONS" else 200)
        if self.always is not None:
            return self.always
        if self.expect_authorization and received.headers.get("authorization") != self.expect_authorization:
            return Answer(401, b'{"error": "bad credentials"}')
        body = received.raw
        if received.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        for name, secret in self.verifiers.items():
            if self._verifies(secret, received):
                received.verified_by.append(name)
        if len(received.verified_by) < len(self.verifiers):
            return Answer(401, b'{"error": "signature verification failed"}')
        received.entries = _parse(body, received.headers.get("content-type", ""))
        if self.script:
            scripted = self.script.popleft()
            if scripted is not None:
                if scripted.processed:
                    self._process(received)
                return scripted
        if any(POISON in json.dumps(entry) for entry in received.entries):
            # Echo a credential back, as careless receivers do, so the tests can see it scrubbed.
            echo = received.headers.get("authorization", "")
            return Answer(413, f'{{"error": "entry too large", "auth_seen": "{echo}"}}'.encode())
        self._process(received)
        return Answer(200, b'{"ok": true}')

    def _process(self, received: Received) -> None:
        """Take the entries once per webhook-id, as the docs tell receivers to."""
        if received.id in self.processed:
            self.duplicates += 1
        else:
            self.processed[received.id] = received.entries

    @staticmethod
    def _verifies(secret: str, received: Received) -> bool:
        headers, raw = received.headers, received.raw
        if headers.get("content-encoding") == "gzip":
            return verify_from_spec(secret, headers, raw)
        by_library = verify_with_library(secret, headers, raw)
        assert by_library == verify_from_spec(secret, headers, raw), "the two verifiers disagree"
        return by_library


def _parse(body: bytes, content_type: str) -> list[Any]:
    if content_type.startswith("application/x-ndjson"):
        return [json.loads(line) for line in body.splitlines() if line]
    value = json.loads(body)
    return value if isinstance(value, list) else [value]


async def start_receiver(nursery: trio.Nursery, *, cert_file: str | None = None,
                         key_file: str | None = None) -> Receiver:
    """A receiver listening on a free port of 127.0.0.1 until `nursery` ends."""
    receiver = Receiver()
    config = asgi.hypercorn_config("127.0.0.1:0", cert_file=cert_file, key_file=key_file)
    addresses = await nursery.start(asgi.serve, receiver.app, config)
    receiver.url = addresses[0]
    return receiver
