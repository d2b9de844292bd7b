"""The destination contract: what a plugin implements and what the delivery loop hands it.

A destination makes one attempt per `send(batch)` and says how it went with a result. The delivery loop
(`relay.delivery`) owns everything else: batching, retries and backoff, filtering, the dead-letter store,
offsets and metrics. That is what keeps a destination small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

import orjson

from relay.context import Context
from relay.settings import Settings

__all__ = [
    "Batch",
    "BatchDefaults",
    "Delivered",
    "Destination",
    "Entry",
    "Halted",
    "Rejected",
    "Result",
    "RetryLater",
]


class Entry(NamedTuple):
    """One journaled audit entry, as a destination receives it (a tuple: cheap to make by the thousand)."""

    seq: int
    """Position in the journal: unique, increasing, never reused."""
    data: bytes
    """The entry as compact JSON, exactly as it arrived (minus the destination's `drop_fields`)."""
    occurred_at: float
    """The entry's `occurred_at` as Unix seconds (with microseconds)."""
    action: str
    actor_type: str = ""
    """The entry's `actor.type` (what filters and indexed fields most often need, without parsing)."""

    def value(self) -> Any:
        """The entry parsed into Python objects."""
        return orjson.loads(self.data)


@dataclass(frozen=True)
class Batch:
    """Entries handed to a destination at once, with an identity that survives crashes.

    The boundaries (`first_seq`, `last_seq`) are recorded in the journal before the first attempt; after a
    restart the same batch is rebuilt from them and sent first. Derive object keys and idempotency ids from
    `id`, never from the clock.
    """

    destination: str
    first_seq: int
    last_seq: int
    entries: Sequence[Entry]
    attributes: Mapping[str, str] = field(default_factory=dict)
    """What the destination's `describe()` returned when the batch was first formed (persisted)."""
    attempt: int = 1

    @property
    def id(self) -> str:
        return f"{self.first_seq:020d}-{self.last_seq:020d}"

    @cached_property
    def nbytes(self) -> int:
        return sum(len(entry.data) for entry in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def slice(self, start: int, stop: int) -> Batch:
        """A sub-batch of `entries[start:stop]`, whose boundaries (and so `id`) are its own entries'."""
        part = self.entries[start:stop]
        if not part:
            raise ValueError("empty slice of a batch")
        return Batch(self.destination, part[0].seq, part[-1].seq, part, self.attributes, self.attempt)


@dataclass(frozen=True, slots=True)
class Delivered:
    """Every entry of the batch was accepted by the receiver."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """A transient failure (network, timeout, 429, 5xx): the same batch is tried again after a backoff."""

    reason: str
    after: float | None = None
    """Seconds the server asked us to wait (Retry-After), if it said."""


@dataclass(frozen=True, slots=True)
class Halted:
    """A configuration or credential problem (401, 403, missing bucket): retried slowly until fixed."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The receiver refused specific entries; they go to the dead-letter store with their reason.

    `reasons` maps indexes into `batch.entries` to why each was refused. Entries before `resend_from` that are
    not in `reasons` were delivered; entries from `resend_from` on were not and are sent again. Without
    `resend_from`, every entry not in `reasons` was delivered.
    """

    reasons: Mapping[int, str]
    resend_from: int | None = None


Result = Delivered | RetryLater | Halted | Rejected


@dataclass(frozen=True)
class BatchDefaults:
    """A destination type's default batch limits; users override them under `batch:`."""

    max_entries: int = 500
    max_bytes: int = 1024 * 1024
    max_wait: float = 1.0


class Destination:
    """Base class of destination plugins: set `type_name` and `Settings`, implement `send()`."""

    type_name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    batch_defaults: ClassVar[BatchDefaults] = BatchDefaults()
    concurrency_default: ClassVar[int] = 1
    """Batches in flight at once unless the user sets `concurrency`; offsets still commit in order."""

    @classmethod
    def default_concurrency(cls, settings: Any) -> int:
        """`concurrency_default`, or a value that depends on the settings (a mode that holds each batch
        longer, such as waiting for an acknowledgement, needs more batches in flight)."""
        return cls.concurrency_default

    def __init__(self, context: Context, settings: Any) -> None:
        self.context = context
        self.name = context.name
        self.settings = settings
        self.log = context.log

    async def open(self) -> None:
        """Build clients and connections. Failing here is retried like a failed send."""

    def describe(self, batch: Batch) -> dict[str, str]:
        """Attributes to record with a new batch's boundaries (an object key, say); kept across restarts."""
        return {}

    def attempt_timeout(self, send_timeout: float) -> float:
        """How long the delivery loop lets one `send()` run before retrying the batch. `send_timeout` unless
        success legitimately takes longer (waiting for the receiver to confirm the batch is stored)."""
        return send_timeout

    async def send(self, batch: Batch) -> Result:
        """Make one attempt to deliver `batch`; never sleep or retry here."""
        raise NotImplementedError

    async def check(self) -> str:
        """Test connectivity and credentials without sending an entry; raise `CheckFailed` on failure."""
        return "no check available for this destination type"

    async def close(self) -> None:
        """Release clients and connections."""
