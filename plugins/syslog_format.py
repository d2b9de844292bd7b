"""Syslog wire format for audit entries: RFC 5424 and RFC 3164 messages, RFC 6587 framing.

Pure functions and one `Formatter`, so every byte the `syslog` destination writes can be tested without
a socket. No metrics, no logs.

RFC 5424 message for one entry (one line here, one message on the wire):

    <PRI>1 OCCURRED_AT HOSTNAME APP-NAME PROCID MSGID [audit@32473 action=".." actor_type=".."
    actor_id=".." version=".."] BOM{"action":...the entry as compact JSON...}
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson

__all__ = [
    "BOM",
    "FACILITIES",
    "SEVERITIES",
    "Formatter",
    "frame_lf",
    "frame_octet_counting",
    "parse_facility",
    "parse_severity",
    "printable_ascii",
    "rfc3339",
    "sd_escape",
    "truncate_utf8",
]

BOM = b"\xef\xbb\xbf"
"""RFC 5424 section 6.4: a MSG in UTF-8 starts with the byte order mark."""

FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14, "solaris-cron": 15,
    **{f"local{n}": 16 + n for n in range(8)},
}
SEVERITIES: dict[str, int] = {
    "emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7,
}
_SEVERITY_ALIASES = {"emergency": 0, "panic": 0, "critical": 2, "error": 3, "warn": 4, "informational": 6}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_CONTROL = {c: " " for c in (*range(0, 32), 127)}
_SD_NEEDS_WORK = re.compile(r'[\x00-\x1f\x7f"\\\]]')
_SD_SPECIAL = str.maketrans({"\\": "\\\\", '"': '\\"', "]": "\\]"})


def parse_facility(value: Any) -> int:
    """A facility name (`authpriv`, `local0`) or number 0-23."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 23:
        return value
    if isinstance(value, str) and value.strip().lower() in FACILITIES:
        return FACILITIES[value.strip().lower()]
    raise ValueError(f"{str(value)[:40]!r} is not a syslog facility (use one of {', '.join(FACILITIES)}, "
                     f"or a number 0-23)")


def parse_severity(value: Any) -> int:
    """A severity name (`notice`, `warning`; `error`/`warn`/`critical` are accepted too) or number 0-7."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7:
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name in SEVERITIES:
            return SEVERITIES[name]
        if name in _SEVERITY_ALIASES:
            return _SEVERITY_ALIASES[name]
    raise ValueError(f"{str(value)[:40]!r} is not a syslog severity (use one of {', '.join(SEVERITIES)}, "
                     f"or a number 0-7)")


def printable_ascii(text: str, limit: int) -> str:
    """`text` as an RFC 5424 header field: printable US-ASCII (others become `_`), at most `limit`, `-` if empty."""
    if not (text.isascii() and text.isprintable() and " " not in text):
        text = "".join(c if "!" <= c <= "~" else "_" for c in text)
    return text[:limit] or "-"


def sd_escape(value: str) -> str:
    """An RFC 5424 PARAM-VALUE: `\\`, `"` and `]` escaped; control characters (a line feed, say) become
    spaces, so no framing can be broken by a structured-data value. The MSG keeps the exact JSON."""
    if _SD_NEEDS_WORK.search(value) is None:
        return value
    return value.translate(_CONTROL).translate(_SD_SPECIAL)


def rfc3339(timestamp: float) -> str:
    """Unix seconds -> `2024-05-14T09:30:00.123456Z` (UTC, microseconds: RFC 5424 allows at most six)."""
    seconds, micros = divmod(round(timestamp * 1_000_000), 1_000_000)
    return f"{_utc_second(seconds)}.{micros:06d}Z"


@lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def rfc3164_timestamp(timestamp: float) -> str:
    """Unix seconds -> `May  4 09:30:00` in local time: RFC 3164 has no year, zone or fraction."""
    t = time.localtime(timestamp)
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def frame_octet_counting(message: bytes) -> bytes:
    """RFC 6587 octet counting: `MSG-LEN SP SYSLOG-MSG`, safe for any byte in the message."""
    return b"%d %b" % (len(message), message)


def frame_lf(message: bytes) -> bytes:
    """RFC 6587 non-transparent framing: the message and a line feed.

    Compact JSON never holds a raw line feed (JSON escapes it inside strings), header fields are printable
    ASCII and structured-data values have control characters replaced, so this is only a safety net: a
    line feed between JSON tokens becomes a space, which keeps the JSON equal.
    """
    if b"\n" in message:
        message = message.replace(b"\n", b" ")
    return message + b"\n"


def truncate_utf8(message: bytes, limit: int) -> bytes:
    """The first `limit` bytes of `message`, shortened so no UTF-8 character is cut in half."""
    if len(message) <= limit:
        return message
    cut = limit
    while cut > 0 and (message[cut] & 0xC0) == 0x80:
        cut -= 1
    return message[:cut]


class Formatter:
    """Builds one syslog message per entry from the destination's settings."""

    def __init__(self, *, rfc: str, facility: int, severities: Sequence[tuple[str, int]], app_name: str,
                 hostname: str, procid: int, enterprise_number: int) -> None:
        self.rfc = rfc
        self.facility = facility
        self._rules = tuple(severities)
        self._cache: dict[str, tuple[str, str]] = {}
        self.hostname = printable_ascii(hostname, 255)
        self.app_name = printable_ascii(app_name, 48)
        self.procid = str(procid)
        self.sd_id = f"audit@{enterprise_number}"
        # RFC 3164 TAG: at most 32 characters, and ':' '[' end it.
        self._tag = printable_ascii(app_name.replace(":", "_").replace("[", "_"), 32)

    def severity(self, action: str) -> int:
        """The first matching glob's severity (the settings keep the order written); `notice` if none."""
        return next((level for glob, level in self._rules if fnmatch.fnmatchcase(action, glob)), 5)

    def _per_action(self, action: str) -> tuple[str, str]:
        """What depends only on the action (PRI, MSGID, the SD's action), worked out once per action."""
        parts = self._cache.get(action)
        if parts is None:
            pri = self.facility * 8 + self.severity(action)
            if self.rfc == "rfc3164":
                parts = (f"<{pri}>", f" {self.hostname} {self._tag}[{self.procid}]: ")
            else:
                parts = (f"<{pri}>1 ", f" {self.hostname} {self.app_name} {self.procid} "
                                       f'{printable_ascii(action, 32)} [{self.sd_id} action="{sd_escape(action)}"')
            if len(self._cache) < 10_000:
                self._cache[action] = parts
        return parts

    def message(self, data: bytes, occurred_at: float, action: str) -> bytes:
        """The syslog message (without framing) for one entry's JSON."""
        before, after = self._per_action(action)
        if self.rfc == "rfc3164":
            return f"{before}{rfc3164_timestamp(occurred_at)}{after}".encode() + data
        head = f"{before}{rfc3339(occurred_at)}{after}{self._entry_params(data)}] "
        return head.encode() + BOM + data

    @staticmethod
    def _entry_params(data: bytes) -> str:
        """` actor_type=".." actor_id=".." version=".."` from the entry; absent fields are left out."""
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            return ""
        if not isinstance(value, dict):
            return ""
        params = ""
        actor = value.get("actor")
        if isinstance(actor, dict):
            if (kind := actor.get("type")) is not None:
                params += f' actor_type="{sd_escape(_text(kind))}"'
            if (actor_id := actor.get("id")) is not None:
                params += f' actor_id="{sd_escape(_text(actor_id))}"'
        if (version := value.get("version")) is not None:
            params += f' version="{sd_escape(_text(version))}"'
        return params


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()
