"""Turn-taking benchmark: what the caller does while (or before) the agent speaks, and what the agent does.

One gateway process (``python -m gateway serve``, its default turn-taking unless ``--set`` says otherwise;
``--root`` runs another checkout's gateway, e.g. the previous release, for a side-by-side) and, in this
process, the fake OpenAI server and one emulated Twilio call per case (gateway/simulate). The caller's
speech is rendered by Piper (tests/speech.py, trimmed to its voiced part); the fake recogniser returns the
words the case spoke (for a pause: the words before it, then all of them). The agent's speech is the
greeting, about 3.3 s of fake TTS audio. Cases:

* **noise**: white-noise bursts of 0.1, 0.25 and 0.4 s at -30, -20 and -10 dBFS, 0.5 s into the greeting;
  a *false interruption* is a greeting cut short (less of it played than it lasts) or taken as a turn;
* **backchannels** ("uh huh", "mm-hmm", "yeah", "okay", "right") 0.5 s into the greeting: likewise;
* **interruptions** (four sentences) 0.5 s into the greeting: *missed* when no carrier flush came or
  the words reached no LLM request; *latency* = the flush's arrival - the first frame of speech;
* **pauses**: a clause, a pause of 0.6, 1.2 or 1.5 s, its end (the three cases of issue 15 and three
  more); a *cut-in* is agent audio during the pause or an LLM request holding only the first part;
* **complete** short answers and sentences after the greeting: *end-of-turn latency* = the agent's first
  audio - the end of the caller's speech (vad_stop_ms, here 400 ms, is most of it; the fake providers
  answer at once).

It also reports the gateway's CPU time per call-second over the run.

Usage::

    .venv/bin/python -m bench.turn_taking [--reps 2] [--json out.json]
    .venv/bin/python -m bench.turn_taking --root /path/to/previous/checkout   # the old behaviour
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    PUBLIC_URL,
    ROOT,
    Child,
    free_port,
    piper_speech,
    proc_cpu_s,
    wait_healthy,
    wait_quiet,
)
from gateway.simulate.call import SimulatedCall
from pipeline.audio import silence
from pipeline.settings import Persona

GREETING = Persona().greeting
MS_PER_CHAR = 100.0                        # the fake TTS: the greeting lasts len(GREETING) * 0.1 s
GREETING_S = len(GREETING) * MS_PER_CHAR / 1000.0
INTO_GREETING_S = 0.5
NOISE = [(ms, db) for ms in (100, 250, 400) for db in (-30.0, -20.0, -10.0)]
BACKCHANNELS = ["uh huh", "mm-hmm", "yeah", "okay", "right"]
INTERRUPTIONS = ["Wait, stop.", "Actually, I need to change my booking.", "No, that's not what I asked.",
                 "Can I speak to a person please?"]
PAUSES = [("I'd like to speak with someone in", "the billing department."),
          ("Can you check whether my order", "has shipped yet?"),
          ("My phone number is five five five", "one two three four."),
          ("I'd like to book a table for", "four people at seven."),
          ("The account is under my", "wife's name."),
          ("I was wondering if", "you could help me.")]
PAUSE_S = (0.6, 1.2, 1.5)
COMPLETE = ["Yes.", "No.", "That's right.", "I would like to book a table for two people tonight.",
            "What time do you open?"]


@dataclass
class Results:
    false_noise: list[bool] = field(default_factory=list)
    false_backchannel: list[bool] = field(default_factory=list)
    missed: list[bool] = field(default_factory=list)
    interrupt_ms: list[float] = field(default_factory=list)
    noise_gap_ms: list[float] = field(default_factory=list)        # longest gap in the agent's audio
    backchannel_gap_ms: list[float] = field(default_factory=list)
    cut_in: list[bool] = field(default_factory=list)
    end_of_turn_ms: list[float] = field(default_factory=list)
    call_s: float = 0.0
    failures: list[str] = field(default_factory=list)


class Script:
    """What the fake recogniser says next (the words each case spoke, in order)."""

    def __init__(self) -> None:
        self.queue: collections.deque[str] = collections.deque()

    def __call__(self, _record: dict[str, Any]) -> str:
        return self.queue.popleft() if self.queue else ""


def noise(ms: int, dbfs: float, seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal(8000 * ms // 1000) * 10 ** (dbfs / 20) * 32768
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def start_gateway(root: Path, workdir: Path, fake_url: str, extra: dict[str, Any]) -> tuple[Child, str]:
    port, closed_port = free_port(), free_port()
    config = {"host": "127.0.0.1", "port": port, "public_url": PUBLIC_URL, "log_level": "warning",
              "provider": "openai", "api_keys": {"openai": "sk-bench"}, "base_urls": {"openai": fake_url},
              "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                      "api_base_url": f"http://127.0.0.1:{closed_port}"}},
              "silence_prompt_secs": 0, **extra}
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY" and not k.startswith("VOXRAY_")}
    child = Child("gateway", [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                  workdir / "gateway.log", env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(child, url)
    return child, url


class Bench:
    def __init__(self, url: str, fake: Any, script: Script, http: httpx.AsyncClient) -> None:
        self.url, self.fake, self.script, self.http = url, fake, script, http
        self.results = Results()

    async def call(self) -> SimulatedCall:
        call = SimulatedCall(gateway=self.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                             account_sid=ACCOUNT_SID, http=self.http)
        await call.dial()
        await call.connect()
        await call.wait_audio(after=0.0, timeout=10)
        return call

    async def finish(self, call: SimulatedCall, started: float) -> None:
        self.results.call_s += time.monotonic() - started
        await call.hang_up()
        self.script.queue.clear()

    async def over_greeting(self, pcm: bytes, words: str) -> bool:
        """``pcm`` 0.5 s into the greeting; True when the greeting was cut short or taken as a turn."""
        started, llm_before = time.monotonic(), len(self.fake.state.llm_requests)
        call = await self.call()
        self.script.queue.append(words)
        await asyncio.sleep(INTO_GREETING_S)
        await call.speak(pcm + silence(1000, 8000))
        await wait_quiet(call, 800, timeout=30)
        played = sum(n for _, n in call.received.media) / 8000
        times = [t for t, _ in call.received.media]
        gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
        (self.results.noise_gap_ms if not words else self.results.backchannel_gap_ms).append(gap * 1000.0)
        await self.finish(call, started)
        return played < GREETING_S - 0.1 or len(self.fake.state.llm_requests) > llm_before

    async def interruption(self, text: str) -> None:
        started, llm_before = time.monotonic(), len(self.fake.state.llm_requests)
        call = await self.call()
        self.script.queue.append(text)
        await asyncio.sleep(INTO_GREETING_S)
        pcm = piper_speech(text)
        end = await call.speak(pcm + silence(800, 8000))
        onset = end - (len(pcm) + 16000 * 0.8) / 16000
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: len(self.fake.state.llm_requests) > llm_before, 5)
        clears = [t for t in call.received.clears if t >= onset]
        answered = any(m.get("content") == text for r in self.fake.state.llm_requests[llm_before:]
                       for m in r["messages"])
        self.results.missed.append(not clears or not answered)
        if clears:
            self.results.interrupt_ms.append((clears[0] - onset) * 1000.0)
        await self.finish(call, started)

    async def pause(self, first: str, rest: str, pause_s: float) -> None:
        started, llm_before = time.monotonic(), len(self.fake.state.llm_requests)
        call = await self.call()
        await wait_quiet(call, 400, timeout=30)
        self.script.queue.extend([first, f"{first} {rest}"])
        paused_at = await call.speak(piper_speech(first))
        resumed_at = await call.speak(silence(int(pause_s * 1000), 8000))
        await call.speak(piper_speech(rest) + silence(1500, 8000))
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: len(self.fake.state.llm_requests) > llm_before, 5)
        into_pause = any(paused_at < t < resumed_at for t, _ in call.received.media)
        early = any(r["messages"][-1].get("content") == first for r in self.fake.state.llm_requests[llm_before:])
        self.results.cut_in.append(into_pause or early)
        await self.finish(call, started)

    async def complete(self, text: str) -> None:
        started = time.monotonic()
        call = await self.call()
        await wait_quiet(call, 400, timeout=30)
        self.script.queue.append(text)
        end = await call.speak(piper_speech(text))
        first = await call.wait_audio(after=end, timeout=10)
        self.results.end_of_turn_ms.append((first - end) * 1000.0)
        await self.finish(call, started)

    async def run(self, reps: int) -> None:
        for rep in range(reps):
            for i, (ms, db) in enumerate(NOISE):
                self.results.false_noise.append(await self.over_greeting(noise(ms, db, rep * 100 + i), ""))
            for text in BACKCHANNELS:
                self.results.false_backchannel.append(await self.over_greeting(piper_speech(text), text))
            for text in INTERRUPTIONS:
                await self.interruption(text)
            for first, rest in PAUSES:
                for pause_s in PAUSE_S:
                    await self.pause(first, rest, pause_s)
            for text in COMPLETE:
                await self.complete(text)
            print(f"  repetition {rep + 1}/{reps} done", flush=True)


async def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summary(r: Results, cpu_s: float) -> dict[str, Any]:
    def rate(xs: list[bool]) -> str:
        return f"{sum(xs)}/{len(xs)} ({100.0 * sum(xs) / len(xs):.0f} %)" if xs else "-"

    return {
        "false interruptions, noise bursts": rate(r.false_noise),
        "false interruptions, backchannels": rate(r.false_backchannel),
        "longest gap in the agent's audio, noise p50 / max (ms)": _ms(pct(r.noise_gap_ms, 50), pct(r.noise_gap_ms, 100)),
        "longest gap in the agent's audio, backchannels p50 / max (ms)":
            _ms(pct(r.backchannel_gap_ms, 50), pct(r.backchannel_gap_ms, 100)),
        "cut-ins (answered into a mid-sentence pause)": rate(r.cut_in),
        "missed interruptions": rate(r.missed),
        "confirmed-interruption latency p50 / p95 (ms)": _ms(pct(r.interrupt_ms, 50), pct(r.interrupt_ms, 95)),
        "end-of-turn latency after a complete sentence p50 / p95 (ms)":
            _ms(pct(r.end_of_turn_ms, 50), pct(r.end_of_turn_ms, 95)),
        "gateway CPU per call-second (ms)": f"{1000.0 * cpu_s / r.call_s:.1f}" if r.call_s else "-",
    }


def _ms(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a:.0f} / {b:.0f}"


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from tests.fakes.openai_server import FakeOpenAI

    extra: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except ValueError:
            extra[key] = value
    script = Script()
    with tempfile.TemporaryDirectory(prefix="voxray-turns-") as tmp:
        async with FakeOpenAI(script, ["Sure."], tts_ms_per_char=MS_PER_CHAR) as fake:
            gateway, url = start_gateway(Path(args.root), Path(tmp), fake.base_url, extra)
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    b = Bench(url, fake, script, http)
                    cpu0 = proc_cpu_s(gateway.pid)
                    await b.run(args.reps)
                    cpu = proc_cpu_s(gateway.pid) - cpu0
            finally:
                gateway.stop()
    out = summary(b.results, cpu)
    print(f"\nturn-taking, {args.reps} repetition(s), gateway from {args.root}, config extras {extra or 'none'}")
    for key, value in out.items():
        print(f"  {key:64} {value}")
    return {"summary": out, "raw": b.results.__dict__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.turn_taking", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2, help="repetitions of every case")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose gateway runs (default: this one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra gateway config (JSON values), e.g. --set interruption_strategy=immediate")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args(argv)
    logging.getLogger("asyncio").setLevel(logging.ERROR)   # "socket.send() raised exception" after hang-ups
    out = asyncio.run(bench(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
