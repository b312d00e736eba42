"""What every HTTP provider shares: the client session, failure mapping, ``retry-after``, SSE framing.

Not a provider (its name starts with ``_``, so the registry skips it). Usage::

    class AcmeLLM(HTTPClient):
        async def stream(self, messages, tools=()):
            with provider_errors(self.name):
                async with self.request("POST", url, json=body) as response:
                    await raise_for_status(self.settings, response)
                    async for event, data in sse_events(response):
                        ...

aiohttp rather than httpx on this path: under hundreds of concurrent calls httpcore's pool hands
one idle connection to several waiting requests and requeues the losers (encode/httpcore#822),
which the load benchmark measured as 270–900 ms p99 waits; aiohttp's pool and C parser keep each
request at a few hundred microseconds of CPU. Every response is read to its end so its connection
is reused.

Every request goes through :meth:`HTTPClient.request`, which logs its timing at debug (``VOXRAY_LOG_LEVEL=debug``):
the time to the response's first byte (its status line) and to the end of the exchange, with the call id
the gateway's log filter puts on every line; the path is logged, never the query or a header.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import aiohttp

from pipeline.audio import pcm_to_wav
from pipeline.jsonutil import loads
from pipeline.providers.base import Probe, ProviderError, ProviderSettings, ToolCall, closing

__all__ = ["HTTPClient", "json_event", "log_timing", "open_session", "pcm_chunks", "provider_errors",
           "raise_for_status", "retry_after", "sse_events", "status_error", "tool_call"]

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

    @contextlib.asynccontextmanager
    async def request(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """``self._http.request`` with the vendor's auth headers and the read timeout, timed: at debug, one
        line per request with the time to its first byte and its total (see the module's docstring)."""
        started = time.perf_counter()
        first_byte: float | None = None
        status = 0
        try:
            async with self._http.request(method, url, headers={**self._headers, **kwargs.pop("headers", {})},
                                          timeout=self._timeout, **kwargs) as response:
                first_byte, status = time.perf_counter() - started, response.status
                yield response
        finally:
            log_timing(self.name, f"{method} {urlparse(url).path}", status, first_byte, time.perf_counter() - started)

    async def probe(self, probe: Probe, stage: str) -> str:
        """``probe``'s request: "ok", "key rejected (401)", "unreachable (DNS|connect|timeout)", "model not
        found" or "failed (...)" (``voxray check-config --probe``)."""
        try:
            async with self.request("GET", f"{self._url}{probe.path}") as response:
                status, body = response.status, await response.read()
        except TimeoutError:
            return "unreachable (timeout)"
        except aiohttp.ClientConnectorDNSError:
            return "unreachable (DNS)"
        except (aiohttp.ClientConnectionError, OSError):
            return "unreachable (connect)"
        except aiohttp.ClientError as exc:
            return f"failed ({type(exc).__name__})"
        if status in (401, 403):
            return f"key rejected ({status})"
        if status >= 400:
            return f"failed (HTTP {status})"
        if probe.models_of is None or stage not in probe.model_stages:
            return "ok"
        try:
            names = {str(name).removeprefix("models/") for name in probe.models_of(json.loads(body))}
        except (ValueError, KeyError, TypeError, AttributeError):
            return "failed (the answer lists no models)"
        return "ok" if self.settings.model.removeprefix("models/") in names else "model not found"

    async def post_wav(self, url: str, pcm: bytes, sample_rate: int, fields: Mapping[str, str], *,
                       text_of: Callable[[Any], Any], message_of: Callable[[Any], Any] | None = None) -> str:
        """POST one utterance as ``file`` (a WAV) with the form ``fields`` and return ``text_of(answer)``
        stripped (a batch STT vendor's transcription endpoint); failures leave as ProviderError.

        Usage (in an STT provider)::

            return await self.post_wav(f"{self._url}/v1/speech-to-text", pcm, 16000, {"model_id": "scribe_v1"},
                                       text_of=lambda answer: answer["text"])
        """
        form = aiohttp.FormData()
        for key, value in fields.items():
            form.add_field(key, value)
        form.add_field("file", pcm_to_wav(pcm, sample_rate), filename="utterance.wav", content_type="audio/wav")
        with provider_errors(self.name):
            async with self.request("POST", url, data=form) as response:
                await raise_for_status(self.settings, response, message_of=message_of or _error_message)
                body = await response.read()
        try:
            return str(text_of(json.loads(body))).strip()
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ProviderError(self.name, "transcription response has no text") from exc

    async def post_pcm(self, url: str, body: Mapping[str, Any], *, params: Mapping[str, str] | None = None,
                       message_of: Callable[[Any], Any] | None = None) -> AsyncIterator[bytes]:
        """POST ``body`` as JSON and stream the raw PCM16 answer in whole samples (a TTS vendor's speech
        endpoint); failures leave as ProviderError, errors through ``raise_for_status(message_of=...)``.

        Usage (in a TTS provider)::

            def synthesize(self, text, *, voice=None, language=None):
                return self.post_pcm(f"{self._url}/v1/speak", {"text": text}, params={"encoding": "linear16"})
        """
        with provider_errors(self.name):
            async with self.request("POST", url, json=body, params=params) as response:
                await raise_for_status(self.settings, response, message_of=message_of or _error_message)
                async with closing(pcm_chunks(response)) as chunks:
                    async for chunk in chunks:
                        yield chunk


def log_timing(provider: str, what: str, status: int, first_byte_s: float | None, total_s: float) -> None:
    """One debug line for a finished provider exchange: what, its status, time to first byte and total
    (``first byte -`` when none came). The call id is added by the gateway's log filter."""
    if logger.isEnabledFor(logging.DEBUG):
        first = "-" if first_byte_s is None else f"{first_byte_s * 1000:.0f} ms"
        logger.debug("%s %s: status %s, first byte %s, total %.0f ms", provider, what, status or "-", first,
                     total_s * 1000)


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
    raise status_error(settings, response.status, message, response.headers, refused=refused_key(payload),
                       delay=lambda: delay(payload))


def status_error(settings: ProviderSettings, status: int, message: str, headers: Mapping[str, str], *,
                 refused: bool = False, delay: Callable[[], float | None] = lambda: None) -> ProviderError:
    """The ProviderError for an HTTP status (a response's, or a refused WebSocket handshake's): 401/403
    (or ``refused``) is a refused key naming the key variable; 408, 429 and 5xx are transient, waiting
    ``retry-after`` (else ``delay()``); anything else is permanent. The key is struck from ``message``.

    >>> str(status_error(ProviderSettings("acme", "m", key_env="ACME_API_KEY"), 401, "bad key", {}))
    'acme: HTTP 401: bad key (the key was refused: check ACME_API_KEY or api_keys.acme)'
    """
    if settings.api_key:
        message = message.replace(settings.api_key, "***")
    name = settings.name
    if status in (401, 403) or refused:
        where = f"{settings.key_env} or api_keys.{name}" if settings.key_env else f"api_keys.{name}"
        return ProviderError(name, f"HTTP {status}: {message} (the key was refused: check {where})")
    if status in (408, 429) or status >= 500:
        wait = retry_after(headers)
        return ProviderError(name, f"HTTP {status}: {message}", transient=True,
                             retry_after=wait if wait is not None else delay())
    return ProviderError(name, f"HTTP {status}: {message}")


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
