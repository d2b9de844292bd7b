"""The httpx client the built-in plugins use: httpx's own, without one reference cycle.

httpx 0.28 wraps each response's stream in an object that points back at the response (to set `elapsed`
when it closes): response -> stream -> response. The response also holds its request, and the request its
body, so every request body (up to ~1 MB for a HEC batch) outlived its exchange until a full garbage
collection. Draining a 1,000,000-entry backlog to HEC, the relay's RSS swung by ~60 MiB with it (a peak of
~170 MiB). Upstream: encode/httpx#3733. Once a response is closed the cycle has done its job; `release` ends it,
so reference counting frees the exchange as soon as the caller lets it go.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["AsyncClient", "release"]

_EMPTY = httpx.ByteStream(b"")


def release(response: httpx.Response) -> None:
    """End the cycle through `response.stream` of a closed response (an open one still needs it)."""
    if response.is_closed:
        response.stream = _EMPTY


class AsyncClient(httpx.AsyncClient):
    """`httpx.AsyncClient` whose read responses (all but `stream=True` ones) are released as they return."""

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = await super().send(request, **kwargs)
        release(response)
        return response
