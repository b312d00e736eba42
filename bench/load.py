"""Load benchmark: N concurrent simulated Twilio calls, real-time paced, against one gateway (one process, or
``--workers N`` processes on one port).

The fake OpenAI server (fixed STT/LLM/TTS delays) and the gateway (``python -m gateway serve``) run as
subprocesses; this process runs every :class:`~gateway.simulate.call.SimulatedCall` on one event loop
(uvloop when installed). For each N it measures, over the steady-state window (all N calls talking):

* latency      = first outbound audio frame after the caller's speech - the end of that speech
* added        = latency - vad_stop_ms - (stt + llm + tts delays of the fake) [- LLM token waits of the
                 first clause, zero here: the reply's first clause "Sure." is one token]
* CPU          = gateway utime+stime from /proc/<pid>/stat: % of one core and ms CPU per call-second
                 (with ``--workers N``: summed over the supervisor and its worker processes)
* RSS          = gateway VmRSS at idle before any call and peak with N calls: (peak - idle) / N (summed likewise)
* gaps         = SimulatedCall.received.underruns (playback ran dry inside an answer) and the largest
                 gap within one answer between the end of a media message's audio (counted from its arrival)
                 and the next message's arrival: the spacing the carrier's buffer (the lead) must absorb
* failures     = calls that failed to dial / connect / get audio, or were closed by the gateway
* refused      = calls the gateway turned away at admission with a clean answer (503, or the carrier's busy
                 markup with no media stream); they are not failures, and CPU and RSS per call count the
                 admitted calls only (``--set max_concurrent_calls=50 --calls 100``: the overload run)

``--vad energy,silero`` runs everything once per ``vad_type``, each against a fresh gateway, and prints the
gateway CPU per call-second side by side. The caller then speaks a Piper sentence (``voxray[local]``; trimmed
to its last voiced sample) in every run, since Silero rightly takes the synthetic voice for no speech.

``--engine realtime`` runs the calls through the speech-to-speech engine instead of the cascade
(``llm_provider: "realtime"``) against the fake Realtime API (``tests/fakes/realtime_server.py``, another
subprocess: its server VAD ends the turn after ``--vad-stop-ms`` of silence, its first audio comes
``--rt-first-audio-ms`` later); ``added`` then subtracts those two, and CPU is the same gateway figure, so
the two engines' runs sit side by side. Phone calls only.

``--transports phone,ws,webrtc`` measures browser sessions too (``bench/browsers.py``: ``GET /ws`` PCM16 and
WebRTC over aiortc), each transport against a fresh gateway process, one after the other in the same run, at
``--calls`` (phone), ``--ws-sessions`` and ``--webrtc-sessions`` levels.

Usage::

    .venv/bin/python -m bench.load [--calls 1,50,100,150,200] [--seconds 30] [--json out.json]
    .venv/bin/python -m bench.load --calls 20 --seconds 20 --vad energy,silero
    .venv/bin/python -m bench.load --calls 50,100,150 --workers 2      # two worker processes on one port
    .venv/bin/python -m bench.load --calls 1,20,50 --engine realtime
    .venv/bin/python -m bench.load --transports phone,ws,webrtc --calls 1,8,50,100 --ws-sessions 1,8,50,100 \
        --webrtc-sessions 1,4,8,12

See docs/BENCHMARKS.md for definitions, the reproduction command and measured figures.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import browsers
from gateway.simulate.call import BusyAnswer, SimulatedCall
from pipeline.audio import rms, ulaw_decode, ulaw_encode
from pipeline.text import ClauseSplitter

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

ACCOUNT_SID = "AC" + "be" * 16
AUTH_TOKEN = "bench-auth-token-0123456789"
PUBLIC_URL = "https://bench.example.test"
TRANSCRIPT = "I would like to book a table for two people tonight."
REPLY = "Sure. I can book a table for two people at seven tonight."
QUIET_MS = 300.0                 # the agent has finished when nothing played or arrived for this long
CLIENT_SATURATED = 85.0          # % of one core: above it the client's lag pollutes the latencies
TRANSPORTS = {"phone": "Twilio Media Streams, µ-law 8 kHz", "ws": "GET /ws, PCM16 16 kHz",
              "webrtc": "WebRTC (aiortc), Opus 48 kHz"}


# ---------------------------------------------------------------------------------------------- audio
def synthetic_speech(seconds: float = 1.2, rate: int = 8000, f0: float = 150.0, syllable_hz: float = 4.0,
                     level_rms: float = 0.2, seed: int = 7) -> bytes:
    """Voiced, speech-like PCM16: a 150 Hz harmonic-rich source with a gentle pitch contour, amplitude-
    modulated at syllable rate (envelope 0.2..1.0). It ends exactly at the last sample, at full level:
    no trailing silence, so "end of speech" is the moment the last frame is sent."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    f = f0 * (1.0 + 0.06 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f) / rate
    k_max = int(3400 / (f0 * 1.06))
    x = np.zeros(n)
    for k in range(1, k_max + 1):
        x += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k
    x *= level_rms / np.sqrt(np.mean(x * x))
    x *= 0.6 + 0.4 * np.cos(2 * np.pi * syllable_hz * (t - t[-1]))   # 1.0 at the last sample
    fade = int(0.005 * rate)
    x[:fade] *= np.linspace(0.0, 1.0, fade)
    return (np.clip(x, -0.98, 0.98) * 32767).astype("<i2").tobytes()


def piper_speech(text: str = TRANSCRIPT, rate: int = 8000) -> bytes:
    """Real speech (Piper, tests/speech.py) from its first to its last voiced 10 ms (RMS > 0.01), so that, as
    with :func:`synthetic_speech`, "end of speech" is the moment the last frame is sent."""
    from tests.speech import speech_pcm

    pcm = speech_pcm(text, sample_rate=rate)
    step = rate // 100 * 2
    loud = [i for i in range(0, len(pcm), step) if rms(pcm[i:i + step]) > 0.01]
    return pcm[loud[0]:loud[-1] + step]


def frame_rms_range(pcm: bytes, rate: int = 8000) -> tuple[float, float, float]:
    """(min, overall, last-frame) RMS of the speech as the gateway will hear it (after µ-law)."""
    heard = ulaw_decode(ulaw_encode(pcm))
    step = rate // 50 * 2
    frames = [heard[i:i + step] for i in range(step, len(heard), step)]      # the 5 ms fade-in excluded
    return min(rms(f) for f in frames), rms(heard), rms(frames[-1])


def first_clause_tokens(reply: str) -> int:
    """How many of the fake LLM's tokens the gateway needs before it can speak the first clause."""
    splitter = ClauseSplitter()
    tokens = re.findall(r"\S+\s*", reply)
    for i, token in enumerate(tokens, 1):
        if splitter.feed(token):
            return i
    return len(tokens)


# ---------------------------------------------------------------------------------------------- /proc
def proc_cpu_s(pid: int, tid: int | None = None, *, kernel_only: bool = False) -> float:
    """utime + stime (or stime alone) of a process, or of one of its threads (the main thread's tid is the
    pid), in seconds."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2:].split()       # fields from 3 (state) on
    return (int(rest[12]) + (0 if kernel_only else int(rest[11]))) / CLK_TCK


def family(pid: int) -> list[int]:
    """The process and its children (with ``--workers``: the supervisor and its workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(c) for c in f.read().split())]
    except OSError:
        return [pid]


def family_cpu_s(pid: int, *, main_threads: bool = False, kernel_only: bool = False) -> float:
    """:func:`proc_cpu_s` summed over :func:`family` (a child that exits meanwhile counts as 0)."""
    total = 0.0
    for p in family(pid):
        with contextlib.suppress(OSError, ValueError):
            total += proc_cpu_s(p, p if main_threads else None, kernel_only=kernel_only)
    return total


def proc_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MB, thread count), summed over the process and its children."""
    rss_kb, threads = 0, 0
    for p in family(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
    return rss_kb / 1024.0, threads


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


@dataclass
class CpuSample:
    at: float
    gateway: float
    fake: float
    client: float
    sys_busy: float
    sys_total: float
    gateway_loop: float = 0.0     # the main thread's share (the event loop); the rest is worker threads
    client_loop: float = 0.0
    gateway_kernel: float = 0.0   # stime: syscalls (socket I/O, loopback delivery), wake-ups

    @classmethod
    def take(cls, gateway_pid: int, fake_pid: int) -> CpuSample:
        busy, total = system_cpu()
        me = os.getpid()
        return cls(time.monotonic(), family_cpu_s(gateway_pid), proc_cpu_s(fake_pid), proc_cpu_s(me),
                   busy, total, family_cpu_s(gateway_pid, main_threads=True), proc_cpu_s(me, me),
                   family_cpu_s(gateway_pid, kernel_only=True))


# ---------------------------------------------------------------------------------------------- subprocesses
class Child:
    """A subprocess this benchmark started (and alone stops), logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 niceness: int = 0, cwd: Path = ROOT) -> None:
        self.name, self.log = name, log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
        self.pid = self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready_url(child: Child, timeout_s: float = 30.0) -> str:
    """The URL a fake server prints as ``READY <url>`` once it listens (stopping it if it never does)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child.check_alive()
        for line in child.log.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return line.split(None, 1)[1].strip()
        time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"the {child.name} did not print READY within {timeout_s:g} s:\n{child.tail()}")


def start_fake(args: argparse.Namespace, workdir: Path) -> tuple[Child, str]:
    argv = [sys.executable, "-m", "tests.fakes.openai_server", "--port", "0",
            "--stt-delay-ms", str(args.stt_ms), "--llm-delay-ms", str(args.llm_ms), "--tts-delay-ms", str(args.tts_ms),
            "--llm-token-interval-ms", str(args.token_ms), "--tts-ms-per-char", str(args.tts_ms_per_char),
            "--tts-chunk-ms", str(args.tts_chunk_ms),
            "--transcript", TRANSCRIPT, "--reply", REPLY]
    child = Child("fake OpenAI server", argv, workdir / "fake_openai.log")   # inherits the client's --nice
    return child, ready_url(child)


def start_realtime_fake(args: argparse.Namespace, workdir: Path) -> tuple[Child, str]:
    """The fake Realtime API: every response says REPLY after ``--rt-first-audio-ms``."""
    argv = [sys.executable, "-m", "tests.fakes.realtime_server", "--api-key", "sk-bench", "--silence-ms",
            str(args.vad_stop_ms), "--first-audio-ms", str(args.rt_first_audio_ms), "--ms-per-char",
            str(args.tts_ms_per_char), "--reply", REPLY]
    child = Child("fake Realtime server", argv, workdir / "fake_realtime.log")
    return child, ready_url(child)


def start_gateway(args: argparse.Namespace, workdir: Path, fake_url: str, transport: str = "phone",
                  realtime_url: str = "") -> tuple[Child, str]:
    port = free_port()
    closed_port = free_port()          # nothing listens here: a REST hang-up would fail fast, and none is made
    config = {
        "host": "127.0.0.1", "port": port, "public_url": PUBLIC_URL, "log_level": "warning",
        "provider": "openai", "api_keys": {"openai": "sk-bench"}, "base_urls": {"openai": fake_url},
        "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                "api_base_url": f"http://127.0.0.1:{closed_port}"}},
        "vad_stop_ms": args.vad_stop_ms, "vad_type": args.vad_type,
    }
    if args.workers != 1:               # (a --root checkout older than the key would refuse it)
        config["workers"] = args.workers
    if realtime_url:
        config.update(llm_provider="realtime", base_urls={"openai": fake_url, "realtime": realtime_url})
    if transport != "phone":
        config["webrtc_ice_servers"] = []      # host candidates only (never aiortc's default public STUN server)
    for item in args.set:                # --set key=value (JSON value, else a string)
        key, _, value = item.partition("=")
        try:
            config[key] = json.loads(value)
        except ValueError:
            config[key] = value
    suffix = "" if transport == "phone" else f"_{transport}"
    path = workdir / f"config{suffix}.json"
    path.write_text(json.dumps(config, indent=2))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY" and not k.startswith("VOXRAY_")}
    child = Child("gateway", [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                  workdir / f"gateway{suffix}.log", env=env, niceness=-args.nice,   # back to normal priority
                  cwd=Path(args.root) if args.root else ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(child, url, workers=args.workers)
    return child, url


def wait_healthy(child: Child, url: str, timeout: float = 60.0, workers: int = 1) -> None:
    """Until the gateway ``child`` at ``url`` answers /health, and with ``workers`` > 1 its /ready counts them
    all (stopped and an error after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if httpx.get(url + "/health", timeout=1).status_code == 200 and (
                    workers == 1 or httpx.get(url + "/ready", timeout=1).json()["workers"] == workers):
                return
        time.sleep(0.1)
    child.stop()
    raise RuntimeError(f"the gateway did not answer /health within {timeout:.0f} s:\n{child.tail()}")


# ---------------------------------------------------------------------------------------------- one level
class CallFailed(Exception):
    pass


@dataclass
class Turn:
    call: int
    end: float        # speak() returned: the last speech frame went out
    first: float      # first media frame of the answer arrived
    quiet: float      # the answer had played out and nothing arrived for QUIET_MS


@dataclass
class Level:
    n: int
    gateway_pid: int
    fake_pid: int
    ready: int = 0
    window_start: CpuSample | None = None
    window_end: CpuSample | None = None
    turns: list[Turn] = field(default_factory=list)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    refused: list[tuple[int, int]] = field(default_factory=list)    # (call, HTTP status): a clean refusal
    calls: dict[int, Any] = field(default_factory=dict)        # SimulatedCall, or a bench.browsers session
    lags: list[float] = field(default_factory=list)
    probes: dict[str, list[float]] = field(default_factory=lambda: {"gateway": [], "fake": []})

    @property
    def steady(self) -> bool:
        return self.window_start is not None and self.window_end is None

    def setup_done(self) -> None:
        self.ready += 1
        if self.ready == self.n and self.window_start is None:
            self.window_start = CpuSample.take(self.gateway_pid, self.fake_pid)

    def loop_done(self) -> None:
        if self.window_end is None and self.window_start is not None:
            self.window_end = CpuSample.take(self.gateway_pid, self.fake_pid)


async def wait_quiet(call: SimulatedCall, quiet_ms: float, timeout: float) -> float:
    """SimulatedCall.wait_quiet's condition (played out, nothing new for quiet_ms), but sleeping until the
    moment it can hold instead of polling every 20 ms (200 polling calls cost the client real CPU)."""
    quiet = quiet_ms / 1000.0
    async with asyncio.timeout(timeout):
        while True:
            last = call.received.media[-1][0] if call.received.media else 0.0
            target = max(call._play_end, last + quiet)      # noqa: SLF001 - the emulator's playback clock
            now = time.monotonic()
            if now >= target:
                return now
            await asyncio.sleep(target - now + 0.001)


async def one_call(i: int, lvl: Level, url: str, http: httpx.AsyncClient, speech: bytes, start_at: float,
                   seconds: float, rng: random.Random, transport: str = "phone", ws_compression: str | None = None,
                   silent: bool = False) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    if transport == "phone":
        call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
                             http=http)
    else:
        call = browsers.make_session(transport, url, http, ws_compression=ws_compression)
    lvl.calls[i] = call
    stage, in_loop = "dial", False
    speech_s = len(speech) / 16000.0
    try:
        if transport == "phone":
            try:
                response = await call.dial()
            except BusyAnswer:                                  # "all lines are busy", then hang up
                lvl.refused.append((i, 200))
                lvl.setup_done()
                return
            if response.status_code == 503:                     # for the carrier's fallback URL
                lvl.refused.append((i, 503))
                lvl.setup_done()
                return
            if response.status_code != 200:
                raise CallFailed(f"webhook answered HTTP {response.status_code}")
            stage = "connect"
            async with asyncio.timeout(10):
                await call.connect()
        else:
            stage = "connect"
            async with asyncio.timeout(20):
                await call.open()
        stage = "greeting"
        await call.wait_audio(after=0.0, timeout=15)
        await wait_quiet(call, QUIET_MS, timeout=30)
        in_loop = True
        lvl.setup_done()
        stage = "turn"
        loop_end = time.monotonic() + seconds
        if silent:                      # the caller only listens: silence frames, no turns
            await asyncio.sleep(seconds)
        while not silent and time.monotonic() < loop_end:
            if call._closed.is_set():   # noqa: SLF001 - part of the surface both call kinds share (bench/browsers.py)
                raise CallFailed(f"closed by the gateway (code {call.close_code} {call.close_reason!r})")
            async with asyncio.timeout(speech_s + 10):
                end = await call.speak(speech)
            first = await call.wait_audio(after=end, timeout=10)
            quiet = await wait_quiet(call, QUIET_MS, timeout=30)
            lvl.turns.append(Turn(i, end, first, quiet))
            await asyncio.sleep(rng.uniform(0.5, 1.5))
        lvl.loop_done()
        stage = "hang-up"
        await call.hang_up()
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, never fatal
        lvl.failures.append((i, stage, f"{type(exc).__name__}: {exc}"[:200]))
        if not in_loop:
            lvl.setup_done()
        with contextlib.suppress(Exception):
            await call.close()


async def lag_monitor(lvl: Level, stop: asyncio.Event) -> None:
    """The client loop's lateness on a 10 ms timer (recorded inside the steady window)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.01)
        if lvl.steady:
            lvl.lags.append(max(0.0, loop.time() - t - 0.01))


async def probe(name: str, url: str, lvl: Level, stop: asyncio.Event) -> None:
    """Round trip of a trivial GET every 50 ms on its own connection: how quickly the process's event loop
    answers while it carries the calls (gateway: /health; fake: a 405 from a POST-only route)."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        while not stop.is_set():
            t = time.monotonic()
            try:
                await http.get(url)
                rtt = time.monotonic() - t
            except httpx.HTTPError:
                rtt = 5.0
            if lvl.steady:
                lvl.probes[name].append(rtt)
            await asyncio.sleep(0.05)


async def rss_monitor(pid: int, out: dict[str, float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss, threads = proc_status(pid)
        out["peak_rss_mb"] = max(out.get("peak_rss_mb", 0.0), rss)
        out["peak_threads"] = max(out.get("peak_threads", 0), threads)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


_HIST = re.compile(r'voxray_turn_latency_seconds_(sum|count)\{stage="(\w+)"\} ([0-9.eE+-]+)')


async def server_stage_totals(http: httpx.AsyncClient, url: str) -> dict[tuple[str, str], float]:
    text = (await http.get(url + "/metrics")).text
    return {(m[2], m[1]): float(m[3]) for m in _HIST.finditer(text)}


async def wait_idle(http: httpx.AsyncClient, url: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    active = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            active = int((await http.get(url + "/ready")).json()["active_calls"])
            if active == 0:
                return 0
        await asyncio.sleep(0.2)
    return active


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ramp_s(n: int, args: argparse.Namespace) -> float:
    """Seconds over which a level's calls or sessions start: N/50 s, at least 2 s (unless --ramp)."""
    return args.ramp if args.ramp is not None else max(2.0, n / 50.0)


async def run_level(n: int, args: argparse.Namespace, url: str, fake_url: str, gateway: Child, fake: Child,
                    http: httpx.AsyncClient, speech: bytes, idle0_mb: float, fixed_ms: float,
                    transport: str = "phone") -> dict[str, Any]:
    left = await wait_idle(http, url)
    await asyncio.sleep(args.settle)
    idle_mb, idle_threads = proc_status(gateway.pid)
    before = await server_stage_totals(http, url)
    # What the client holds so far never dies: out of its collector's way, or a full collection (22 ms
    # measured at 100 calls) stalls every simulated caller at once and lands in the latencies.
    gc.collect()
    gc.freeze()
    lvl = Level(n, gateway.pid, fake.pid)
    stop = asyncio.Event()
    rss: dict[str, float] = {}
    monitors = [asyncio.create_task(lag_monitor(lvl, stop)), asyncio.create_task(rss_monitor(gateway.pid, rss, stop)),
                asyncio.create_task(probe("gateway", url + "/health", lvl, stop)),
                asyncio.create_task(probe("fake", fake_url + "/chat/completions", lvl, stop))]
    ramp = ramp_s(n, args)
    t0 = time.monotonic()
    rngs = [random.Random(args.seed * 100003 + n * 1009 + i) for i in range(n)]
    await asyncio.gather(*(one_call(i, lvl, url, http, speech, t0 + (i * ramp / n if n > 1 else 0.0), args.seconds,
                                    rngs[i], transport, args.ws_compression, args.silent) for i in range(n)))
    finished = CpuSample.take(gateway.pid, fake.pid)
    stop.set()
    await asyncio.gather(*monitors)
    after = await server_stage_totals(http, url)
    gateway.check_alive()

    start = lvl.window_start or CpuSample(t0, 0, 0, 0, 0, 0)
    end = lvl.window_end or finished
    span = max(1e-9, end.at - start.at)
    in_window = [t for t in lvl.turns if start.at <= t.end <= end.at] or lvl.turns
    lat_ms = [(t.first - t.end) * 1000.0 for t in in_window]
    added_ms = [x - fixed_ms for x in lat_ms]

    # outbound gaps: how much later than the end of its audio the next media message came, inside each answer
    max_gap_ms, answer_ms, late_offsets = 0.0, [], []
    by_call: dict[int, list[Turn]] = {}
    for t in lvl.turns:
        by_call.setdefault(t.call, []).append(t)
    for i, turns in by_call.items():
        media = lvl.calls[i].received.media
        times = [m[0] for m in media]
        rate = getattr(lvl.calls[i], "rate", 8000)                 # media holds (arrival, samples) at the call's rate
        for t in turns:
            lo, hi = bisect.bisect_left(times, t.first), bisect.bisect_right(times, t.quiet)
            if hi - lo > 1:
                gap, at = max((media[k + 1][0] - media[k][0] - media[k][1] / rate, media[k][0])
                              for k in range(lo, hi - 1))
                max_gap_ms = max(max_gap_ms, gap * 1000.0)
                if gap * 1000.0 > args.target_gap_ms:
                    late_offsets.append((at - t.first) * 1000.0)    # where in the answer the gap opened
            answer_ms.append(sum(m[1] for m in media[lo:hi]) * 1000.0 / rate)
    underruns = [u for c in lvl.calls.values() for u in c.received.underruns]
    invalid = sum(len(c.received.invalid) for c in lvl.calls.values())

    stages = {}
    for stage in ("turn_wait", "stt", "llm_first_token", "tts_first_audio", "first_audio_out"):
        count = after.get((stage, "count"), 0.0) - before.get((stage, "count"), 0.0)
        total = after.get((stage, "sum"), 0.0) - before.get((stage, "sum"), 0.0)
        stages[stage] = round(total / count * 1000.0, 2) if count else None

    gw_cpu_s = end.gateway - start.gateway
    admitted = max(1, n - len(lvl.refused))
    cpu_pct = gw_cpu_s / span * 100.0
    lags_ms = [x * 1000.0 for x in lvl.lags]
    peak = rss.get("peak_rss_mb", idle_mb)
    result = {
        "calls": n, "ramp_s": ramp, "window_s": round(span, 2), "turns_total": len(lvl.turns),
        "turns_measured": len(in_window), "calls_left_over_before": left,
        "latency_ms": {"p50": pct(lat_ms, 50), "p90": pct(lat_ms, 90), "p99": pct(lat_ms, 99),
                       "max": max(lat_ms) if lat_ms else None},
        "added_ms": {"p50": pct(added_ms, 50), "p90": pct(added_ms, 90), "p99": pct(added_ms, 99),
                     "max": max(added_ms) if added_ms else None},
        "gateway_cpu_pct": cpu_pct, "gateway_cpu_ms_per_call_s": gw_cpu_s * 1000.0 / (span * admitted),
        "gateway_rss_idle_before_mb": idle_mb, "gateway_rss_idle_first_mb": idle0_mb, "gateway_rss_peak_mb": peak,
        "rss_per_call_mb": (peak - idle0_mb) / admitted, "rss_per_call_vs_level_idle_mb": (peak - idle_mb) / admitted,
        "gateway_threads_idle": idle_threads, "gateway_threads_peak": rss.get("peak_threads", idle_threads),
        "max_underrun_ms": max(underruns) * 1000.0 if underruns else 0.0, "underruns": len(underruns),
        "max_interarrival_gap_ms": max_gap_ms,
        "answers": len(answer_ms), "answers_with_gap_over_target": len(late_offsets),
        "gap_over_target_offset_ms_p50": pct(late_offsets, 50),
        "answer_audio_ms_p50": pct(answer_ms, 50),
        "failures": len(lvl.failures), "failure_details": [list(f) for f in lvl.failures[:20]],
        "refused": len(lvl.refused), "refused_statuses": sorted({status for _, status in lvl.refused}),
        "invalid_messages": invalid,
        "client_cpu_pct": (end.client - start.client) / span * 100.0,
        # the event-loop (main) thread's part; the rest ran on threads (aiortc's codecs, executors)
        "gateway_loop_cpu_pct": (end.gateway_loop - start.gateway_loop) / span * 100.0,
        "client_loop_cpu_pct": (end.client_loop - start.client_loop) / span * 100.0,
        "gateway_kernel_cpu_pct": (end.gateway_kernel - start.gateway_kernel) / span * 100.0,
        "fake_cpu_pct": (end.fake - start.fake) / span * 100.0,
        "machine_cpu_pct": ((end.sys_busy - start.sys_busy) / max(1.0, end.sys_total - start.sys_total)
                            * 100.0 * (os.cpu_count() or 1)),
        "client_loop_lag_ms": {"p50": pct(lags_ms, 50), "p99": pct(lags_ms, 99), "max": max(lags_ms) if lags_ms else None},
        "server_stage_means_ms": stages,
        "probe_rtt_ms": {name: {"p50": pct([x * 1000 for x in v], 50), "p99": pct([x * 1000 for x in v], 99),
                                "max": max(v) * 1000 if v else None} for name, v in lvl.probes.items()},
        "turn_timeline": [[round(t.end - t0, 3), round((t.first - t.end) * 1000.0, 1)] for t in
                          sorted(lvl.turns, key=lambda t: t.end)],
    }
    # CPU used on this machine by processes other than the three of the benchmark (other work competing)
    result["others_cpu_pct"] = max(0.0, result["machine_cpu_pct"] - cpu_pct - result["client_cpu_pct"]
                                   - result["fake_cpu_pct"])
    if transport != "phone":
        result["transport"] = transport
        jitter = [x for c in lvl.calls.values() for x in getattr(c, "jitter_ms", [])]
        if jitter:                   # WebRTC: what the client's own receive jitter buffer adds (not in latency)
            result["client_jitter_buffer_ms"] = {"p50": pct(jitter, 50), "p99": pct(jitter, 99)}
    return result


# ---------------------------------------------------------------------------------------------- report
def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


HEADER = ("{:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7} {:>8} {:>7} {:>5} {:>7} {:>7} {:>7} {:>6} {:>7}"
          .format("N", "turns", "lat p50", "lat p99", "add p50", "add p99", "CPU %", "ms/call-s", "RSS MB", "MB/call",
                  "underrun", "gap ms", "fail", "refused", "cli CPU", "box CPU", "others", "lag p99"))


def row(r: dict[str, Any]) -> str:
    return "{:>4} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7} {:>8} {:>7} {:>5} {:>7} {:>7} {:>7} {:>6} {:>7}".format(
        r["calls"], r["turns_measured"], _f(r["latency_ms"]["p50"]), _f(r["latency_ms"]["p99"]),
        _f(r["added_ms"]["p50"]), _f(r["added_ms"]["p99"]), _f(r["gateway_cpu_pct"]),
        _f(r["gateway_cpu_ms_per_call_s"], "{:.2f}"), _f(r["gateway_rss_peak_mb"]), _f(r["rss_per_call_mb"], "{:.3f}"),
        _f(r["max_underrun_ms"]), _f(r["max_interarrival_gap_ms"]), r["failures"], r["refused"], _f(r["client_cpu_pct"]),
        _f(r["machine_cpu_pct"]), _f(r["others_cpu_pct"], "{:.0f}"), _f(r["client_loop_lag_ms"]["p99"]))


def targets(r: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, bool]]:
    add = r["added_ms"]["p99"]
    return [(f"p99 added <= {args.target_added_ms:g} ms", add is not None and add <= args.target_added_ms),
            (f"RSS/call <= {args.target_rss_mb:g} MB", r["rss_per_call_mb"] <= args.target_rss_mb),
            # a gap is silence the caller hears: the carrier's playback running dry inside an answer. Frame
            # spacing jitter below the outbound lead is absorbed by the carrier's buffer (reported apart).
            (f"no outbound gap > {args.target_gap_ms:g} ms (playback underrun; max message spacing beyond its audio "
             f"{r['max_interarrival_gap_ms']:.0f} ms absorbed by the lead)",
             r["max_underrun_ms"] <= args.target_gap_ms),
            ("no failures", r["failures"] == 0)]


# ---------------------------------------------------------------------------------------------- main
async def bench(args: argparse.Namespace, levels: list[int], transport: str = "phone",
                workdir: Path | None = None, fake: Child | None = None, fake_url: str = "") -> dict[str, Any]:
    """One transport's levels against a fresh gateway (and the fake, started here unless given)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="voxray-bench-"))
    speech = piper_speech() if args.piper_speech else synthetic_speech(args.speech_s)
    rms_min, rms_all, rms_last = frame_rms_range(speech)
    tokens = first_clause_tokens(REPLY)
    fixed_ms = args.vad_stop_ms + args.stt_ms + args.llm_ms + args.tts_ms + (tokens - 1) * args.token_ms
    if args.engine == "realtime":
        fixed_ms = args.vad_stop_ms + args.rt_first_audio_ms
    own_fake, gateway, realtime, cascade_fake = fake is None, None, None, fake
    try:
        if fake is None:
            fake, fake_url = start_fake(args, workdir)
        cascade_fake = fake
        realtime_url = ""
        if args.engine == "realtime":       # the cascade's fake stays up: the TTS stage renders the apology
            realtime, realtime_url = start_realtime_fake(args, workdir)
            fake = realtime                 # the fake whose CPU is measured: the one the calls talk to
        gateway, url = start_gateway(args, workdir, fake_url, transport, realtime_url)
        idle0_mb, threads0 = proc_status(gateway.pid)
        if transport != "phone":
            print(f"\n== {transport}: {TRANSPORTS[transport]} (N = concurrent sessions) ==")
        print(f"gateway pid {gateway.pid} at {url} (idle RSS {idle0_mb:.1f} MB, {threads0} threads); "
              f"fake OpenAI pid {fake.pid} at {fake_url}; logs in {workdir}")
        print(f"vad_type {args.vad_type}; speech: {len(speech) / 16:.0f} ms "
              f"{'Piper' if args.piper_speech else 'synthetic voiced'} PCM, RMS {rms_all:.3f} "
              f"(min 20 ms frame {rms_min:.3f}, "
              f"last frame {rms_last:.3f}; VAD threshold 0.02, stop below 0.012)")
        if args.engine == "realtime":
            print(f"engine realtime; fixed: the fake's server VAD silence {args.vad_stop_ms} + first audio "
                  f"{args.rt_first_audio_ms:g} = {fixed_ms:g} ms subtracted from latency to give 'added'")
        else:
            print(f"fixed: vad_stop {args.vad_stop_ms} + stt {args.stt_ms:g} + llm {args.llm_ms:g} + tts "
                  f"{args.tts_ms:g} + {tokens - 1} token waits = {fixed_ms:g} ms subtracted from latency to give "
                  "'added'")
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        results = []
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(20.0)) as http:
            print(HEADER, flush=True)
            for n in levels:
                profiler = None
                if args.profile and n == levels[-1]:
                    ramp = ramp_s(n, args)
                    profiler = asyncio.create_task(profile_gateway(gateway.pid, args, delay=args.settle + ramp + 4.0))
                r = await run_level(n, args, url, fake_url, gateway, fake, http, speech, idle0_mb, fixed_ms, transport)
                if profiler is not None:
                    r["profile"] = await profiler
                results.append(r)
                print(row(r), flush=True)
                if r["client_cpu_pct"] > CLIENT_SATURATED:
                    print(f"     WARNING: the client used {r['client_cpu_pct']:.0f}% of a core: its own lag is in "
                          "these latencies and gaps, not only the server's", flush=True)
                for i, stage, error in r["failure_details"][:3]:
                    print(f"     failure: call {i} at {stage}: {error}", flush=True)
        return {"workdir": str(workdir), "fixed_ms": fixed_ms, "first_clause_tokens": tokens,
                "speech": {"ms": len(speech) / 16, "rms": rms_all, "min_frame_rms": rms_min,
                           "last_frame_rms": rms_last},
                "gateway_idle_rss_mb": idle0_mb, "gateway_idle_threads": threads0, "levels": results}
    finally:
        for child in (gateway, realtime, cascade_fake if own_fake else None):
            if child is not None:
                child.stop()


async def bench_transports(args: argparse.Namespace, plan: list[tuple[str, list[int]]]) -> dict[str, Any]:
    """Each transport in turn, each against its own fresh gateway (so its idle RSS is its baseline), one fake."""
    workdir = Path(tempfile.mkdtemp(prefix="voxray-bench-"))
    fake, fake_url = start_fake(args, workdir)
    out: dict[str, Any] = {}
    try:
        for transport, levels in plan:
            out[transport] = await bench(args, levels, transport, workdir, fake, fake_url)
    finally:
        fake.stop()
    return out


async def profile_gateway(pid: int, args: argparse.Namespace, delay: float) -> str:
    """py-spy the gateway for a while in the middle of the last level (perturbs that level's figures)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return "py-spy not installed"
    await asyncio.sleep(delay)
    duration = max(5, int(args.seconds * 0.5))
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(pid), "--duration", str(duration), "--rate", "25" if args.profile_native else "200",
        *(["--native"] if args.profile_native else ["--nonblocking"]),   # native stacks need the target paused
        "--format", "raw" if args.profile.endswith(".txt") else "speedscope", "-o", args.profile,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode(errors="replace")[-500:]


def report(levels_out: list[dict[str, Any]], args: argparse.Namespace, transport: str = "phone") -> None:
    """The lines under one transport's table: p99 against N=1, per-level detail, the phone targets."""
    if transport != "phone":
        print(f"\n-- {transport} --")
    base = next((r for r in levels_out if r["calls"] == 1), None)
    if base is not None and base["added_ms"]["p99"] is not None:
        parts = []
        for r in levels_out:
            if r["calls"] != 1 and r["added_ms"]["p99"] is not None:
                d = r["added_ms"]["p99"] - base["added_ms"]["p99"]
                ratio = r["added_ms"]["p99"] / base["added_ms"]["p99"] if base["added_ms"]["p99"] > 0 else float("nan")
                r["added_p99_ratio_to_n1"] = ratio
                parts.append(f"N={r['calls']}: x{ratio:.2f} ({d:+.1f} ms)")
        if parts:
            print("server-added p99 relative to N=1 (same run): " + ", ".join(parts))
    for r in levels_out:
        stages = r["server_stage_means_ms"]
        jitter = r.get("client_jitter_buffer_ms")
        print(f"N={r['calls']}: gateway-side stage means (ms) " + " ".join(f"{k}={v}" for k, v in stages.items())
              + f"; probe RTT ms gateway p50/p99/max {_f(r['probe_rtt_ms']['gateway']['p50'])}/"
              f"{_f(r['probe_rtt_ms']['gateway']['p99'])}/{_f(r['probe_rtt_ms']['gateway']['max'])}, fake "
              f"{_f(r['probe_rtt_ms']['fake']['p50'])}/{_f(r['probe_rtt_ms']['fake']['p99'])}/"
              f"{_f(r['probe_rtt_ms']['fake']['max'])}"
              + f"; threads {r['gateway_threads_peak']}; fake CPU {r['fake_cpu_pct']:.0f}%; answer audio "
              f"{_f(r['answer_audio_ms_p50'], '{:.0f}')} ms; answers with a gap > {args.target_gap_ms:g} ms: "
              f"{r['answers_with_gap_over_target']}/{r['answers']} (opening a median "
              f"{_f(r['gap_over_target_offset_ms_p50'], '{:.0f}')} ms after the answer's first frame); "
              f"invalid msgs {r['invalid_messages']}"
              + (f"; client jitter buffer (not in latency) p50/p99 {_f(jitter['p50'])}/{_f(jitter['p99'])} ms"
                 if jitter else "")
              + (f"; CPU % loop thread/other threads: gateway {r['gateway_loop_cpu_pct']:.1f}/"
                 f"{r['gateway_cpu_pct'] - r['gateway_loop_cpu_pct']:.1f} (kernel {r['gateway_kernel_cpu_pct']:.1f}),"
                 f" client {r['client_loop_cpu_pct']:.1f}/"
                 f"{r['client_cpu_pct'] - r['client_loop_cpu_pct']:.1f}" if transport != "phone" else ""))
    for r in levels_out:
        if transport == "phone" and r["calls"] >= 150:
            verdict = ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets(r, args))
            print(f"targets at N={r['calls']}: {verdict}")


def compare(out: dict[str, Any]) -> None:
    """Per-session gateway cost of each transport beside the phone call's. ``+1 sess`` is what each session
    added to N=1 costs, (CPU or peak RSS at N - at N=1) / (N - 1): free of the process's fixed load (probes,
    /metrics) and of the first session's one-off warm-up. ``x phone`` compares its CPU with the phone's at the
    nearest N of the same run."""
    def marginal(levels: list[dict[str, Any]], key: str, scale: float) -> dict[int, float]:
        one = next((r for r in levels if r["calls"] == 1), None)
        return {r["calls"]: (r[key] - one[key]) * scale / (r["calls"] - 1)
                for r in levels if one is not None and r["calls"] > 1}

    phone = marginal(out.get("phone", {}).get("levels", []), "gateway_cpu_pct", 10.0)
    print("\nper-session gateway cost by transport (same run; +1 sess = the cost of each session added to N=1; "
          "x phone = its CPU against the phone's at the nearest N):")
    print("{:>7} {:>4} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>7}".format(
        "", "N", "ms/sess-s", "+1 ms/s", "x phone", "MB/sess", "+1 MB", "add p50", "add p99", "fail", "cli CPU",
        "box CPU"))
    for transport, result in out.items():
        cpu = marginal(result["levels"], "gateway_cpu_pct", 10.0)       # % of a core -> ms per second
        mem = marginal(result["levels"], "gateway_rss_peak_mb", 1.0)
        for r in result["levels"]:
            n = r["calls"]
            ref = phone[min(phone, key=lambda m: abs(m - n))] if phone and n in cpu else None
            r["gateway_cpu_ms_per_added_session_s"], r["rss_per_added_session_mb"] = cpu.get(n), mem.get(n)
            r["added_session_cpu_ratio_to_phone"] = cpu[n] / ref if ref else None
            print("{:>7} {:>4} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>7}".format(
                transport, n, _f(r["gateway_cpu_ms_per_call_s"], "{:.2f}"), _f(cpu.get(n), "{:.2f}"),
                _f(r["added_session_cpu_ratio_to_phone"], "x{:.1f}"), _f(r["rss_per_call_mb"], "{:.3f}"),
                _f(mem.get(n), "{:.3f}"), _f(r["added_ms"]["p50"]), _f(r["added_ms"]["p99"]), r["failures"],
                _f(r["client_cpu_pct"]), _f(r["machine_cpu_pct"])))


def compare_vads(by_vad: dict[str, dict[str, Any]]) -> None:
    """Gateway CPU per call-second of each detector at each level, and what each costs beyond the first."""
    def levels(out: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if "transports" in out:
            return [(t, r) for t, result in out["transports"].items() for r in result["levels"]]
        return [("phone", r) for r in out["levels"]]

    first, *others = by_vad
    base = {(t, r["calls"]): r["gateway_cpu_ms_per_call_s"] for t, r in levels(by_vad[first])}
    print(f"\ngateway CPU ms per call-second by vad_type (same run; delta against {first}):")
    for vad, out in by_vad.items():
        for transport, r in levels(out):
            ms, ref = r["gateway_cpu_ms_per_call_s"], base.get((transport, r["calls"]))
            delta = f" ({ms - ref:+.2f} ms, {100 * (ms - ref) / 1000:+.2f}% of a core per call)" \
                if vad in others and ref is not None and ms is not None else ""
            print(f"  {vad:>7} {transport:>7} N={r['calls']}: {_f(ms, '{:.2f}')}{delta}; added p50/p99 "
                  f"{_f(r['added_ms']['p50'])}/{_f(r['added_ms']['p99'])} ms, failures {r['failures']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", default="1,50,100,150,200", help="comma-separated concurrency levels")
    p.add_argument("--transports", default="phone",
                   help="comma-separated, in order: phone (--calls levels), ws (--ws-sessions), webrtc "
                        "(--webrtc-sessions); each against a fresh gateway")
    p.add_argument("--ws-sessions", default="1,50,100", help="levels of concurrent GET /ws browser sessions")
    p.add_argument("--webrtc-sessions", default="1,4,8,12",
                   help="levels of concurrent WebRTC browser sessions (aiortc peers: the client costs as much CPU "
                        "as the gateway, so 2 cores saturate near 12)")
    p.add_argument("--ws-compression", default="deflate", choices=["deflate", "none"],
                   help="/ws clients offer permessage-deflate (as browsers do) or nothing")
    p.add_argument("--seconds", type=float, default=30.0, help="talking time per call at each level")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--ramp", type=float, default=None, help="seconds over which calls start (default max(2, N/50))")
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds before each level")
    p.add_argument("--stt-ms", type=float, default=100.0)
    p.add_argument("--llm-ms", type=float, default=150.0)
    p.add_argument("--tts-ms", type=float, default=80.0)
    p.add_argument("--token-ms", type=float, default=5.0, help="fake LLM interval between tokens")
    p.add_argument("--tts-ms-per-char", type=float, default=30.0)
    p.add_argument("--tts-chunk-ms", type=float, default=40.0,
                   help="audio per chunk of the fake TTS's streamed body (each chunk is its own write)")
    p.add_argument("--vad-stop-ms", type=int, default=300)
    p.add_argument("--speech-s", type=float, default=1.2, help="length of the synthetic speech (not with silero)")
    p.add_argument("--vad", default="energy",
                   help="comma-separated vad_type values (energy, silero): the whole run once per detector, each "
                        "against a fresh gateway, then their CPU per call-second side by side")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=1,
                   help="gateway worker processes (voxray serve --workers N); CPU and RSS are then summed over "
                        "the supervisor and its workers")
    p.add_argument("--profile", help="py-spy profile of the gateway during the last level (speedscope JSON; "
                                     "collapsed stacks when the name ends in .txt)")
    p.add_argument("--root", help="run another checkout's gateway (its code) against this client, e.g. the commit "
                                  "before a change, for a before/after in one run")
    p.add_argument("--silent", action="store_true",
                   help="callers only listen (silence frames after the greeting, no turns): the cost of a call's media "
                        "alone")
    p.add_argument("--profile-native", action="store_true", help="include native (C) frames in --profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra gateway config (JSON values), e.g. --set outbound_message_ms=20")
    p.add_argument("--nice", type=int, default=0,
                   help="run the fake providers and this client at this lower priority (they stand for remote "
                        "parties; the gateway keeps normal priority)")
    p.add_argument("--engine", default="cascade", choices=["cascade", "realtime"],
                   help="the calls' engine: the cascade (STT, LLM, TTS fakes) or realtime (the fake Realtime API)")
    p.add_argument("--rt-first-audio-ms", type=float, default=250.0,
                   help="realtime: the fake model's wait from the end of the turn to its first audio")
    p.add_argument("--target-added-ms", type=float, default=20.0)
    p.add_argument("--target-rss-mb", type=float, default=2.0)
    p.add_argument("--target-gap-ms", type=float, default=40.0)
    args = p.parse_args(argv)
    levels = [int(x) for x in args.calls.split(",") if x.strip()]
    args.ws_compression = None if args.ws_compression == "none" else args.ws_compression
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not transports or any(t not in TRANSPORTS for t in transports):
        p.error(f"--transports takes {', '.join(TRANSPORTS)}")
    level_args = {"phone": args.calls, "ws": args.ws_sessions, "webrtc": args.webrtc_sessions}
    plan = [(t, [int(x) for x in level_args[t].split(",") if x.strip()]) for t in transports]
    if args.engine == "realtime" and transports != ["phone"]:
        p.error("--engine realtime measures phone calls only (--transports phone)")
    if "webrtc" in transports:
        browsers.use_loopback_ice()
    vads = [v.strip() for v in args.vad.split(",") if v.strip()]
    if not vads or any(v not in ("energy", "silero") for v in vads):
        p.error("--vad takes energy, silero")
    args.piper_speech = "silero" in vads
    if args.nice:
        os.nice(args.nice)       # this client too: the gateway started below inherits normal priority

    try:
        import uvloop
        factory = uvloop.new_event_loop
        loop_name = "uvloop"
    except ImportError:
        factory, loop_name = None, "asyncio"
    shown = levels if transports == ["phone"] else ", ".join(f"{t} {lv}" for t, lv in plan)
    print(f"voxray load benchmark: levels {shown}, {args.seconds:g} s talking per call, {args.workers} gateway "
          f"worker(s), client loop {loop_name}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    started = time.time()
    by_vad: dict[str, dict[str, Any]] = {}
    with asyncio.Runner(loop_factory=factory) as runner:
        for vad in vads:
            args.vad_type = vad
            if len(vads) > 1:
                print(f"\n==== vad_type {vad} ====")
            if transports == ["phone"]:
                out = runner.run(bench(args, levels))
                report(out["levels"], args)
            else:
                by_transport = runner.run(bench_transports(args, plan))
                for transport, result in by_transport.items():
                    report(result["levels"], args, transport)
                compare(by_transport)
                out = {"transports": by_transport}
            by_vad[vad] = out
    if len(vads) > 1:
        compare_vads(by_vad)
        out = {"vads": by_vad}
    if args.json:
        meta = {"argv": sys.argv, "started": started, "python": platform.python_version(), "cpus": os.cpu_count(),
                "machine": platform.platform(), "client_loop": loop_name,
                "delays_ms": {"stt": args.stt_ms, "llm": args.llm_ms, "tts": args.tts_ms, "token": args.token_ms},
                "vad_stop_ms": args.vad_stop_ms, "tts_ms_per_char": args.tts_ms_per_char,
                "tts_chunk_ms": args.tts_chunk_ms, "transcript": TRANSCRIPT,
                "reply": REPLY, "seconds": args.seconds, "engine": args.engine,
                "rt_first_audio_ms": args.rt_first_audio_ms, "transports": transports, "vads": vads,
                "speech": "piper" if args.piper_speech else "synthetic"}
        Path(args.json).write_text(json.dumps({"meta": meta, **out}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
