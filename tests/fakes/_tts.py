"""What the fake TTS vendors share: the LLM fakes' failure modes and request log, and speech as raw PCM.

A vendor fake supplies its route, its auth check and its error bodies; ``speech`` answers with a
220 Hz tone of ``ms_per_char`` per character (at least 200 ms) at the rate the request asked for, in
HTTP chunks of an odd number of bytes (so samples straddle chunks, as on a real network). Modes
(``fake.state.fail``) are those of ``tests/fakes/_llm.py``: an HTTP status (``"429"`` with
``retry-after``), ``"hang"``, ``"cut"`` (half the audio, then the connection drops).

Usage (in a vendor fake)::

    class FakeAcmeTTS(TTSFake):
        def __init__(self, **kwargs):
            super().__init__("fake Acme TTS", [Route("/v1/speak", self.speak, methods=["POST"])], **kwargs)

        async def speak(self, request):
            ...   # gate, check the request
            return self.speech(text, rate=16000)
"""

from __future__ import annotations

from starlette.responses import StreamingResponse
from starlette.routing import BaseRoute

from tests.fakes._llm import LLMFake
from tests.fakes.openai_server import speech_pcm

__all__ = ["TTSFake", "expected_bytes"]

CHUNK_BYTES = 1001      # odd: every other chunk ends mid-sample


def expected_bytes(text: str, rate: int, ms_per_char: float) -> int:
    """How many bytes of PCM16 a fake answers ``text`` with."""
    return _samples(text, rate, ms_per_char) * 2


def _samples(text: str, rate: int, ms_per_char: float) -> int:
    return int(max(200.0, len(text) * ms_per_char) * rate / 1000)


class TTSFake(LLMFake):
    """A TTS vendor fake on 127.0.0.1; subclasses pass their routes."""

    def __init__(self, name: str, routes: list[BaseRoute], *, api_key: str | None = None, ms_per_char: float = 20) -> None:
        super().__init__(name, routes, api_key=api_key)
        self.ms_per_char = ms_per_char
        self.spoken: list[str] = []          # the texts asked for, in order (failed requests too)

    def pcm(self, text: str, rate: int) -> bytes:
        """The PCM16 ``speech`` answers ``text`` with (also the payload of a vendor that sends it whole)."""
        return speech_pcm(_samples(text, rate, self.ms_per_char), rate)

    def speech(self, text: str, *, rate: int, media_type: str = "application/octet-stream") -> StreamingResponse:
        """``text`` spoken as raw PCM16 mono at ``rate``, streamed in odd-sized chunks under the failure mode."""
        pcm = self.pcm(text, rate)
        return self.chunked([pcm[i:i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)], media_type=media_type)
