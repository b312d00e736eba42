"""What every HTTP provider shares: the client session, failure mapping, ``retry-after``, SSE framing.

Not a provider (its name starts with ``_``, so the registry skips it). Usage::

    class AcmeLLM(HTTPClient):
        async def stream(self, messages, tools=()):
            with provider_errors(self.name):
                async with self._http.post(url, json=body, headers=self._headers, timeout=self._timeout) as response:
                    await raise_for_status(self.settings, response)
                    async for event, data in sse_events(response):
                        ...

aiohttp rather than httpx on this path: under hundreds of concurrent calls httpcore's pool hands
one idle connection to several waiting requests and requeues the losers (encode/httpcore#822),
which the load benchmark measured as 270–900 ms p99 waits; aiohttp's pool and C parser keep each
request at a few hundred microseconds of CPU. Every response is read to its end so its connection
is reused.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp

from pipeline.jsonutil import loads
from pipeline.providers.base import ProviderError, ProviderSettings, ToolCall, closing

__all__ = ["HTTPClient", "json_event", "open_session", "pcm_chunks", "provider_errors", "raise_for_status",
           "retry_after", "sse_events", "tool_call"]

logger = logging.getLogger(__name__)


def open_session(*, max_connections: int = 1000) -> aiohttp.ClientSession:
    """The shared client session for provider requests (one per app)."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=60,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


class HTTPClient:
    """A provider's settings, session and per-read timeout; ``_headers`` is the vendor's auth."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> None:
        self.name = settings.name
        self.settings = settings
        self._http = http
        self._url = settings.base_url.rstrip("/")
        self._headers = self.auth_headers(settings.api_key) if settings.api_key else {}
        # sock_read bounds each wait for bytes: the time to the first byte and between chunks
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout_s, 5.0), sock_read=timeout_s)

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        """The headers that carry the key (OpenAI's bearer token unless a vendor says otherwise)."""
        return {"Authorization": f"Bearer {api_key}"}

    async def post_pcm(self, url: str, body: Mapping[str, Any], *, params: Mapping[str, str] | None = None,
                       message_of: Callable[[Any], Any] | None = None) -> AsyncIterator[bytes]:
        """POST ``body`` as JSON and stream the raw PCM16 answer in whole samples (a TTS vendor's speech
        endpoint); failures leave as ProviderError, errors through ``raise_for_status(message_of=...)``.

        Usage (in a TTS provider)::

            def synthesize(self, text, *, voice=None):
                return self.post_pcm(f"{self._url}/v1/speak", {"text": text}, params={"encoding": "linear16"})
        """
        with provider_errors(self.name):
            async with self._http.post(url, json=body, params=params, headers=self._headers,
                                       timeout=self._timeout) as response:
                await raise_for_status(self.settings, response, message_of=message_of or _error_message)
                async with closing(pcm_chunks(response)) as chunks:
                    async for chunk in chunks:
                        yield chunk


@contextlib.contextmanager
def provider_errors(name: str) -> Iterator[None]:
    """Map aiohttp failures to ProviderError once, at the boundary (a cut stream is a payload error)."""
    try:
        yield
    except TimeoutError as exc:
        raise ProviderError(name, "timed out", transient=True) from exc
    except aiohttp.ClientPayloadError as exc:
        raise ProviderError(name, "the response was cut off", transient=True) from exc
    except aiohttp.ClientError as exc:
        raise ProviderError(name, f"connection failed ({type(exc).__name__})", transient=True) from exc


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date.

    >>> retry_after({"retry-after": "2"})
    2.0
    """
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value).timestamp()
            return max(0.0, when - (time.time() if now is None else now))
    except (ValueError, TypeError, OverflowError):
        return None


def _error_message(payload: Any) -> Any:
    """The message of an OpenAI-style error body, ``{"error": {"message": ...}}`` (Anthropic, Gemini too)."""
    return payload["error"]["message"]


async def raise_for_status(settings: ProviderSettings, response: aiohttp.ClientResponse, *,
                           refused_key: Callable[[Any], bool] = lambda _payload: False,
                           delay: Callable[[Any], float | None] = lambda _payload: None,
                           message_of: Callable[[Any], Any] = _error_message) -> None:
    """Raise the ProviderError for an HTTP failure: 401/403 (or ``refused_key(body)``) is a refused key,
    not transient, naming the key variable; 408, 429 and 5xx are transient with the vendor's retry delay
    (``retry-after``, else ``delay(body)``); anything else is permanent. ``message_of(body)`` picks the
    vendor's message out of its JSON error (the raw body when it has none). The key is never in the text.

    Usage (a vendor whose errors are ``{"detail": {"message": ...}}``)::

        await raise_for_status(self.settings, response, message_of=lambda body: body["detail"]["message"])
    """
    if response.status < 400:
        return
    body = (await response.read())[:2000]
    try:
        payload: Any = json.loads(body)
    except ValueError:
        payload = None
    try:
        message = str(message_of(payload))
    except (KeyError, TypeError, IndexError, AttributeError):
        message = body[:500].decode("utf-8", "replace")
    if settings.api_key:
        message = message.replace(settings.api_key, "***")
    name = settings.name
    if response.status in (401, 403) or refused_key(payload):
        where = f"{settings.key_env} or api_keys.{name}" if settings.key_env else f"api_keys.{name}"
        raise ProviderError(name, f"HTTP {response.status}: {message} (the key was refused: check {where})")
    if response.status in (408, 429) or response.status >= 500:
        wait = retry_after(response.headers)
        raise ProviderError(name, f"HTTP {response.status}: {message}", transient=True,
                            retry_after=wait if wait is not None else delay(payload))
    raise ProviderError(name, f"HTTP {response.status}: {message}")


async def pcm_chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """A raw PCM16 body as it arrives, each chunk a whole number of samples (an odd trailing byte waits
    for the next chunk; one left at the end, half a sample, is dropped).

    Usage::

        async for chunk in pcm_chunks(response):   # len(chunk) % 2 == 0
            yield chunk
    """
    odd = b""
    async for chunk in response.content.iter_any():
        chunk = odd + chunk
        cut = len(chunk) & ~1
        odd = chunk[cut:]
        if cut:
            yield chunk[:cut]


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """``(event, data)`` per server-sent event (``event`` is "" when the event has no name; data lines
    are joined with newlines); comments and ids are skipped."""
    event, data = "", list[bytes]()
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = "", []
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
    if data:
        yield event, b"\n".join(data)


def json_event(name: str, data: bytes) -> Any:
    """One event's JSON payload; a payload that is not JSON is a broken stream (transient)."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ProviderError(name, "stream event is not JSON", transient=True) from exc


def tool_call(provider: str, name: str, arguments: str, call_id: str = "") -> ToolCall | None:
    """The ToolCall for a streamed call's JSON arguments; None (and a warning) when they are not JSON."""
    try:   # the model writes these, steered by what the caller says: never trust their shape
        parsed = loads(arguments or "{}")
    except ValueError:
        logger.warning("%s: tool call %s has arguments that are not JSON; ignored", provider, name)
        return None
    return ToolCall(name, parsed if isinstance(parsed, dict) else {}, call_id)
