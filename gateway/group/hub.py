"""The worker group's hub, run by the supervisor: the group's sessions, and the way between workers.

Every worker keeps one connection to the hub (a unix socket in a private directory). Over it a worker:

* keeps sessions in the hub's one :class:`~gateway.sessions.MemorySessionStore` (``session.*``), so
  the webhook answered by one worker and the media socket that lands on another are the same call.
  The hub runs on one event loop, so a claim is atomic: a session id is claimed once in the group;
* asks the other workers to act on a call it does not hold (``control``: DELETE, transfer, DTMF);
* gathers every worker's metrics samples (``metrics``) and admission state (``status``) for one
  ``/metrics`` and one ``/ready`` over the whole group.

The hub remembers which worker claimed each session: when a worker's connection ends (it died), the
sessions of its calls are removed.

Usage (``gateway.group.supervisor``)::

    hub = Hub.from_config(config)
    await hub.start(path)          # listening; workers connect with gateway.group.member.Member
    hub.draining = True            # SIGTERM: /ready answers 503 on every worker
    await hub.close()
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.group.wire import LINE_LIMIT, Peer
from gateway.sessions import MemorySessionStore, session_from_json, session_to_json

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["Hub"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Link:
    """One worker's connection."""

    peer: Peer | None = None
    worker: int = 0                       # 0 until it said hello
    pid: int = 0
    sessions: set[str] = field(default_factory=set)   # claimed through this link


class Hub:
    """Sessions, control routing, metrics and readiness for the workers of one host."""

    def __init__(self, store: MemorySessionStore, *, request_timeout_s: float) -> None:
        self.store = store
        self.draining = False
        self.restarts = 0                 # workers restarted after dying (the supervisor counts)
        self._timeout = request_timeout_s
        self._links: dict[int, _Link] = {}
        self._claimed: dict[str, _Link] = {}
        self._server: asyncio.AbstractServer | None = None

    @classmethod
    def from_config(cls, config: Config) -> Hub:
        store = MemorySessionStore(pending_ttl_s=config.session_pending_ttl_secs, ttl_s=config.session_ttl_secs,
                                   call_ttl_s=config.call_id_ttl_secs)
        return cls(store, request_timeout_s=config.cluster_request_timeout_secs)

    @property
    def workers(self) -> list[int]:
        """The workers connected now."""
        return sorted(self._links)

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._connected, path, limit=LINE_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            if link.peer is not None:
                await link.peer.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link()
        link.peer = Peer(reader, writer, functools.partial(self._handle, link))
        try:
            await link.peer.run()
        finally:
            if self._links.get(link.worker) is link:
                del self._links[link.worker]
            for session_id in link.sessions:       # its calls died with it
                self._claimed.pop(session_id, None)
                await self.store.end(session_id)
            if link.worker:
                logger.info("worker %d disconnected from the hub (%d session(s) of its calls removed)",
                            link.worker, len(link.sessions))

    async def _handle(self, link: _Link, op: str, args: Mapping[str, Any]) -> Any:
        if op == "hello":
            link.worker, link.pid = int(args["worker"]), int(args["pid"])
            self._links[link.worker] = link
            return {"draining": self.draining}
        if op.startswith("session."):
            return await self._session(link, op.removeprefix("session."), args)
        if op == "control":
            return await self._control(link, str(args["op"]), str(args["session_id"]), args.get("args") or {})
        if op == "metrics":
            return {"workers": await self._gather("samples"), "restarts": self.restarts}
        if op == "status":
            return {"draining": self.draining, "workers": await self._gather("state")}
        raise ValueError(f"unknown hub operation {op!r}")

    async def _session(self, link: _Link, op: str, args: Mapping[str, Any]) -> Any:
        store = self.store
        if op == "create":
            return session_to_json(await store.create(session_from_json(args["session"])))
        if op == "claim":
            claimed = await store.claim(str(args["id"]), carrier=str(args["carrier"]))
            if claimed is None:
                return None
            self._claimed[claimed.id] = link
            link.sessions.add(claimed.id)
            return session_to_json(claimed)
        if op == "get":
            found = await store.get(str(args["id"]))
            return None if found is None else session_to_json(found)
        if op == "update":
            await store.update(session_from_json(args["session"]))
            return None
        if op == "end":
            session_id = str(args["id"])
            holder = self._claimed.pop(session_id, None)
            if holder is not None:
                holder.sessions.discard(session_id)
            await store.end(session_id)
            return None
        if op == "bind_call":
            return await store.bind_call(str(args["carrier"]), str(args["call_id"]), str(args["session_id"]))
        raise ValueError(f"unknown session operation {op!r}")

    async def _control(self, asker: _Link, op: str, session_id: str, args: Mapping[str, Any]) -> Any:
        """The reply of the worker holding the call, or None: every other worker is asked at once,
        and only the one holding the call answers with something."""
        request = {"op": op, "session_id": session_id, "args": dict(args)}
        asks = [asyncio.ensure_future(link.peer.request("act", request, timeout_s=self._timeout))
                for link in self._links.values() if link is not asker and link.peer is not None]
        try:
            for done in asyncio.as_completed(asks):
                try:
                    reply = await done
                except (ConnectionError, RuntimeError) as exc:
                    logger.warning("a worker did not answer %s: %s", op, exc)
                    continue
                if reply is not None:
                    return reply
            return None
        finally:
            for ask in asks:
                ask.cancel()

    async def _gather(self, op: str) -> list[Any]:
        """Every connected worker's answer to ``op`` (a worker that does not answer in time, or is
        still starting, is left out)."""
        answers = await asyncio.gather(*(link.peer.request(op, timeout_s=self._timeout)
                                         for link in self._links.values() if link.peer is not None),
                                       return_exceptions=True)
        return [answer for answer in answers if answer is not None and not isinstance(answer, BaseException)]
