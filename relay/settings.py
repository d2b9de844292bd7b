"""Value types for settings: the building blocks of every source's and destination's `Settings`.

`Settings` is a strict pydantic model (unknown keys are errors, values are frozen). `Secret` masks
itself everywhere it could be printed; `Duration`, `ByteSize` and `HostPort` parse the spellings
operators write in YAML (`30s`, `10MiB`, `127.0.0.1:9464`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, GetCoreSchemaHandler
from pydantic_core import core_schema

__all__ = ["ByteSize", "Duration", "HostPort", "Secret", "Settings", "parse_duration", "parse_size"]


class Settings(BaseModel):
    """Base class for every settings model: unknown keys are errors and values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_known_secrets: set[str] = set()


def known_secret_values() -> frozenset[str]:
    """Every secret value seen so far, so log output can be scrubbed of them."""
    return frozenset(_known_secrets)


class Secret:
    """A credential. `str()` and `repr()` are masked; only `reveal()` gives the value."""

    __slots__ = ("_value",)
    MASK: ClassVar[str] = "********"

    def __init__(self, value: str) -> None:
        self._value = value
        if len(value) >= 4:
            _known_secrets.add(value)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return self.MASK

    def __repr__(self) -> str:
        return f"Secret({self.MASK!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def build(value: Any) -> Secret:
            if isinstance(value, Secret):
                return value
            if not isinstance(value, str):
                raise ValueError("a secret must be a string")
            if not value:
                raise ValueError("a secret must not be empty")
            return cls(value)

        return core_schema.no_info_plain_validator_function(
            build, serialization=core_schema.plain_serializer_function_ser_schema(lambda s: cls.MASK)
        )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, None: 1,
}


def parse_duration(value: Any) -> float:
    """`30s`, `5m`, `1h`, `250ms`, `2d`; a plain number means seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{str(value)[:40]!r} is not a duration (use e.g. 500ms, 30s, 5m, 1h, 2d)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    return seconds


def parse_size(value: Any) -> int:
    """`900KiB`, `10MiB`, `1GiB`, `1MB`; a plain number means bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 900KiB or 10MiB")
    if isinstance(value, int | float):
        size = int(value)
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{str(value)[:40]!r} is not a size (use e.g. 900KiB, 10MiB, 1GiB)")
        unit = match.group(2).lower() if match.group(2) else None
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError("a size must not be negative")
    return size


def _parse_host_port(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464 or [::1]:9464)")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, parsed from `30s`, `5m`, `1h` or a number."""

ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, parsed from `900KiB`, `10MiB` or a number."""

HostPort = Annotated[str, BeforeValidator(_parse_host_port)]
"""`host:port`; split it with `split_host_port`."""


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)
