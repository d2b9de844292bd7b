"""Splunk HTTP Event Collector wire format: envelopes out, replies in, and what each reply means.

Used by the `splunk_hec` destination (`relay_plugins.splunk_hec`). The code table follows Splunk's
"Troubleshoot HTTP Event Collector" page (codes 0-22, each with its HTTP status); a request's verdict is
a `Verdict` the destination turns into a delivery result. No I/O here, so every mapping is unit-testable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

from relay.retry import parse_retry_after

__all__ = ["ENTRY_CODES", "HALT_CODES", "RETRY_CODES", "EnvelopeEncoder", "Reply", "Verdict", "judge", "read_acks",
           "read_reply"]

RETRY_CODES = frozenset({8, 9, 18, 19, 20})
"""Internal error, server busy, HEC unhealthy (queues full, ack service unavailable): try again later."""
ENTRY_CODES = frozenset({6, 12, 13, 15})
"""Invalid data format, event field required, event field blank, bad indexed fields: one envelope is bad;
the reply's `invalid-event-number` names it and the envelopes before it were indexed."""
HALT_CODES = frozenset({1, 2, 3, 4, 5, 7, 10, 11, 14, 16, 21, 22})
"""Token, index, channel or request-shape problems: nothing will change until someone fixes something."""

_HINTS: Mapping[int, str] = {
    1: "the token is disabled; enable it in Splunk (Settings > Data inputs > HTTP Event Collector)",
    2: "Splunk received no token; a proxy in between may be removing the Authorization header",
    3: "Splunk could not read the Authorization header; a proxy in between may be rewriting it",
    4: "the token is not valid; check `token` (e.g. SPLUNK_HEC_TOKEN)",
    5: "Splunk saw no data in a non-empty request; a proxy may be dropping Content-Encoding "
       "(try `compression: none`)",
    7: "the index does not exist or the token may not write to it; check `index` and the token's allowed indexes",
    10: "Splunk requires a data channel (indexer acknowledgement is on for this token) but received none; "
        "a proxy may be removing the X-Splunk-Request-Channel header",
    11: "Splunk refused the data channel; a proxy may be rewriting the X-Splunk-Request-Channel header",
    14: "indexer acknowledgement is disabled for this token; set `ack: false` or enable it on the token",
    16: "Splunk expects the token in the Authorization header; a proxy may be moving it",
    21: "the token is not valid; check `token` (e.g. SPLUNK_HEC_TOKEN)",
    22: "the token is disabled; enable it in Splunk (Settings > Data inputs > HTTP Event Collector)",
}


@dataclass(frozen=True)
class Reply:
    """One HEC answer: HTTP status plus the JSON body's fields (None when the body was not HEC JSON)."""

    status: int
    code: int | None
    text: str
    invalid_event: int | None = None
    ack_id: int | None = None
    retry_after: float | None = None
    location: str | None = None
    body: Any = field(default=None, compare=False, repr=False)
    """The parsed JSON body (the ack poll's `acks` are read from it)."""

    @property
    def label(self) -> str:
        """Bounded metric label: the HEC code, or `http_<status>` for replies without one."""
        return str(self.code) if self.code is not None else f"http_{self.status}"

    def describe(self) -> str:
        head = f"HEC code {self.code} ({self.text})" if self.code is not None else repr(self.text or "no body")
        return f"{head}, HTTP {self.status}"


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def read_reply(response: httpx.Response, secret: str) -> Reply:
    """Parse a response body leniently (proxies answer with HTML too); `secret` is masked in any text."""
    body: Any = None
    try:
        body = orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        code = _int(body.get("code"))
        text = str(body.get("text", ""))
        invalid = _int(body.get("invalid-event-number"))
        ack_id = _int(body.get("ackId"))
    else:
        code, invalid, ack_id = None, None, None
        text = " ".join(response.text.split())[:200] if response.content else ""
    if secret:
        text = text.replace(secret, "********")
    return Reply(response.status_code, code, text[:300], invalid, ack_id,
                 parse_retry_after(response.headers.get("retry-after")), response.headers.get("location"), body)


def read_acks(reply: Reply) -> dict[int, bool] | None:
    """`{"acks": {"0": true, "1": false}}` -> `{0: True, 1: False}`; None if the body is not that shape."""
    acks = reply.body.get("acks") if isinstance(reply.body, dict) else None
    if not isinstance(acks, dict):
        return None
    out: dict[int, bool] = {}
    for key, value in acks.items():
        ack_id = _int(key)
        if ack_id is not None:
            out[ack_id] = value is True
    return out


@dataclass(frozen=True)
class Verdict:
    """What a reply means for the `sent` envelopes of a request."""

    kind: Literal["accepted", "retry", "halt", "entry", "too_large"]
    reason: str = ""
    index: int | None = None
    """For `entry`: the envelope Splunk refused (those before it were indexed); None if it did not say."""


def judge(reply: Reply, sent: int, *, index: str | None = None) -> Verdict:
    """Map a reply to an /event request of `sent` envelopes onto a verdict."""
    what = reply.describe()
    code, status = reply.code, reply.status
    if 200 <= status < 300 and (code is None or code == 0):
        return Verdict("accepted")
    if code in ENTRY_CODES and status == 400:
        number = reply.invalid_event
        if number is not None and 0 <= number < sent:
            return Verdict("entry", f"{what}: Splunk refused entry {number} of the request", number)
        return Verdict("entry", f"{what}: Splunk named no valid entry (invalid-event-number "
                                f"{reply.invalid_event}) in a request of {sent}")
    if code in HALT_CODES:
        hint = _HINTS[code]
        if code == 7 and index:
            hint = f"index {index!r}: {hint}"
        return Verdict("halt", f"{what}: {hint}")
    if status == 413:
        return Verdict("too_large", f"{what}: the request was larger than Splunk accepts")
    if code in RETRY_CODES or status in (408, 429) or status >= 500:
        return Verdict("retry", what)
    if 300 <= status < 400:
        where = f" to {reply.location}" if reply.location else ""
        return Verdict("halt", f"{what}: the url redirects{where}; set `url` to the HEC address itself")
    if status in (404, 405):
        return Verdict("halt", f"{what}: no HEC event endpoint at this url; check `url` "
                               "(the base address, e.g. https://splunk.example.com:8088)")
    if status == 415:
        return Verdict("halt", f"{what}: the receiver does not accept gzip bodies; set `compression: none`")
    return Verdict("halt", f"{what}: unexpected reply")


class EnvelopeEncoder:
    """Builds one HEC envelope per entry: `time`, host/source/sourcetype/index, flat `fields`, `event`.

    `event` is the entry's own JSON, spliced in unchanged (it is already compact JSON); `time` is its
    `occurred_at` in epoch seconds with six decimals (microseconds), which Splunk keeps in `_time`.
    """

    def __init__(self, *, host: str | None, source: str | None, sourcetype: str | None, index: str | None,
                 indexed_fields: Iterable[str]) -> None:
        meta = {k: v for k, v in (("host", host), ("source", source), ("sourcetype", sourcetype),
                                  ("index", index)) if v}
        self._meta = b"," + orjson.dumps(meta)[1:-1] if meta else b""
        self._paths = [(name, tuple(name.split("."))) for name in indexed_fields]
        # `action` and `actor.type` come with every entry from the journal: no need to parse the entry.
        self._needs_parse = any(path not in _KNOWN for _, path in self._paths)
        self._middles: dict[tuple[str, str], bytes] = {}

    def encode(self, data: bytes, occurred_at: float, action: str, actor_type: str = "") -> bytes:
        return self.head(data, occurred_at, action, actor_type) + data + b"}"

    def head(self, data: bytes, occurred_at: float, action: str, actor_type: str = "") -> bytes:
        """The envelope up to the entry's JSON: `head + data + b"}"` is the envelope.

        Without indexed fields that need the entry parsed, what follows `time` depends on the action and
        actor type only: it is built once per pair (a few dozen in a real audit log), not per entry."""
        if self._needs_parse or not actor_type:
            middle = self._middle(data, action, actor_type)
        else:
            middle = self._middles.get((action, actor_type)) or self._remember(action, actor_type)
        return b'{"time":' + epoch_micros(occurred_at) + middle

    def _remember(self, action: str, actor_type: str) -> bytes:
        if len(self._middles) >= MAX_CACHED_MIDDLES:  # bounded, whatever a source sends as actions
            self._middles.clear()
        middle = self._middles[(action, actor_type)] = self._middle(b"", action, actor_type)
        return middle

    def _middle(self, data: bytes, action: str, actor_type: str) -> bytes:
        fields = self._fields(data, action, actor_type) if self._paths else None
        extra = b',"fields":' + orjson.dumps(fields) if fields else b""
        return self._meta + extra + b',"event":'

    def _fields(self, data: bytes, action: str, actor_type: str) -> dict[str, str | list[str]]:
        value = orjson.loads(data) if self._needs_parse or not actor_type else None
        out: dict[str, str | list[str]] = {}
        for name, path in self._paths:
            if path == ("action",):
                found: Any = action
            elif path == ("actor", "type") and actor_type:
                found = actor_type
            else:
                found = _walk(value, path)
            flat = _flat(found)
            if flat is not None:
                out[name] = flat
        return out


MAX_CACHED_MIDDLES = 4096
_KNOWN = {("action",), ("actor", "type")}


def epoch_micros(seconds: float) -> bytes:
    """`1715679000.123456`: exact to the microsecond (the float carries it, and `%.6f` rounds to the
    nearest, as `round(seconds * 1e6)` does, in a third of the time)."""
    if seconds >= 0:
        return b"%.6f" % seconds
    micros = round(seconds * 1_000_000)
    sign = b"-" if micros < 0 else b""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return b"%s%d.%06d" % (sign, whole, fraction)


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return orjson.dumps(value).decode()
    return None


def _flat(value: Any) -> str | list[str] | None:
    """Indexed field values must be flat (a nested object is HEC code 15): strings, or lists of them."""
    if isinstance(value, list):
        items = [s for s in (_scalar(v) for v in value) if s is not None]
        return items or None
    return _scalar(value)
