"""Call, the one lifecycle of every transport, driven through a tiny in-memory leg (as a browser's).

The app's real services (fake OpenAI providers, memory session store, metrics) come from
``create_app(config)``'s own lifespan; no server socket is needed because the transport is a list."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from carriers.base import CallControlFailed
from gateway.app import Services, create_app
from gateway.browser.events import ready_event
from gateway.calls.call import Call
from gateway.sessions import Session
from pipeline.conversation import Persona
from pipeline.frames import AudioFrame, Clear, Frame
from tests.conftest import phone_config
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.asyncio


class LoopbackLeg:
    """Events and audio into lists; ``converse=False`` opens without a conversation (ready, then wait)."""

    label = "loopback"
    noun = "a loopback session"
    not_started = "the loopback session has not started yet"
    ended_text = "session ended"
    sample_rate, frame_ms, message_ms = 16000, 20, 20
    can_transfer = detects_machines = False

    def __init__(self, *, converse: bool = True, fail: bool = False) -> None:
        self.converse, self.fail = converse, fail
        self.events: list[dict[str, Any]] = []
        self.played = bytearray()
        self.flushes = 0
        self.closed: list[tuple[str, int, str]] = []
        self.tasks_started = 0
        self.changed = asyncio.Event()

    async def open(self, call: Call) -> Mapping[str, str] | None:
        self.emit(ready_event(call, "pcm16", self.sample_rate))
        if self.fail:
            raise RuntimeError("transport exploded")
        if not self.converse:
            await call.ended.wait()
            return None
        return {}

    def tasks(self, tg: asyncio.TaskGroup, call: Call) -> list[asyncio.Task[None]]:
        self.tasks_started += 1
        return [tg.create_task(asyncio.Event().wait())]       # a reader that never hears anything

    def emit(self, message: Mapping[str, Any]) -> None:
        self.events.append(json.loads(json.dumps(message)))
        self.changed.set()

    async def send(self, frame: Frame) -> None:
        if isinstance(frame, AudioFrame):
            self.played += frame.pcm
        elif isinstance(frame, Clear):
            self.flushes += 1
        self.changed.set()

    async def close(self, reason: str, code: int, text: str) -> None:
        self.closed.append((reason, code, text))

    async def transfer(self, target: str) -> None:
        raise CallControlFailed(f"{self.noun} cannot be transferred")

    async def send_dtmf(self, digits: str) -> bool:
        return False

    async def until(self, predicate: Any, timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while not (found := predicate()):
                self.changed.clear()
                await self.changed.wait()
            return found


@contextlib.asynccontextmanager
async def services(**overrides: Any) -> AsyncIterator[Services]:
    """The services a running gateway holds (its lifespan, without a server)."""
    async with FakeOpenAI(tts_ms_per_char=5) as fake:
        app = create_app(phone_config(fake.base_url, "http://127.0.0.1:9", **overrides))
        async with app.router.lifespan_context(app):
            yield app.state.services


async def new_call(svc: Services, **kwargs: Any) -> tuple[Call, LoopbackLeg]:
    session = await svc.sessions.create(Session.new(carrier="browser", state="active"))
    leg = LoopbackLeg(**kwargs)
    return Call(services=svc, session=session, leg=leg, persona=Persona()), leg


def sample(svc: Services, name: str, **labels: str) -> float | None:
    return svc.metrics.registry.get_sample_value(name, labels)


async def test_registration_call_control_errors_and_the_finaliser() -> None:
    async with services() as svc:
        call, leg = await new_call(svc, converse=False)
        task = asyncio.create_task(call.run())
        await leg.until(lambda: leg.events)
        assert leg.events[0] == {"type": "ready", "session_id": call.session.id, "persona": "default",
                                  "codec": "pcm16", "sample_rate": 16000}
        assert svc.calls[call.session.id] is call
        assert sample(svc, "voxray_active_calls", carrier="loopback") == 1.0
        assert sample(svc, "voxray_calls_started_total", carrier="loopback") == 1.0

        # what a browser answers to call control
        with pytest.raises(CallControlFailed, match="a loopback session cannot be transferred"):
            await call.transfer("+14155550100")
        with pytest.raises(CallControlFailed, match="the loopback session has not started yet"):
            await call.send_dtmf("12")
        assert call.machine_answered() is None

        # bad control messages: each counted, the same error event at most once a second
        call.control("not json")
        call.control('{"type": "dance"}')
        call.control('{"type": "dance"}')
        errors = [e for e in leg.events if e["type"] == "error"]
        assert [e["message"] for e in errors] == [
            'control messages must be JSON objects like {"type": "interrupt"}',
            "unknown message type 'dance'; expected \"interrupt\" or \"end\""]
        assert sample(svc, "voxray_media_messages_rejected_total", carrier="loopback") == 3.0

        # "end" finishes it; the first reason (and close) wins
        call.control('{"type": "end"}')
        call.finish("ended_by_api", code=4000, text="later")
        await task
        assert call.reason == "ended_by_client" and call.finalised.is_set()
        assert leg.closed == [("ended_by_client", 1000, "session ended")]
        assert call.session.id not in svc.calls
        assert await svc.sessions.get(call.session.id) is None
        assert sample(svc, "voxray_active_calls", carrier="loopback") == 0.0
        assert sample(svc, "voxray_calls_ended_total", carrier="loopback", reason="ended_by_client") == 1.0
        await call._finalise()                       # idempotent: nothing runs twice
        assert len(leg.closed) == 1
        assert sample(svc, "voxray_active_calls", carrier="loopback") == 0.0


async def test_a_failure_or_a_cancellation_still_finalises_once() -> None:
    async with services() as svc:
        failing, failing_leg = await new_call(svc, fail=True)
        await failing.run()                          # the failure is logged, not raised
        assert failing_leg.closed == [("error", 1011, "internal error")]
        assert failing.session.id not in svc.calls

        waiting, waiting_leg = await new_call(svc, converse=False)
        task = asyncio.create_task(waiting.run())
        await waiting_leg.until(lambda: waiting_leg.events)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiting_leg.closed == [("shutdown", 1001, "server shutting down")]
        assert sample(svc, "voxray_calls_ended_total", carrier="loopback", reason="shutdown") == 1.0


async def test_conversation_plays_dtmf_in_band_then_says_goodbye_at_max_call_secs() -> None:
    async with services(max_call_secs=1.5, goodbye_text="Time is up.", goodbye_timeout_secs=5) as svc:
        call, leg = await new_call(svc)
        task = asyncio.create_task(call.run())
        greeting = await leg.until(lambda: next((e for e in leg.events if e["type"] == "transcript"), None))
        assert greeting["role"] == "assistant" and greeting["text"] == Persona().greeting
        await leg.until(lambda: len(leg.played) > 3200)       # the greeting's audio reaches the transport
        assert leg.tasks_started == 1
        assert await call.send_dtmf("5") == "in-band"
        await asyncio.wait_for(task, 10)
        assert call.reason == "max_duration"
        spoken = [e["text"] for e in leg.events if e["type"] == "transcript" and e["role"] == "assistant"]
        assert spoken[-1] == "Time is up."
        assert leg.closed == [("max_duration", 1000, "session ended")]
