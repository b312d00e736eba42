"""Micro-benchmark: CPU per media message on a Twilio call, stage by stage, through the real modules.

Inbound (one Twilio ``media`` text frame every 20 ms per call)::

    WebSocket receive -> JSON -> base64 -> µ-law -> media gate -> turn logic (VAD, pre-roll, utterance)

Outbound (one 20 ms frame of the agent's speech)::

    TTS PCM 24 kHz -> resample to 8 kHz -> playout pacer -> µ-law -> base64 -> JSON -> WebSocket send

The last outbound row is per 20 ms of audio sent, in messages as a Twilio call's playout makes them
(``outbound_message_ms``: 60 ms by default; one frame each in refs older than that key).

Every stage calls the gateway's own code (``carriers.twilio``, ``pipeline.audio``, ``pipeline.turns``,
``pipeline.playout``, ``gateway.calls.lifecycle``). The WebSocket rows run a real uvicorn server, built
by ``gateway.server.build_server`` with the gateway's options and the media route's socket adapter
(``gateway.calls.socket.socket_io``), in a child process, with ``--ws-calls`` loopback connections each
carrying one message every 20 ms; the row is the server's CPU time (``/proc``) per message.

Usage::

    python -m bench.per_message                   # this tree
    python -m bench.per_message --compare main    # also a git ref (checked out in a temporary worktree)
    python -m bench.per_message --ws wsproto      # another uvicorn WebSocket implementation for the socket rows

``--compare`` runs the same measurements in a child process whose imports resolve to the ref's code, and
prints both columns. Figures are µs per message, the median of ``--repeats`` runs; the WebSocket rows
are indicative on a shared machine (other processes take the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SID = "MZ3f9c1be07d54a28e6b0c9d1e2f3a4b5c"      # 32 hex digits, as Twilio's are
FRAMES = 2000          # messages per timed run of an in-process stage
SOCKET_IN = "WebSocket receive only (server + socket_io)"
CALL_IN = "server CPU per message: receive + decode + gate + turns"
SOCKET_OUT = "WebSocket send only (server + socket_io)"
CALL_OUT = "server CPU per 20 ms out: Playout + encode + send"


def _speech_frames(n: int, rate: int, seed: int = 0) -> list[bytes]:
    """``n`` 20 ms PCM16 frames: 1.2 s of loud harmonics, then 2 s of near silence, repeated."""
    rng = np.random.default_rng(seed)
    step = rate // 50
    out = []
    for i in range(n):
        t = (np.arange(step) + i * step) / rate
        if (i % 160) < 60:
            x = 6000 * np.sin(2 * np.pi * 150 * t) + 3000 * np.sin(2 * np.pi * 450 * t)
        else:
            x = rng.normal(0, 30, step)
        out.append(np.clip(x, -32768, 32767).astype("<i2").tobytes())
    return out


def _media_messages(frames: list[bytes]) -> list[str]:
    from pipeline.audio import ulaw_encode
    return [json.dumps({"event": "media", "sequenceNumber": str(i + 3), "streamSid": SID,
                        "media": {"track": "inbound", "chunk": str(i + 2), "timestamp": str(i * 20),
                                  "payload": base64.b64encode(ulaw_encode(f)).decode()}}, separators=(",", ":"))
            for i, f in enumerate(frames)]


def _start_message() -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": SID,
                       "start": {"streamSid": SID, "callSid": "CA" + "0" * 32, "accountSid": "AC" + "0" * 32,
                                 "tracks": ["inbound"], "customParameters": {},
                                 "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


def _per_call(fn: Callable[[Any], object], items: list[Any], repeats: int) -> float:
    """Median over ``repeats`` runs of µs per call of ``fn(item)`` over ``items``."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for item in items:
            fn(item)
        runs.append((time.perf_counter() - t) / len(items) * 1e6)
    return statistics.median(runs)


# --------------------------------------------------------------------------- in-process stages

def inbound_stages(repeats: int) -> dict[str, float]:
    from carriers._messages import parse_event
    from carriers.twilio import TwilioMediaStream
    from gateway.calls.lifecycle import MediaGate
    from gateway.config import Config
    from gateway.metrics import Metrics
    from pipeline.audio import Resampler, ulaw_decode
    from pipeline.frames import AudioFrame
    from pipeline.settings import ConversationSettings
    from pipeline.turns import TurnTaker
    from pipeline.vad import EnergyVAD

    frames = _speech_frames(FRAMES, 8000)
    messages = _media_messages(frames)
    payloads = [json.loads(m)["media"]["payload"] for m in messages]
    codes = [base64.b64decode(p) for p in payloads]
    audio = [AudioFrame(f, 8000) for f in frames]
    out: dict[str, float] = {}

    stream = TwilioMediaStream()
    stream.decode(_start_message())
    out["json parse (carriers._messages.parse_event)"] = _per_call(lambda m: parse_event("twilio", m), messages,
                                                                   repeats)
    out["µ-law decode (pipeline.audio.ulaw_decode)"] = _per_call(ulaw_decode, codes, repeats)
    out["decode: JSON + base64 + µ-law (TwilioMediaStream.decode)"] = _per_call(stream.decode, messages, repeats)

    config = Config.from_mapping({"public_url": "https://bench.example.test", "allow_unauthenticated": True})
    config = _replace(config, media_burst_ms=10**9)        # the timed loop runs far faster than real time
    gate = MediaGate(config, Metrics(), label="twilio", finish=lambda *a, **k: None)
    out["media gate (MediaGate.admit)"] = _per_call(gate.admit, audio, repeats)

    vad = EnergyVAD(threshold=0.02, start_ms=60, stop_ms=300)
    out["VAD (EnergyVAD.process)"] = _per_call(lambda f: vad.process(f.pcm, f.sample_rate), audio, repeats)

    class _Task:
        def cancel(self) -> None: ...

    def spawn(coro: Any) -> Any:
        coro.close()
        return _Task()

    turns = TurnTaker(settings=ConversationSettings(vad_stop_ms=300), transcribe=None,
                      spawn=spawn, on_speech_start=lambda: None, on_turn=lambda t: None,
                      on_failure=lambda c, m: None)
    out["turn logic incl. VAD (TurnTaker.on_audio)"] = _per_call(turns.on_audio, audio, repeats)
    up = Resampler(8000, 16000)
    out["(resample 8->16 kHz, once per turn: per 20 ms)"] = _per_call(up.process, frames, repeats)

    def whole(m: str) -> None:
        for f in stream.decode(m):
            if gate.admit(f):
                turns.on_audio(f)

    out["inbound total in-process"] = _per_call(whole, messages, repeats)
    return out


def _replace(config: Any, **changes: Any) -> Any:
    import dataclasses
    return dataclasses.replace(config, **changes)


def outbound_stages(repeats: int) -> dict[str, float]:
    from carriers.twilio import TwilioMediaStream
    from pipeline.audio import Resampler, ulaw_encode
    from pipeline.frames import AudioFrame
    from pipeline.playout import Playout

    tts = _speech_frames(FRAMES, 24000, seed=1)
    frames = _speech_frames(FRAMES, 8000, seed=1)
    audio = [AudioFrame(f, 8000) for f in frames]
    out: dict[str, float] = {}
    down = Resampler(24000, 8000)
    out["resample 24->8 kHz (Resampler.process)"] = _per_call(down.process, tts, repeats)

    runs = []
    for _ in range(repeats):
        runs.append(asyncio.run(_playout_run(Playout, AudioFrame, frames)))
    out["playout pacer: write + send (Playout)"] = statistics.median(runs)

    out["µ-law encode (pipeline.audio.ulaw_encode)"] = _per_call(ulaw_encode, frames, repeats)
    stream = TwilioMediaStream()
    stream.decode(_start_message())
    out["encode: µ-law + base64 + JSON (TwilioMediaStream.encode)"] = _per_call(stream.encode, audio, repeats)

    def whole(pcm: bytes) -> None:
        for m in stream.encode(AudioFrame(down.process(pcm), 8000)):
            assert m

    out["outbound total in-process (no pacer)"] = _per_call(whole, tts, repeats)
    return out


async def _playout_run(playout_cls: Any, frame_cls: Any, frames: list[bytes]) -> float:
    """µs per frame through a real Playout whose lead is so long that the pacer never sleeps."""
    sent = 0
    done = asyncio.Event()

    async def send(frame: Any) -> None:
        nonlocal sent
        sent += 1
        if sent == len(frames):
            done.set()

    playout = playout_cls(sample_rate=8000, lead_ms=10**9, max_buffer_ms=10**9, frame_ms=20)
    task = asyncio.ensure_future(playout.run(send))
    await asyncio.sleep(0)
    t = time.perf_counter()
    for f in frames:
        await playout.write(f)
    await done.wait()
    elapsed = time.perf_counter() - t
    task.cancel()
    return elapsed / len(frames) * 1e6


# --------------------------------------------------------------------------- the WebSocket layer

def _serve(port: int, ws: str) -> None:
    """Child process: the gateway's uvicorn options and the media route's socket adapter, four routes.

    ``/in``: receive only. ``/in-call``: receive, then a call's inbound path (decode, gate, turn logic).
    ``/out``: one shared 20 ms tick sends a ready message on each socket. ``/out-call``: a call's outbound
    path, a real Playout per socket (its own timers) -> TwilioMediaStream.encode -> send."""
    from starlette.websockets import WebSocket

    from carriers.twilio import TwilioMediaStream
    from gateway.calls.lifecycle import MediaGate
    from gateway.calls.socket import socket_io
    from gateway.config import Config
    from gateway.metrics import Metrics
    from gateway.server import build_server
    from pipeline.frames import AudioFrame
    from pipeline.playout import Playout
    from pipeline.settings import ConversationSettings
    from pipeline.turns import TurnTaker

    message = _media_messages(_speech_frames(1, 8000))[0]
    pcm = b"".join(_speech_frames(50, 8000))
    outbound: list[Any] = []
    config = Config.from_mapping({"public_url": "https://bench.example.test", "allow_unauthenticated": True,
                                  "host": "127.0.0.1", "port": port})
    metrics = Metrics()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += 0.02
            await asyncio.sleep(max(0.0, due - loop.time()))
            for io in list(outbound):
                await io.send(message)

    async def speak(io: Any) -> None:
        stream = TwilioMediaStream()
        stream.decode(_start_message())
        # as gateway.calls.call builds it for Twilio (a ref older than outbound_tick_ms has no shared grid, one
        # older than outbound_message_ms sends one 20 ms frame per message)
        grid = {"tick_ms": config.outbound_tick_ms} if hasattr(config, "outbound_tick_ms") else {}
        if hasattr(config, "outbound_message_ms"):
            grid["message_ms"] = min(config.outbound_message_ms, TwilioMediaStream.max_message_ms)
        playout = Playout(sample_rate=8000, lead_ms=config.outbound_lead_ms,
                          max_buffer_ms=config.playout_max_buffer_ms, frame_ms=20, **grid)

        async def send(frame: Any) -> None:
            for m in stream.encode(frame):
                await io.send(m)

        task = asyncio.ensure_future(playout.run(send))
        try:
            while True:
                await playout.write(pcm)
        finally:
            task.cancel()

    def listener() -> Callable[[str | bytes], None]:
        stream = TwilioMediaStream()
        stream.decode(_start_message())
        gate = MediaGate(config, metrics, label="twilio", finish=lambda *a, **k: None)

        def spawn(coro: Any) -> Any:
            return asyncio.ensure_future(coro)

        async def transcribe(pcm: bytes, *, sample_rate: int) -> str:
            return ""

        turns = TurnTaker(settings=ConversationSettings(vad_stop_ms=300), transcribe=transcribe, spawn=spawn,
                          on_speech_start=lambda: None, on_turn=lambda t: None, on_failure=lambda c, m: None)

        def hear(m: str | bytes) -> None:
            for f in stream.decode(m):
                if isinstance(f, AudioFrame) and gate.admit(f):
                    turns.on_audio(f)
        return hear

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    asyncio.get_running_loop().create_task(ticker())
                    await send({"type": "lifespan.startup.complete"})
                elif m["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        io = socket_io(websocket)
        path = scope["path"]
        hear = listener() if path == "/in-call" else None
        speaker = asyncio.ensure_future(speak(io)) if path == "/out-call" else None
        if path == "/out":
            outbound.append(io)
        listen = getattr(io, "listen", None)     # push delivery, as a carrier leg reads (absent in older refs)
        if listen is not None:
            await listen(hear if hear is not None else (lambda m: None))
        else:
            while (m := await io.receive()) is not None:
                if hear is not None:
                    hear(m)
        if io in outbound:
            outbound.remove(io)
        if speaker is not None:
            speaker.cancel()

    overrides: dict[str, Any] = {"ws": ws} if ws != "gateway" else {}
    server = build_server(app, config, handle_signals=False, **overrides)
    import uvloop
    uvloop.run(server.serve())


def _cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (``/proc/.../schedstat``: nanoseconds, not clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass     # a thread that just ended
    return total / 1e9


def _handshake(port: int, path: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    s.setblocking(False)
    return s


def _client_frame(text: str) -> bytes:
    """A masked text frame as a client sends it."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return head + mask + masked


def websocket_rows(ws: str, calls: int, seconds: float, cwd: Path) -> dict[str, float]:
    """Server CPU µs per message: receive (calls x 50 msg/s inbound) and send (calls x 50 msg/s outbound)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(cwd), "OPENBLAS_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("VOXRAY_")}
    log = tempfile.TemporaryFile()
    child = subprocess.Popen([sys.executable, "-c", f"from bench.per_message import _serve; _serve({port}, {ws!r})"],
                             cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        frame = _client_frame(_media_messages(_speech_frames(1, 8000))[0])
        speech = [_client_frame(m) for m in _media_messages(_speech_frames(500, 8000))]
        out: dict[str, float] = {}
        for path, row, send in (("/in", SOCKET_IN, True), ("/in-call", CALL_IN, True),
                                ("/out", SOCKET_OUT, False), ("/out-call", CALL_OUT, False)):
            socks = [_handshake(port, path) for _ in range(calls)]
            out[row] = _pace(child.pid, socks, speech if path == "/in-call" else [frame], seconds, send=send)
            for s in socks:
                s.close()
            time.sleep(0.3)
        idle = _pace(child.pid, [], [frame], seconds / 2, send=False, count=calls)
        for row in (SOCKET_OUT, CALL_OUT):
            out[row] -= idle            # the shared ticker's own wake-ups
        return out
    except OSError:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-3000:])
        raise
    finally:
        child.terminate()
        child.wait(5)
        log.close()


def _pace(pid: int, socks: list[socket.socket], frames: list[bytes], seconds: float, *, send: bool,
          count: int | None = None) -> float:
    """Every 20 ms: one frame on each socket (send) or drain them (receive); server CPU µs per message."""
    time.sleep(0.5)             # connections settle
    ticks = int(seconds * 50)
    c0 = _cpu_s(pid)
    due = time.monotonic()
    for i in range(ticks):
        for s in socks:
            if send:
                s.send(frames[i % len(frames)])
            else:
                try:
                    while s.recv(65536):
                        pass
                except BlockingIOError:
                    pass
        due += 0.02
        time.sleep(max(0.0, due - time.monotonic()))
    used = _cpu_s(pid) - c0
    return used / (ticks * (count if count is not None else len(socks))) * 1e6


# --------------------------------------------------------------------------- report

def measure(args: argparse.Namespace, cwd: Path) -> dict[str, dict[str, float]]:
    inbound = inbound_stages(args.repeats)
    outbound = outbound_stages(args.repeats)
    if args.ws_calls:
        rows = websocket_rows(args.ws, args.ws_calls, args.ws_seconds, cwd)
        inbound = {SOCKET_IN: rows[SOCKET_IN], **inbound, CALL_IN: rows[CALL_IN]}
        outbound = {**outbound, SOCKET_OUT: rows[SOCKET_OUT], CALL_OUT: rows[CALL_OUT]}
    return {"inbound": inbound, "outbound": outbound}


def _in_worktree(ref: str, argv: list[str]) -> dict[str, dict[str, float]]:
    """Run this script against ``ref``'s code: a temporary worktree is first on the child's path."""
    with tempfile.TemporaryDirectory(prefix="voxray-bench-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), ref], check=True)
        try:
            # the script itself comes from this tree, so an older ref needs no copy of it
            (tree / "bench").mkdir(exist_ok=True)
            (tree / "bench" / "__init__.py").touch()
            (tree / "bench" / "per_message.py").write_text(Path(__file__).read_text())
            out = subprocess.run([sys.executable, "-m", "bench.per_message", *argv, "--json-out", "-"], cwd=tree,
                                 env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True,
                                 text=True)
            return json.loads(out.stdout)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def print_table(columns: dict[str, dict[str, dict[str, float]]]) -> None:
    names = list(columns)
    width = max(len(n) for n in names) + 2
    for direction in ("inbound", "outbound"):
        rows = list(next(iter(columns.values()))[direction])
        print(f"\n{direction} µs per message".ljust(64) + "".join(n.rjust(max(width, 10)) for n in names)
              + ("  ratio" if len(names) == 2 else ""))
        for row in rows:
            values = [columns[n][direction].get(row) for n in names]
            cells = "".join((f"{v:.2f}" if v is not None else "-").rjust(max(width, 10)) for v in values)
            ratio = ""
            if len(values) == 2 and values[0] and values[1] is not None:
                ratio = f"  x{values[1] / values[0]:.2f}"
            print(f"  {row:<62}{cells}{ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", metavar="REF", help="also measure this git ref (e.g. main) and print both")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per in-process stage (median)")
    p.add_argument("--ws", default="gateway", help="uvicorn ws implementation for the socket rows "
                   "(gateway = what build_server chooses; websockets, websockets-sansio, wsproto)")
    p.add_argument("--ws-calls", type=int, default=50, help="loopback connections for the socket rows (0: skip)")
    p.add_argument("--ws-seconds", type=float, default=4.0, help="seconds per socket row")
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = ["--repeats", str(args.repeats), "--ws", args.ws, "--ws-calls", str(args.ws_calls),
            "--ws-seconds", str(args.ws_seconds)]
    columns: dict[str, dict[str, dict[str, float]]] = {}
    if args.compare:
        columns[args.compare] = _in_worktree(args.compare, argv)
    here = measure(args, ROOT)
    if args.json_out == "-":
        print(json.dumps(here))
        return
    columns["this tree"] = here
    print_table(columns)


if __name__ == "__main__":
    main()
