"""Test helper: a client that streams caller audio far faster than real time, in its own process.

Run as ``python -m tests.flood ws --url http://127.0.0.1:8000 --token KEY`` or
``python -m tests.flood twilio --url ... --public-url https://... --auth-token ... --account-sid ...``.
It prints one JSON line when its session is up (``{"session_id": ...}``) and one when it stops
(``{"sent": n, "close_code": c, "close_reason": "...", "seconds": s}``). A separate process, so the
test's own event loop (which measures the gateway) is not the one busy sending.

Usage (from a test)::

    flood = await Flood.start("ws", url=gw.url, token=KEY, frames=30000, rate=10000)
    session_id = await flood.session_id()
    result = await flood.result(timeout_s=20)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import websockets

from tests.speech import speech_pcm

__all__ = ["Flood"]

_TEXT = "Can you check whether my order has shipped yet? I ordered it last week."


def _frames(frame_bytes: int) -> list[bytes]:
    pcm = speech_pcm(_TEXT, 8000)
    return [pcm[i:i + frame_bytes] for i in range(0, len(pcm) - frame_bytes, frame_bytes)]


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _blast(send: Any, messages: list[Any], frames: int, rate: float, closed: Any = lambda: False) -> int:
    """Send ``frames`` messages at ``rate`` per second (in bursts of 100); the count sent before a close."""
    start = time.monotonic()
    sent = 0
    try:
        while sent < frames and not closed():
            await send(messages[sent % len(messages)])
            sent += 1
            if sent % 100 == 0:
                await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    except websockets.ConnectionClosed:
        pass
    return sent


async def _ws(args: argparse.Namespace) -> None:
    url = args.url.replace("http", "ws", 1) + "/ws" + (f"?token={args.token}" if args.token else "")
    t0 = time.monotonic()
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 8000}))
        ready = json.loads(await ws.recv())
        _say(session_id=ready["session_id"])
        sent = await _blast(ws.send, _frames(320), args.frames, args.rate)
        try:
            async with asyncio.timeout(args.linger):
                async for _ in ws:
                    pass
        except (TimeoutError, websockets.ConnectionClosed):
            pass
        _say(sent=sent, close_code=ws.close_code, close_reason=ws.close_reason, seconds=time.monotonic() - t0)


async def _twilio(args: argparse.Namespace) -> None:
    from gateway.simulate.call import SimulatedCall

    call = SimulatedCall(gateway=args.url, public_url=args.public_url, auth_token=args.auth_token,
                         account_sid=args.account_sid)
    t0 = time.monotonic()
    answer = await call.dial()
    if answer.status_code != 200:
        _say(error=f"webhook answered {answer.status_code}")
        return
    await call.connect()
    _say(session_id=call.session_id, call_sid=call.call_sid)
    messages = [call.dialect.media(frame) for frame in _frames(160 * 2)]
    sent = await _blast(call.send_raw, messages, args.frames, args.rate, lambda: call.closed)
    try:
        await call.wait_closed(args.linger)
    except TimeoutError:
        pass
    await call.close()
    _say(sent=sent, close_code=call.close_code, close_reason=call.close_reason, seconds=time.monotonic() - t0)


class Flood:
    """The flooding client as a child process, read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, kind: str, *, url: str, frames: int, rate: float, linger: float = 5.0,
                    **options: str) -> Flood:
        argv = [sys.executable, "-m", "tests.flood", kind, "--url", url, "--frames", str(frames), "--rate", str(rate),
                "--linger", str(linger)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", value]
        return cls(await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE))

    async def _line(self, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the flood client exited ({await self.process.wait()}) without a result")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    async def session_id(self, timeout_s: float = 30.0) -> str:
        return str((await self._line(timeout_s))["session_id"])

    async def result(self, timeout_s: float = 60.0) -> dict[str, Any]:
        result = await self._line(timeout_s)
        await self.process.wait()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.flood")
    parser.add_argument("kind", choices=["ws", "twilio"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--frames", type=int, default=30000)
    parser.add_argument("--rate", type=float, default=10000.0)
    parser.add_argument("--linger", type=float, default=5.0, help="seconds to wait for the close after sending")
    parser.add_argument("--token", default="")
    parser.add_argument("--public-url", default="")
    parser.add_argument("--auth-token", default="")
    parser.add_argument("--account-sid", default="")
    args = parser.parse_args()
    asyncio.run(_ws(args) if args.kind == "ws" else _twilio(args))


if __name__ == "__main__":
    main()
