"""``voxray simulate``: place emulated carrier calls, print the conversation and the latencies, judge the answers.

Without ``url`` a gateway is started in this process (``gateway.simulate.local_gateway``) from the
user's configuration plus throw-away development settings, and its transcripts are printed as the
call goes: what the caller sends, what the gateway heard, what the agent said. With ``url`` the
calls go to that gateway (its carrier credentials in ``credentials``) and only latencies are shown.

A turn is answered when the agent says something after the caller's speech that is not the silence
prompt, the apology or the goodbye (in-process: judged from the agent's transcript; external: the
first agent audio arrives within ``answer_timeout_s``, before the gateway's silence prompt would).

Usage::

    options = Options(carrier="twilio", say=("What time do you open tomorrow?",))
    code = run_simulation(options, config=Config.load(None, os.environ))   # in-process gateway
    code = run_simulation(Options(url="http://127.0.0.1:8000", credentials={"auth_token": "..."}))

The exit code is 0 when every turn of every call got a real answer, 1 otherwise; every failure
that stops the run is printed as one ``voxray simulate: ...`` line with the cause and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import httpx
import websockets

from gateway.redaction import short_id
from gateway.simulate.call import BusyAnswer, SimulatedCall
from gateway.simulate.caller_audio import DEFAULT_SENTENCES, CallerAudioError, Utterance, from_wav, spoken

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["Options", "SimulationError", "run_simulation"]

class SimulationError(Exception):
    """Stops the run: ``str(exc)`` is one line naming the cause and the fix."""


@dataclass(frozen=True, slots=True)
class Options:
    """What ``voxray simulate`` was asked to do (every wait is a parameter)."""

    carrier: str = "twilio"
    url: str | None = None                    # an external gateway; None starts one in this process
    public_url: str | None = None             # what the external gateway signs against (default: url)
    credentials: Mapping[str, str] = field(default_factory=dict)   # the emulated carrier's (external mode)
    calls: int = 1
    turns: int | None = None                  # default: one per --say sentence, else 2
    say: tuple[str, ...] = ()
    audio: Path | None = None
    to: str = "+14155550100"
    http_timeout_s: float = 10.0              # the webhook's answer
    greeting_timeout_s: float = 20.0          # the agent's first audio after the media socket opens
    answer_timeout_s: float = 15.0            # end of speech -> first agent audio (external: the answer bound)
    playback_timeout_s: float = 60.0          # an answer plays out within this
    quiet_ms: float = 600.0                   # this much quiet after the agent's audio ends its turn
    start_timeout_s: float = 60.0             # the in-process gateway starts within this
    verbose: bool = False


@dataclass(slots=True)
class _Turn:
    latency_ms: float | None = None           # end of speech -> first agent audio
    problem: str = ""                         # why it is not an answer ("" = answered)


@dataclass(slots=True)
class _Line:
    at: float
    role: str
    text: str


class _Board:
    """Prints what each call says as it happens and keeps the agent's lines per call for the judging."""

    def __init__(self, out: TextIO, calls: int) -> None:
        self.out = out
        self.calls = calls
        self._by_id: dict[str, int] = {}
        self.lines: dict[int, list[_Line]] = {i: [] for i in range(calls)}

    def register(self, index: int, *ids: str) -> None:
        for call_id in ids:
            if call_id:
                self._by_id[call_id] = index

    def say(self, index: int, text: str) -> None:
        print(f"[call {index + 1}] {text}", file=self.out, flush=True)

    def on_line(self, call_id: str, role: str, text: str) -> None:
        index = self._by_id.get(call_id, 0 if self.calls == 1 else -1)
        if index < 0:
            return
        self.lines[index].append(_Line(time.monotonic(), role, text))
        self.say(index, f"{'gateway heard' if role == 'caller' else 'agent said'}: {text}")


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _not_answers(config: Config) -> dict[str, str]:
    """What the agent says that is no answer -> why it said it ("": the caller was not understood)."""
    return {config.silence_prompt_text: "", config.goodbye_text: "",
            config.apology_text: "a provider failed (the gateway's warnings say which)"}


def _calls(options: Options) -> str:
    """E.g. "an emulated twilio call to +14155550100", "3 emulated vonage calls to +14155550100"."""
    many = f"{options.calls} emulated {options.carrier} calls" if options.calls > 1 else \
        f"an emulated {options.carrier} call"
    return f"{many} to {options.to}"


def _first_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line[:limit] + ("…" if len(line) > limit else "")


def _error_text(response: httpx.Response) -> str:
    """The gateway's error message: the ``error`` of a JSON body, else the body's first line."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return _first_line(error if isinstance(error, str) else response.text) or response.reason_phrase


def _refusal(response: httpx.Response, url: str, carrier: str, in_process: bool) -> str:
    """One line for a webhook the gateway did not answer with 200."""
    status, text = response.status_code, _error_text(response)
    where = f"the gateway at {url}"
    local = "" if in_process else " (or leave --url out to start a gateway in this process)"
    if status == 503 and "not configured" in text:
        return (f"{where} has no {carrier} credentials ({status}: {text}): configure carriers.{carrier} on the "
                f"gateway and pass the same credentials with --credential KEY=VALUE{local}")
    if status == 403:
        return (f"{where} refused the webhook's signature ({status}: {text}): pass the gateway's {carrier} "
                f"credentials with --credential KEY=VALUE and its public_url with --public-url{local}")
    if status == 401:
        return (f"{where} refused the emulated carrier's credentials ({status}: {text}): pass the gateway's "
                f"{carrier} credentials with --credential KEY=VALUE{local}")
    if status == 404:
        return f"{where} has no /start/{carrier} ({status}): is it a voxray gateway, and is --carrier right?"
    return f"{where} refused the call ({status}: {text})"


async def _dial(call: SimulatedCall, options: Options, url: str, in_process: bool) -> None:
    try:
        response = await call.dial()
    except httpx.ConnectError as exc:
        raise SimulationError(f"cannot reach the gateway at {url} ({_first_line(str(exc)) or 'connection refused'}): "
                              "start it with `voxray serve`, check --url, or leave --url out to start a gateway "
                              "in this process") from None
    except httpx.TimeoutException:
        raise SimulationError(f"the gateway at {url} did not answer the webhook within {options.http_timeout_s:g} s: "
                              "is it overloaded, or is --url another server?") from None
    except httpx.HTTPError as exc:
        raise SimulationError(f"the webhook to {url} failed: {type(exc).__name__}: {_first_line(str(exc))}") from None
    except BusyAnswer:
        raise SimulationError(f"the gateway at {url} answered busy (it says busy_text and hangs up: it is at "
                              "max_concurrent_calls or overloaded): try again later, or raise "
                              "max_concurrent_calls") from None
    except Exception as exc:  # noqa: BLE001 - the dialect could not parse the answer: one line, not a traceback
        raise SimulationError(f"the gateway at {url} answered the webhook with something that is not "
                              f"{options.carrier} markup ({_first_line(str(exc)) or type(exc).__name__})") from None
    if response.status_code != 200:
        raise SimulationError(_refusal(response, url, options.carrier, in_process))


async def _connect(call: SimulatedCall, url: str) -> None:
    try:
        await call.connect()
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        raise SimulationError(f"the gateway at {url} refused the media socket (HTTP {status}): the session "
                              "expired or the stream URL is wrong; is the gateway behind a proxy that drops "
                              "WebSockets?") from None
    except (OSError, websockets.WebSocketException) as exc:
        raise SimulationError(f"cannot open the media socket at {call.media_url.split('?')[0]}: "
                              f"{_first_line(str(exc)) or type(exc).__name__}") from None


class _Caller:
    """One simulated call: greeting, then one utterance per turn, each judged. ``not_answers`` (agent lines
    that are no answer -> why) is None for an external gateway, whose transcripts are not seen here."""

    def __init__(self, index: int, options: Options, board: _Board, *, url: str, public_url: str | None,
                 credentials: Mapping[str, str], not_answers: Mapping[str, str] | None,
                 answer_timeout_s: float) -> None:
        self.index = index
        self.options = options
        self.board = board
        self.url = url
        self.in_process = not_answers is not None      # the gateway's transcripts are on the board
        self.not_answers = {_normal(text): why for text, why in (not_answers or {}).items() if text}
        self.answer_timeout = answer_timeout_s
        self.http = httpx.AsyncClient(timeout=options.http_timeout_s)
        self.call = SimulatedCall(gateway=url, public_url=public_url, carrier=options.carrier,
                                  credentials=credentials, to=options.to, http=self.http)
        board.register(index, self.call.call_sid)

    async def run(self, utterances: Sequence[Utterance], turns: int) -> list[_Turn]:
        try:
            await _dial(self.call, self.options, self.url, self.in_process)
            self.board.register(self.index, short_id(self.call.session_id))
            await _connect(self.call, self.url)
            try:
                return await self._talk(utterances, turns)
            finally:
                await self.call.hang_up()          # the caller hangs up: the gateway needs no carrier REST call
        finally:
            await self.http.aclose()

    async def _talk(self, utterances: Sequence[Utterance], turns: int) -> list[_Turn]:
        call, o = self.call, self.options
        try:
            if await self._first_audio(after=0, timeout=o.greeting_timeout_s) is not None:
                await call.wait_quiet(o.quiet_ms, timeout=o.playback_timeout_s)
        except TimeoutError:
            self.board.say(self.index, f"no greeting within {o.greeting_timeout_s:g} s")
        results = []
        for n in range(turns):
            if call.closed:
                turn = _Turn(problem=self._ended())
            else:
                utterance = utterances[n % len(utterances)]
                self.board.say(self.index, f"caller says: {utterance.label} ({utterance.seconds:.1f} s)")
                turn = await self._turn(utterance)
            self.board.say(self.index, f"turn {n + 1}: " + (
                f"answered, {turn.latency_ms:.0f} ms from the end of speech to the agent's first audio"
                if not turn.problem else f"NO ANSWER: {turn.problem}"))
            results.append(turn)
        return results

    async def _first_audio(self, *, after: float, timeout: float) -> float | None:
        """When the agent's first audio after ``after`` arrived; None when the call ended first.
        Raises TimeoutError when neither happens within ``timeout``."""
        audio = asyncio.ensure_future(self.call.wait_audio(after=after, timeout=timeout))
        closed = asyncio.ensure_future(self.call.wait_closed(timeout=timeout + 1.0))
        await asyncio.wait({audio, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (audio, closed):
            task.cancel()
        got, _ = await asyncio.gather(audio, closed, return_exceptions=True)
        if isinstance(got, float):
            return got
        if isinstance(got, TimeoutError):
            raise TimeoutError
        return None

    async def _turn(self, utterance: Utterance) -> _Turn:
        call, o = self.call, self.options
        start = time.monotonic()
        end = await call.speak(utterance.pcm)
        try:
            first = await self._first_audio(after=end, timeout=self.answer_timeout)
        except TimeoutError:
            return _Turn(problem=f"no agent audio within {self.answer_timeout:g} s of the end of speech"
                         + self._heard_hint(start))
        if first is None:
            return _Turn(problem=self._ended())
        latency = (first - end) * 1000.0
        with contextlib.suppress(TimeoutError):
            await call.wait_quiet(o.quiet_ms, timeout=o.playback_timeout_s)
        if not self.in_process:
            return _Turn(latency)
        said = [line.text for line in self.board.lines[self.index] if line.at >= start and line.role == "agent"]
        real = [t for t in said if _normal(t) not in self.not_answers]
        if real:
            return _Turn(latency)
        if said:
            why = self.not_answers[_normal(said[-1])]
            hint = f" ({why})" if why else self._heard_hint(start)
            return _Turn(latency, f"the agent only said {said[-1]!r}{hint}")
        return _Turn(latency, "the agent played audio but said nothing the gateway logged")

    def _heard_hint(self, start: float) -> str:
        if not self.in_process:
            return " (was it understood? run without --url to see what the gateway heard)"
        heard = [line.text for line in self.board.lines[self.index] if line.at >= start and line.role == "caller"]
        if heard:
            return f" (the gateway heard {heard[-1]!r})"
        return " (the gateway heard no words: was the caller's audio speech?)"

    def _ended(self) -> str:
        code = self.call.close_code
        reason = f": {self.call.close_reason}" if self.call.close_reason else ""
        last = next((line.text for line in reversed(self.board.lines[self.index]) if line.role == "agent"), "")
        why = self.not_answers.get(_normal(last), "") if last else ""
        return f"the gateway ended the call (close {code}{reason})" + (f" after {last!r}: {why}" if why else "")


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _report(results: Sequence[Sequence[_Turn]], out: TextIO) -> int:
    turns = [t for r in results for t in r]
    answered = [t for t in turns if not t.problem]
    latencies = [t.latency_ms for t in answered if t.latency_ms is not None]
    summary = f"{len(answered)}/{len(turns)} turns answered"
    if latencies:
        summary += (f"; latency p50 {_percentile(latencies, 0.5):.0f} ms, max {max(latencies):.0f} ms "
                    "(end of the caller's speech -> the agent's first audio)")
    print(summary, file=out, flush=True)
    return 0 if turns and len(answered) == len(turns) else 1


async def _utterances(options: Options) -> list[Utterance]:
    if options.audio is not None:
        return [from_wav(options.audio)]
    sentences = options.say or DEFAULT_SENTENCES[:max(1, min(len(DEFAULT_SENTENCES), options.turns or 2))]
    return await spoken(sentences)


async def _place_calls(options: Options, utterances: Sequence[Utterance], board: _Board, *, url: str,
                       public_url: str | None, credentials: Mapping[str, str], not_answers: Mapping[str, str] | None,
                       answer_timeout_s: float) -> list[list[_Turn]]:
    turns = options.turns or len(options.say) or 2
    callers = [_Caller(i, options, board, url=url, public_url=public_url, credentials=credentials,
                       not_answers=not_answers, answer_timeout_s=answer_timeout_s) for i in range(options.calls)]
    return list(await asyncio.gather(*(c.run(utterances, turns) for c in callers)))


async def _in_process(options: Options, config: Config, out: TextIO, setup_logging: Callable[[], None]) -> int:
    from gateway.simulate.local_gateway import DevCredentials, GatewayStartError, LocalGateway, TranscriptTap

    utterances = await _utterances(options)
    dev = DevCredentials.generate(options.carrier)
    board = _Board(out, options.calls)
    setup_logging()
    try:
        async with LocalGateway(config, dev, start_timeout_s=options.start_timeout_s) as gateway:
            c = gateway.config
            p = c.providers
            print(f"voxray simulate: a gateway in this process on {gateway.url} (stt={p.stt.name} llm={p.llm.name} "
                  f"tts={p.tts.name}); {_calls(options)}", file=out, flush=True)
            # the silence prompt comes silence_prompt_secs after the caller's speech: wait for it, to name it
            wait = max(options.answer_timeout_s, c.silence_prompt_secs + 5.0 if c.silence_prompt_secs else 0.0)
            with TranscriptTap(board.on_line, propagate=options.verbose):
                results = await _place_calls(
                    options, utterances, board, url=gateway.url, public_url=gateway.public_url,
                    credentials={**options.credentials, **dev.emulator},
                    not_answers=_not_answers(c), answer_timeout_s=wait)
    except GatewayStartError as exc:
        raise SimulationError(str(exc)) from None
    return _report(results, out)


async def _external(options: Options, out: TextIO) -> int:
    assert options.url is not None
    utterances = await _utterances(options)
    board = _Board(out, options.calls)
    print(f"voxray simulate: {_calls(options)} via {options.url}; a turn is "
          f"answered when the agent's audio starts within {options.answer_timeout_s:g} s (--answer-timeout: keep it "
          "below the gateway's silence_prompt_secs)", file=out, flush=True)
    results = await _place_calls(options, utterances, board, url=options.url.rstrip("/"),
                                 public_url=options.public_url, credentials=options.credentials, not_answers=None,
                                 answer_timeout_s=options.answer_timeout_s)
    code = _report(results, out)
    print("transcripts are shown only for a gateway in this process (leave --url out); on this gateway set "
          "log_transcripts and read its log", file=out, flush=True)
    return code


def run_simulation(options: Options, config: Config | None = None, *, out: TextIO | None = None,
                   err: TextIO | None = None, setup_logging: Callable[[], None] = lambda: None) -> int:
    """Run ``voxray simulate``: against ``options.url``, or (``url`` None) a gateway started in this
    process from ``config``, after ``setup_logging()`` (once the caller's audio is ready). Returns the
    exit code (0: every turn answered)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if options.url is None:
            if config is None:
                raise SimulationError("no --url and no configuration to start a gateway with")
            return asyncio.run(_in_process(options, config, out, setup_logging))
        return asyncio.run(_external(options, out))
    except (SimulationError, CallerAudioError) as exc:
        print(f"voxray simulate: {exc}", file=err, flush=True)
    except KeyboardInterrupt:
        print("voxray simulate: interrupted", file=err, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command prints one line; --verbose shows the traceback
        if options.verbose:
            raise
        print(f"voxray simulate: unexpected {type(exc).__name__}: {_first_line(str(exc))} "
              "(run with --verbose for the traceback)", file=err, flush=True)
    return 1
