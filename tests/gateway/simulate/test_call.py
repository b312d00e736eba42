"""``SimulatedCall``'s media side against a plain WebSocket server (``websockets``) on 127.0.0.1: frames go out
on the frame clock, and ``speak`` reports when the speech's last frame went out, however busy the loop is."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.simulate.call import SimulatedCall

FRAME_BYTES = 320                       # 20 ms of PCM16 at 8 kHz


@pytest.mark.asyncio
async def test_speak_returns_when_the_last_frame_went_out_not_when_the_caller_next_runs() -> None:
    arrivals: list[tuple[float, bytes]] = []          # (arrival, the frame's µ-law payload) of every media message

    async def carrier_side(conn: ServerConnection) -> None:
        async for message in conn:
            event = json.loads(message)
            if event["event"] == "media":
                arrivals.append((time.monotonic(), event["media"]["payload"].encode()))

    async def neighbour(stop: asyncio.Event) -> None:
        """Another part of the client holding the loop 30 ms at a time (a busy load generator)."""
        while not stop.is_set():
            time.sleep(0.03)
            await asyncio.sleep(0)

    async with serve(carrier_side, "127.0.0.1", 0) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        call = SimulatedCall(gateway=f"http://127.0.0.1:{port}", auth_token="t", account_sid="AC" + "0" * 32)
        call.adopt('<Response><Connect><Stream url="wss://voice.example.test/media/twilio/s1"/></Connect></Response>',
                   "CA" + "1" * 32)
        await call.connect()
        await asyncio.sleep(0.1)                                # silence frames first
        stop = asyncio.Event()
        busy = asyncio.create_task(neighbour(stop))
        speech = b"\x10\x27" * (FRAME_BYTES // 2) * 5           # five frames of a loud constant
        ends = [await call.speak(speech) for _ in range(3)]
        await asyncio.sleep(0.1)
        stop.set()
        await busy
        await call.close()
    silence_payload = arrivals[0][1]                          # sent before any speech
    speech_arrivals = [t for t, payload in arrivals if payload != silence_payload]
    assert len(speech_arrivals) == 15
    last_frames = speech_arrivals[4::5]
    # each end is the moment the last frame was written: before the server read it, not 30 ms after
    assert all(end <= arrived for end, arrived in zip(ends, last_frames, strict=True)), (ends, last_frames)
    assert all(arrived - end < 0.1 for end, arrived in zip(ends, last_frames, strict=True))
