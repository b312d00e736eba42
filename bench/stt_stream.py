"""Turn latency with a streaming STT (Deepgram's ``/v1/listen``) against a one-shot STT (OpenAI's
``/audio/transcriptions``) at the same fake delays.

One gateway in this process answers one simulated Twilio call per configuration; the caller says the
load benchmark's synthetic utterance (1.2 s, ending at full level) ``--turns`` times. Per turn:

* latency = the first agent audio frame after the caller's speech - the moment its last frame was sent
  (so it holds ``vad_stop_ms``, the STT wait after the stop, the LLM's first token and the TTS's first audio).

The fakes (``tests/fakes``) answer with the same processing delay ``--stt-ms``: the one-shot STT waits
that long before its answer; the streaming fake sends every result that long after the audio that
caused it (its endpointing, 300 ms of silence, is counted in audio time as Deepgram does). LLM and TTS
are the fake OpenAI server's, with ``--llm-ms`` and ``--tts-ms``. Printed, not asserted.

Usage::

    .venv/bin/python -m bench.stt_stream [--turns 10] [--stt-ms 100,300] [--vad-stop-ms 300,500]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import statistics

from gateway.config import Config
from gateway.simulate.call import SimulatedCall, synthetic_voice
from pipeline.audio import silence
from tests.conftest import running_gateway
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

SID, TOKEN, PUBLIC = "AC" + "0" * 31 + "1", "bench-token", "https://bench.example.test"
TRANSCRIPT = "I would like to book a table for two people tonight."


async def turns(stt: str, *, stt_ms: float, vad_stop_ms: int, args: argparse.Namespace) -> list[float]:
    """Turn latencies (ms) of one call with ``stt`` ("openai" one-shot or "deepgram" streaming)."""
    async with (FakeOpenAI([TRANSCRIPT], ["Sure. For what time?"], stt_delay_ms=stt_ms, llm_delay_ms=args.llm_ms,
                           tts_delay_ms=args.tts_ms, tts_ms_per_char=30) as openai,
                FakeDeepgram(api_key="dg-bench", transcripts=[TRANSCRIPT], result_delay_ms=stt_ms) as deepgram,
                FakeTwilioREST(SID, TOKEN) as twilio):
        raw = {"public_url": PUBLIC, "provider": "openai", "stt_provider": stt, "log_level": "error",
               "api_keys": {"openai": "sk-bench", "deepgram": "dg-bench"},
               "base_urls": {"openai": openai.base_url, "deepgram": deepgram.base_url},
               "carriers": {"twilio": {"account_sid": SID, "auth_token": TOKEN, "api_base_url": twilio.base_url}},
               "vad_stop_ms": vad_stop_ms, "server_api_key": "bench-server-key", "silence_prompt_secs": 0}
        async with running_gateway(Config.from_mapping(raw)) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC, auth_token=TOKEN, account_sid=SID)
            twilio.known_calls = twilio.known_calls | {call.call_sid}
            await call.dial()
            await call.connect()
            await call.wait_audio(after=0)
            await call.wait_quiet(300)
            out = []
            for _ in range(args.turns):
                end = await call.speak(synthetic_voice(1.2))
                call_task = asyncio.ensure_future(call.speak(silence(vad_stop_ms + 600, 8000)))
                first = await call.wait_audio(after=end)
                out.append((first - end) * 1000)
                await call_task
                await call.wait_quiet(300)
            await call.hang_up()
    if stt == "deepgram":
        assert not openai.state.stt_requests, "the streaming run made one-shot requests"
    return out


async def run(args: argparse.Namespace) -> None:
    print(f"turn latency, ms (first agent audio - end of speech); {args.turns} turns each; "
          f"llm {args.llm_ms:.0f} ms, tts {args.tts_ms:.0f} ms")
    print(f"{'vad_stop_ms':>11} {'stt_ms':>6} | {'one-shot p50':>12} {'p90':>6} | {'streaming p50':>13} {'p90':>6} "
          f"| {'saved p50':>9}")
    for vad_stop_ms in args.vad_stop_ms:
        for stt_ms in args.stt_ms:
            batch = sorted(await turns("openai", stt_ms=stt_ms, vad_stop_ms=vad_stop_ms, args=args))
            live = sorted(await turns("deepgram", stt_ms=stt_ms, vad_stop_ms=vad_stop_ms, args=args))
            p50b, p50s = statistics.median(batch), statistics.median(live)
            p90b, p90s = (xs[max(0, math.ceil(0.9 * len(xs)) - 1)] for xs in (batch, live))
            print(f"{vad_stop_ms:>11} {stt_ms:>6.0f} | {p50b:>12.0f} {p90b:>6.0f} | {p50s:>13.0f} {p90s:>6.0f} "
                  f"| {p50b - p50s:>9.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stt_stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--stt-ms", default="100,300", help="comma-separated STT processing delays of both fakes")
    p.add_argument("--vad-stop-ms", default="300,500", help="comma-separated vad_stop_ms values")
    p.add_argument("--llm-ms", type=float, default=150.0)
    p.add_argument("--tts-ms", type=float, default=80.0)
    args = p.parse_args(argv)
    args.stt_ms = [float(x) for x in args.stt_ms.split(",")]
    args.vad_stop_ms = [int(x) for x in args.vad_stop_ms.split(",")]
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
