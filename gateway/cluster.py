"""Several instances acting as one: a control bus between them, and sessions kept in the shared store.

A call lives on the instance whose media socket it arrived on, but ``DELETE /sessions/{id}``,
``/transfer`` and ``/dtmf`` may land on any instance behind the load balancer. The instance that
receives such a request and does not hold the call asks the others over Redis pub/sub; the one
holding it acts and answers. With the memory store there is one instance and nobody to ask.

Redis may go away for a while: live calls do not need it (their state is in memory), and
:func:`keep_sessions` writes every live call's session back (``SET NX``) and replays the removals
that failed, so a Redis restarted empty is consistent again within ``session_sync_secs``.

Usage::

    bus = RedisControlBus(url, instance_id="a1b2", timeout_s=2.0)
    await bus.start(handler)                       # handler(op, session_id, args) -> reply | None
    reply = await bus.request("end", session_id, {})   # None: no instance holds that call
    await bus.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio

    from gateway.sessions import Session, SessionStore

__all__ = ["ControlBus", "Handler", "LocalControlBus", "RedisControlBus", "keep_sessions"]

logger = logging.getLogger(__name__)

# op, session id, arguments -> the reply (a JSON object), or None when this instance does not hold the call
Handler = Callable[[str, str, Mapping[str, Any]], Awaitable["dict[str, Any] | None"]]


class ControlBus:
    """Interface: reach the instance that holds a call."""

    instance_id: str = ""

    async def start(self, handler: Handler) -> None: return None
    async def request(self, op: str, session_id: str, args: Mapping[str, Any]) -> dict[str, Any] | None: return None
    async def close(self) -> None: return None


class LocalControlBus(ControlBus):
    """One instance (memory store): a call not held here does not exist anywhere."""


class RedisControlBus(ControlBus):
    """Requests on ``voxray:control`` (every instance listens); replies on ``voxray:reply:<instance>``.

    Only the instance holding the call answers; when none answers within ``timeout_s`` (or no other
    instance is listening at all) :meth:`request` returns None. The listener survives Redis outages:
    it reconnects with backoff, logging the outage once and the recovery once."""

    CHANNEL = "voxray:control"
    REPLY_PREFIX = "voxray:reply:"

    def __init__(self, url: str, *, instance_id: str | None = None, timeout_s: float = 2.0,
                 connect_timeout_s: float = 0.5) -> None:
        import redis.asyncio

        self.instance_id = instance_id or secrets.token_hex(6)
        self._timeout = timeout_s
        # no read timeout: a subscriber waits for messages; a dead server shows as a reset connection
        self._redis: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=None, health_check_interval=10)
        self._reply_channel = self.REPLY_PREFIX + self.instance_id
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._handler: Handler | None = None
        self._task: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()
        self._subscribed = asyncio.Event()

    async def start(self, handler: Handler) -> None:
        """Start listening (returns at once; while Redis is down the listener keeps retrying)."""
        self._handler = handler
        self._task = asyncio.create_task(self._listen(), name="control-bus")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._subscribed.wait()

    async def request(self, op: str, session_id: str, args: Mapping[str, Any]) -> dict[str, Any] | None:
        """Ask the instance holding ``session_id`` to run ``op``; its reply, or None if none holds it."""
        request_id = secrets.token_hex(8)
        message = json.dumps({"id": request_id, "reply_to": self._reply_channel, "op": op,
                              "session_id": session_id, "args": dict(args), "from": self.instance_id})
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            listeners = await self._redis.publish(self.CHANNEL, message)
            if listeners <= (1 if self._subscribed.is_set() else 0):
                return None                                  # only ourselves: nobody else can hold it
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            return None
        except Exception as exc:  # noqa: BLE001 - Redis down: nobody can be asked
            logger.warning("control bus: could not ask other instances (%s): %s", op, _describe(exc))
            return None
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._handling):
            task.cancel()
        await self._redis.aclose()

    # ------------------------------------------------------------------------------ listener
    async def _listen(self) -> None:
        backoff, down = 0.1, False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.CHANNEL, self._reply_channel)
                self._subscribed.set()
                if down:
                    logger.info("control bus: Redis is back; listening again")
                down, backoff = False, 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_message(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - outage: retry with backoff
                self._subscribed.clear()
                if not down:
                    logger.error("control bus: lost Redis (%s); retrying", _describe(exc))
                down = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_message(self, channel: bytes | str, data: bytes | str) -> None:
        channel = channel.decode() if isinstance(channel, bytes) else channel
        try:
            message = json.loads(data)
        except ValueError:
            logger.warning("control bus: ignored a message that is not JSON on %s", channel)
            return
        if not isinstance(message, dict):
            return
        if channel == self._reply_channel:
            future = self._pending.get(str(message.get("id")))
            if future is not None and not future.done():
                future.set_result(message.get("reply") or {})
        elif message.get("from") != self.instance_id and self._handler is not None:
            task = asyncio.create_task(self._handle(message))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

    async def _handle(self, message: dict[str, Any]) -> None:
        assert self._handler is not None
        try:
            reply = await self._handler(str(message.get("op")), str(message.get("session_id")),
                                        message.get("args") or {})
        except Exception:  # noqa: BLE001 - answer with the failure rather than leave the caller waiting
            logger.exception("control bus: handling %s failed", message.get("op"))
            reply = {"status": 500, "error": "internal error on the instance holding the call"}
        if reply is None:
            return
        with contextlib.suppress(Exception):
            await self._redis.publish(str(message.get("reply_to")), json.dumps({"id": message.get("id"),
                                                                                 "reply": reply}))


async def keep_sessions(store: SessionStore, live: Callable[[], list[Session]], *, interval_s: float,
                        on_state: Callable[[bool], None] = lambda up: None) -> None:
    """Forever: every ``interval_s``, check the store and write the live calls' sessions (``live()``)
    back into it (see ``SessionStore.resync``). ``on_state(up)`` reports reachability (metrics)."""
    was_up = True
    while True:
        await asyncio.sleep(interval_s)
        up = await store.ping()
        on_state(up)
        if up:
            try:
                restored = await store.resync(live())
            except Exception as exc:  # noqa: BLE001 - try again next round
                logger.warning("session store: re-sync failed: %s", _describe(exc))
                continue
            if restored or not was_up:
                logger.info("session store reachable again: %d live session(s) written back", restored)
        elif was_up:
            logger.error("session store unreachable; live calls continue, their sessions are written back "
                         "when it returns")
        was_up = up


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

