"""What the fake LLM vendors share: replies, failure modes, recorded requests, cut streams.

A vendor fake supplies its routes, its auth check, its error bodies and its SSE framing; this module
runs the failure modes the same way for each. Modes (``fake.state.fail``):

* ``"401"``, ``"403"``, ``"429"`` (with ``retry-after``), ``"500"``, any other status: that HTTP error;
* ``"hang"``: no answer until the fake stops (a client's read timeout must fire);
* ``"cut"``: half the stream, then the connection drops (no final chunk);
* ``"truncate"``: the stream ends cleanly but without the vendor's closing event.

Usage (in a vendor fake)::

    class FakeAcme(LLMFake):
        def __init__(self, **kwargs):
            super().__init__("fake Acme", [Route("/v1/chat", self.chat, methods=["POST"])], **kwargs)
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute

from tests.fakes._server import LocalServer

__all__ = ["LLMFake", "LLMFakeState", "Reply", "words"]

Reply = str | dict[str, Any]    # text, or {"content": "...", "tool_calls": [{"name": ..., "arguments": {...}}]}


def words(text: str) -> list[str]:
    """The text in word-sized deltas (each keeps its trailing space)."""
    return re.findall(r"\S+\s*", text)


@dataclass
class LLMFakeState:
    """Mutable from tests: the key, the failure mode and the replies; inspect ``requests``."""

    api_key: str | None = None
    fail: str | None = None
    retry_after: str = "3"
    token_interval_ms: float = 1
    requests: list[dict[str, Any]] = field(default_factory=list)   # {"path", "query", "headers", "body"}
    release: asyncio.Event = field(default_factory=asyncio.Event)
    replies: Iterator[Reply] = field(default_factory=lambda: itertools.cycle(["Hello!"]))

    def set_replies(self, replies: Sequence[Reply]) -> None:
        self.replies = itertools.cycle(list(replies))

    def next_reply(self) -> tuple[str, list[dict[str, Any]]]:
        reply = next(self.replies)
        if isinstance(reply, str):
            return reply, []
        return reply.get("content", ""), list(reply.get("tool_calls", []))


class LLMFake(LocalServer):
    """A vendor fake on 127.0.0.1; subclasses pass their routes."""

    def __init__(self, name: str, routes: list[BaseRoute], *, api_key: str | None = None,
                 replies: Sequence[Reply] = ("Hello!",)) -> None:
        self.state = LLMFakeState(api_key=api_key)
        self.state.set_replies(replies)
        super().__init__(name, Starlette(routes=routes))

    async def __aexit__(self, *exc: object) -> None:
        self.state.release.set()
        await super().__aexit__(*exc)

    async def gate(self, request: Request, *, authorized: bool, error: Callable[[int], Response]) -> Response | None:
        """Record the request and apply the failure mode or the key check; a Response means stop.
        ``error(status)`` is the vendor's error response for that status (401 for a refused key)."""
        body = await request.body()
        self.state.requests.append({"path": request.url.path, "query": dict(request.query_params),
                                    "headers": dict(request.headers), "body": body})
        mode = self.state.fail
        if mode == "hang":
            await self.state.release.wait()
            return error(503)
        if not authorized:
            return error(401)
        if mode and mode.isdigit():
            response = error(int(mode))
            if mode == "429" and self.state.retry_after:
                response.headers["retry-after"] = self.state.retry_after
            return response
        return None

    def sse(self, frames: Sequence[bytes], *, closing: int) -> StreamingResponse:
        """Stream server-sent ``frames`` (the last ``closing`` of them end the answer) under the failure mode."""
        return self.chunked(frames, closing=closing, media_type="text/event-stream")

    def chunked(self, frames: Sequence[bytes], *, closing: int = 0, media_type: str) -> StreamingResponse:
        """Stream ``frames`` one HTTP chunk each under the failure mode (``"cut"``; ``"truncate"`` drops the
        last ``closing`` frames, when the framing has a closing event)."""
        mode = self.state.fail
        if mode == "truncate" and closing:
            frames = frames[:-closing]

        async def body() -> AsyncIterator[bytes]:
            for i, frame in enumerate(frames):
                if mode == "cut" and i == max(1, len(frames) // 2):
                    raise ConnectionResetError("fake: the connection dropped mid-stream")
                if i:
                    await asyncio.sleep(self.state.token_interval_ms / 1000)
                yield frame

        return StreamingResponse(body(), media_type=media_type, headers={"cache-control": "no-cache"})
