"""The plugins' httpx client frees each exchange (and its request body) by reference counting, not only at a
full garbage collection: httpx's response -> stream -> response cycle is ended once a response is closed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import httpx
import pytest

from relay.http_client import AsyncClient, release


@pytest.fixture
def collector_off() -> Iterator[None]:
    """With the cyclic collector off, only reference counting frees anything: a cycle stays."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _transport() -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, json={"text": "Success", "code": 0}))


async def test_a_read_response_and_its_request_body_are_freed_when_let_go(collector_off: None) -> None:
    async with AsyncClient(transport=_transport()) as client:
        response = await client.post("http://hec.test/services/collector/event", content=b"x" * 100_000)
        assert response.json() == {"text": "Success", "code": 0}
        exchange = weakref.ref(response), weakref.ref(response.request)
        del response
        assert [ref() for ref in exchange] == [None, None]


async def test_httpx_s_own_client_keeps_them_in_a_cycle(collector_off: None) -> None:
    """Why `AsyncClient` exists (if httpx ends the cycle itself, this fails and the subclass can go)."""
    async with httpx.AsyncClient(transport=_transport()) as client:
        response = await client.post("http://hec.test/services/collector/event", content=b"x" * 100_000)
        exchange = weakref.ref(response)
        del response
        assert exchange() is not None
    gc.collect()


class _Chunks(httpx.AsyncByteStream):
    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield b"ok"


async def test_a_streamed_response_is_freed_once_closed_and_released(collector_off: None) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=_Chunks()))
    async with AsyncClient(transport=transport) as client:
        request = client.build_request("POST", "http://hook.test/", content=b"y" * 100_000)
        response = await client.send(request, stream=True)
        release(response)  # still open: it needs its stream until closed, so nothing changes yet
        assert not response.is_closed and await response.aread() == b"ok"
        await response.aclose()
        release(response)
        exchange = weakref.ref(response)
        del response, request
        assert exchange() is None
