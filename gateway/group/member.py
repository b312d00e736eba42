"""A worker's side of the worker group: its link to the supervisor's hub.

With the memory session store, a worker keeps its sessions in the hub (:class:`HubSessionStore`) and
reaches the calls of other workers through it (:class:`HubControlBus`); with Redis it uses Redis for
both as a lone instance does, and the hub only answers for ``/metrics`` and ``/ready``. The hub asks
the worker in turn: ``act`` (run a control request on a call held here), ``samples`` (its metrics) and
``state`` (whether it takes calls).

When the hub goes away (the supervisor died) the worker drains and exits: it sends itself SIGTERM.

Usage (``gateway.__main__`` in a worker)::

    member = Member(hub_path, worker=2, timeout_s=config.cluster_request_timeout_secs)
    app = create_app(config, member=member)     # the lifespan connects and attaches it:
    await member.connect(); member.attach(services)
    await member.status()                       # {"draining": False, "workers": [{...}, {...}]}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.cluster import ControlBus, Handler
from gateway.group.wire import LINE_LIMIT, Peer, PeerGone, RemoteError
from gateway.sessions import Session, SessionStore, SessionStoreUnavailable, session_from_json, session_to_json

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from gateway.app import Services

__all__ = ["HubControlBus", "HubSessionStore", "Member", "WorkerHeader"]

logger = logging.getLogger(__name__)


class Member:
    """One worker's connection to the hub."""

    def __init__(self, path: str, *, worker: int, timeout_s: float) -> None:
        self.path = path
        self.worker = worker
        self.timeout_s = timeout_s
        self._peer: Peer | None = None
        self._task: asyncio.Task[None] | None = None
        self._services: Services | None = None
        self.act: Handler | None = None     # runs a control request on a call held here (HubControlBus.start)
        self._closing = False

    async def connect(self) -> None:
        """Connect and say hello (raises OSError when the hub is not there)."""
        reader, writer = await asyncio.open_unix_connection(self.path, limit=LINE_LIMIT)
        self._peer = Peer(reader, writer, self._handle)
        self._task = asyncio.create_task(self._run(self._peer), name="group-member")
        await self._peer.request("hello", {"worker": self.worker, "pid": os.getpid()}, timeout_s=self.timeout_s)

    def attach(self, services: Services) -> None:
        """What the hub's requests are answered from (until then this worker holds no call)."""
        self._services = services

    async def request(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Ask the hub. What the hub asks the other workers in turn (control, metrics, status) gets
        their timeout and a second more."""
        if self._peer is None:
            raise PeerGone("not connected to the worker group's hub")
        relayed = op in ("control", "metrics", "status")
        return await self._peer.request(op, args, timeout_s=self.timeout_s + (1.0 if relayed else 0.0))

    async def status(self) -> dict[str, Any] | None:
        """The group's state: ``{"draining", "workers": [{"worker", "calls", "draining", "refusal"}]}``;
        None when the hub does not answer."""
        try:
            return dict(await self.request("status"))
        except (PeerGone, RemoteError):
            return None

    async def metrics(self) -> bytes | None:
        """``/metrics`` over every worker; None when the hub does not answer."""
        from gateway.metrics import render_group

        try:
            answer = await self.request("metrics")
        except (PeerGone, RemoteError):
            return None
        return render_group(answer["workers"], restarts=int(answer["restarts"]))

    async def close(self) -> None:
        self._closing = True
        if self._peer is not None:
            await self._peer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, peer: Peer) -> None:
        await peer.run()
        if not self._closing:
            logger.error("worker %d lost the supervisor's hub: draining and exiting", self.worker)
            os.kill(os.getpid(), signal.SIGTERM)      # the server's own drain (gateway.server)

    async def _handle(self, op: str, args: Mapping[str, Any]) -> Any:
        services = self._services
        if services is None:
            return None                                # still starting: holds no call
        if op == "act":
            if self.act is None:
                return None
            return await self.act(str(args["op"]), str(args["session_id"]), args.get("args") or {})
        if op == "samples":
            return services.metrics.samples()
        if op == "state":
            return _state(services, self.worker)
        raise ValueError(f"unknown worker operation {op!r}")


def _state(services: Services, worker: int) -> dict[str, Any]:
    admission = services.admission
    reason = admission.refusal() if admission is not None else None
    return {"worker": worker, "calls": len(services.calls), "draining": services.draining,
            "refusal": admission.explain(reason) if admission is not None and reason is not None else None}


class HubSessionStore(SessionStore):
    """The group's sessions, kept by the hub (the memory store shared by this host's workers). The hub
    unreachable raises :class:`~gateway.sessions.SessionStoreUnavailable`, as Redis down does."""

    def __init__(self, member: Member) -> None:
        self._member = member

    async def _ask(self, op: str, **args: Any) -> Any:
        try:
            return await self._member.request(f"session.{op}", args)
        except (PeerGone, RemoteError) as exc:
            raise SessionStoreUnavailable(f"worker group hub unavailable ({op}): {exc}") from exc

    async def create(self, session: Session) -> Session:
        return session_from_json(await self._ask("create", session=session_to_json(session)))

    async def claim(self, session_id: str, *, carrier: str) -> Session | None:
        return _session(await self._ask("claim", id=session_id, carrier=carrier))

    async def get(self, session_id: str) -> Session | None:
        return _session(await self._ask("get", id=session_id))

    async def update(self, session: Session) -> None:
        await self._ask("update", session=session_to_json(session))

    async def end(self, session_id: str) -> None:
        """Remove the session; called while a call is torn down, so a failure is logged, not raised
        (the hub removes a dead worker's sessions itself)."""
        try:
            await self._ask("end", id=session_id)
        except SessionStoreUnavailable as exc:
            logger.warning("session %s… not removed: %s", session_id[:6], exc)

    async def bind_call(self, carrier: str, call_id: str, session_id: str) -> str | None:
        bound = await self._ask("bind_call", carrier=carrier, call_id=call_id, session_id=session_id)
        return None if bound is None else str(bound)

    async def ping(self) -> bool:
        try:
            await self._member.request("session.get", {"id": ""})
        except (PeerGone, RemoteError):
            return False
        return True


def _session(raw: str | None) -> Session | None:
    return None if raw is None else session_from_json(raw)


class HubControlBus(ControlBus):
    """Reach the worker holding a call through the hub (``DELETE /sessions/{id}`` and the rest landing
    on another worker)."""

    def __init__(self, member: Member) -> None:
        self._member = member
        self.instance_id = f"worker-{member.worker}"

    async def start(self, handler: Handler) -> None:
        self._member.act = handler

    async def request(self, op: str, session_id: str, args: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            reply = await self._member.request("control", {"op": op, "session_id": session_id, "args": dict(args)})
        except (PeerGone, RemoteError) as exc:
            logger.warning("control: could not ask the other workers (%s): %s", op, exc)
            return None
        return None if reply is None else dict(reply)


class WorkerHeader:
    """ASGI middleware: ``X-Voxray-Worker: <n>`` on every answer (HTTP and WebSocket accept), to see
    which worker took a connection (``worker_header``: diagnostics and tests)."""

    def __init__(self, app: ASGIApp, *, worker: int) -> None:
        self.app = app
        self._header = (b"x-voxray-worker", str(worker).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)

