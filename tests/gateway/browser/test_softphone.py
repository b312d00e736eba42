"""``GET /``: the softphone page in real headless Chromium, with a WAV file as the microphone (design §7).

The gateway runs on a real socket with the fake OpenAI server behind it, so the agent's words are
known; Chromium (Debian's ``/usr/bin/chromium``, driven by playwright-core from ``tests/browser``)
opens the page, "speaks" the WAV and must show the user's transcript, the agent's reply and the
turn's latency, and actually play the reply (measured in the page). ``scripts/test.sh`` installs
Chromium and the driver; without them these tests fail with the command to run, never skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.audio import silence
from tests.conftest import phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.speech import speech_pcm, write_wav

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[3]
BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "drive.mjs"
CHROMIUM = os.environ.get("VOXRAY_TEST_CHROMIUM", "/usr/bin/chromium")
# docs/softphone.png is refreshed only on request (VOXRAY_UPDATE_SCREENSHOT=1), so a test run leaves the
# tree clean; otherwise the screenshot is still taken (and checked) in the test's tmp dir.
UPDATE_SCREENSHOT = os.environ.get("VOXRAY_UPDATE_SCREENSHOT") == "1"
DOCS_SCREENSHOT = ROOT / "docs" / "softphone.png"

SPOKEN = "I would like to book a table for two tonight."
TRANSCRIPT = "I would like to book a table for two tonight"
REPLY = "Of course. What time would you like the table?"
LONG_REPLY = "Of course. We have a table by the window at seven, or one on the terrace at nine. Which do you prefer?"
GREETING = "Hotel Aria, how can I help?"
NUMBER = "+14155550100"
MIC_RATE = 48000


def require_browser() -> None:
    """Fail (not skip) with the install step when Chromium or the driver is missing."""
    if not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `bash scripts/test.sh` "
                    "(or `apt-get install -y chromium`)")
    if shutil.which("node") is None:
        pytest.fail("node is not installed: the browser tests drive Chromium with playwright-core (Node.js 20+)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("tests/browser/node_modules is missing: run `bash scripts/test.sh` "
                    "(or `cd tests/browser && npm ci`)")


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone: a pause (the greeting plays), the sentence, then silence long enough for
    the turn to end and the reply to play before the file loops."""
    pcm = silence(1500, MIC_RATE) + speech_pcm(SPOKEN, MIC_RATE) + silence(12000, MIC_RATE)
    path = tmp_path_factory.mktemp("mic") / "caller.wav"
    write_wav(path, pcm, MIC_RATE)
    return path


def personas_file(tmp_path: Path) -> Path:
    path = tmp_path / "personas.json"
    path.write_text(json.dumps({
        "personas": {"concierge": {"system": "You are Aria, a hotel concierge.", "greeting": GREETING}},
        "numbers": {NUMBER: "concierge"},
    }))
    return path


def gateway_config(fake: FakeOpenAI, tmp_path: Path, **overrides: Any) -> Any:
    return phone_config(fake.base_url, "http://127.0.0.1:9", personas_file=str(personas_file(tmp_path)),
                        silence_prompt_secs=0, **overrides)


async def drive(url: str, **scenario: Any) -> dict[str, Any]:
    """Run the Chromium driver on the page at ``url``; returns what the page showed."""
    scenario = {"url": url, "chromium": CHROMIUM, "timeoutMs": 25000, **scenario}
    process = await asyncio.create_subprocess_exec(
        "node", str(DRIVER), json.dumps(scenario), cwd=BROWSER_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the Chromium driver did not finish within 60 s")
    lines = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    assert lines, f"the driver printed no result (exit {process.returncode}):\n{err.decode()[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["failure"] is None, (
        f"{result['failure']}\npage: {json.dumps(result.get('page'), indent=1)[:6000]}\n"
        f"console: {result.get('console')}\ndriver: {err.decode()[-3000:]}")
    return result


def finals(page: dict[str, Any], role: str) -> list[str]:
    return [e["text"] for e in page["entries"] if e["role"] == role and e["final"]]


async def test_page_is_served_with_its_files() -> None:
    async with FakeOpenAI() as fake:
        config = phone_config(fake.base_url, "http://127.0.0.1:9", transport="websocket", server_api_key="k3y",
                              webrtc_ice_servers=[{"urls": "stun:stun.example.test:3478"},
                                                  {"urls": "turn:turn.example.test", "username": "u",
                                                   "credential": "secret-turn"}])
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url) as http:
            page = await http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert '"transports":["websocket"]' in page.text and "stun.example.test" in page.text
            assert "secret-turn" not in page.text            # no TURN credentials on a public page with a key set
            for name, kind in (("softphone.js", "javascript"), ("softphone.css", "text/css"),
                               ("capture-worklet.js", "javascript")):
                response = await http.get(f"/static/{name}")
                assert response.status_code == 200 and kind in response.headers["content-type"], name
            assert (await http.get("/static/nope.js")).status_code == 404
            assert (await http.get("/personas")).status_code == 401
            listed = await http.get("/personas", headers={"Authorization": "Bearer k3y"})
            assert listed.status_code == 200 and listed.json() == {"personas": []}


async def test_websocket_call_in_chromium(mic_wav: Path, tmp_path: Path) -> None:
    require_browser()
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[LONG_REPLY], tts_ms_per_char=30) as fake:
        async with running_gateway(gateway_config(fake, tmp_path)) as url:
            screenshot = DOCS_SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "softphone.png"
            result = await drive(f"{url}/", wav=str(mic_wav), transport="websocket", codec="pcm16",
                                 waitForText=[TRANSCRIPT, LONG_REPLY], minAudibleMs=600,
                                 screenshot=str(screenshot), interrupt=True, hangup=True)
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = result["page"]
    assert finals(page, "user") == [TRANSCRIPT]
    assert finals(page, "assistant")[-1] == LONG_REPLY
    assert page["error"]["visible"] is False, page["error"]
    assert "concierge" in page["personaOptions"]                 # GET /personas filled the picker
    [row] = page["latency"]
    assert int(row["first_audio_out_ms"]) > 0 and all(row[k].isdigit() for k in ("stt_ms", "llm_first_token_ms"))
    # the microphone really reached the gateway: one turn of speech-like audio at 16 kHz
    [stt] = fake.state.stt_requests
    assert stt["sample_rate"] == 16000 and stt["rms"] > 0.02 and 1500 <= stt["duration_ms"] <= 6000, stt
    # the reply (and greeting) really played: audible samples arrived at 16 kHz and the output analyser heard them
    playback = page["stats"]["playback"]
    assert playback["rate"] == 16000 and playback["audibleSamples"] > 16000 * 1.0, playback
    assert playback["maxRms"] > 0.05 and playback["audibleMs"] >= 500, playback
    assert page["stats"]["capture"]["frames"] > 100
    # Interrupt: the gateway says what was heard, the page flushes its queue and the agent falls silent
    interrupted = result["afterInterrupt"]
    heard = next(e for e in interrupted["events"] if e["type"] == "interrupted")["heard"]
    assert heard and LONG_REPLY.startswith(heard.rstrip(".")[:10]) and heard != LONG_REPLY
    assert interrupted["stats"]["playback"]["flushes"] >= 1
    assert interrupted["stats"]["playback"]["audibleMs"] - interrupted["audibleMsAtFlush"] <= 250
    assert [e["interrupted"] for e in interrupted["entries"] if e["role"] == "assistant"][-1] is True
    after = result["afterHangup"]
    assert after["status"]["state"] == "ended" and any(e["type"] == "end" for e in after["events"])


async def test_phone_codec_over_websocket(mic_wav: Path, tmp_path: Path) -> None:
    require_browser()
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=30) as fake:
        async with running_gateway(gateway_config(fake, tmp_path)) as url:
            result = await drive(f"{url}/", wav=str(mic_wav), transport="websocket", codec="pcmu", number=NUMBER,
                                 waitForText=[GREETING, TRANSCRIPT, REPLY], minAudibleMs=500, hangup=True)
    page = result["page"]
    ready = next(e for e in page["events"] if e["type"] == "ready")
    assert ready["codec"] == "pcmu" and ready["sample_rate"] == 8000 and ready["persona"] == "concierge"
    assert finals(page, "assistant")[0] == GREETING              # the dialed number picked its persona
    assert finals(page, "user") == [TRANSCRIPT] and finals(page, "assistant")[-1] == REPLY
    assert "µ-law 8 kHz" in page["meta"]
    [stt] = fake.state.stt_requests                               # µ-law 8 kHz in, still speech at the STT
    assert stt["rms"] > 0.02 and 1500 <= stt["duration_ms"] <= 6000, stt
    playback = page["stats"]["playback"]
    assert playback["rate"] == 8000 and playback["audibleSamples"] > 8000 * 1.0 and playback["maxRms"] > 0.05


async def test_webrtc_call_in_chromium(mic_wav: Path, tmp_path: Path) -> None:
    require_browser()
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=30) as fake:
        async with running_gateway(gateway_config(fake, tmp_path)) as url:
            result = await drive(f"{url}/", wav=str(mic_wav), transport="webrtc", codec="pcm16",
                                 waitForText=[TRANSCRIPT, REPLY], minAudibleMs=500, minSamplesReceived=48000,
                                 hangup=True)
    page = result["page"]
    assert finals(page, "user") == [TRANSCRIPT] and finals(page, "assistant")[-1] == REPLY
    assert page["error"]["visible"] is False, page["error"]
    assert page["latency"] and int(page["latency"][0]["first_audio_out_ms"]) > 0
    inbound = page["rtc"]["inbound"]
    assert inbound["totalSamplesReceived"] >= 48000 and inbound["totalAudioEnergy"] > 0, page["rtc"]
    assert page["stats"]["playback"]["maxRms"] > 0.05              # the analyser on the remote track heard it
    [stt] = fake.state.stt_requests
    assert stt["rms"] > 0.02 and 1500 <= stt["duration_ms"] <= 6000, stt
    assert page["rtc"]["codec"].startswith("opus") and "WebRTC · opus" in page["meta"]
    assert result["afterHangup"]["status"]["state"] == "ended"


async def test_phone_codec_over_webrtc(mic_wav: Path, tmp_path: Path) -> None:
    require_browser()
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=30) as fake:
        async with running_gateway(gateway_config(fake, tmp_path)) as url:
            result = await drive(f"{url}/", wav=str(mic_wav), transport="webrtc", codec="pcmu", number=NUMBER,
                                 waitForText=[GREETING, TRANSCRIPT, REPLY], minAudibleMs=500,
                                 minSamplesReceived=48000, hangup=True)
    page = result["page"]
    assert page["rtc"]["codec"] == "PCMU 8 kHz", page["rtc"]      # setCodecPreferences + "codec": "pcmu"
    assert finals(page, "assistant")[0] == GREETING and finals(page, "user") == [TRANSCRIPT]
    assert page["stats"]["playback"]["maxRms"] > 0.05


async def test_denied_microphone_is_explained(tmp_path: Path) -> None:
    require_browser()
    async with FakeOpenAI() as fake:
        async with running_gateway(gateway_config(fake, tmp_path)) as url, httpx.AsyncClient() as http:
            result = await drive(f"{url}/", transport="websocket", denyMic=True, timeoutMs=10000)
            metrics = (await http.get(f"{url}/metrics")).text
    page = result["page"]
    assert page["error"]["visible"] is True
    assert page["error"]["text"] == "Microphone access was blocked — allow it in the address bar and try again."
    assert page["status"]["state"] == "error" and page["sessionId"] is None
    assert 'voxray_calls_started_total{carrier="browser"}' not in metrics    # no session was opened
    assert fake.state.calls["llm"] == 0


async def test_refusals_are_explained(mic_wav: Path, tmp_path: Path) -> None:
    require_browser()
    async with FakeOpenAI() as fake:
        async with running_gateway(gateway_config(fake, tmp_path, server_api_key="k3y")) as url:
            wrong_key = await drive(f"{url}/?token=wrong", wav=str(mic_wav), expectError=True, timeoutMs=10000)
            unknown = await drive(f"{url}/?token=k3y", wav=str(mic_wav), persona="nobody", expectError=True,
                                  timeoutMs=10000)
    error = wrong_key["page"]["error"]
    assert error["text"] == "The gateway refused the API key — check the API key field."
    assert wrong_key["page"]["personaOptions"] == ["default"]         # /personas refused the wrong key too
    error = unknown["page"]["error"]                                  # the server's words, not the close code
    assert error["code"] == "bad_start" and error["text"] == "unknown persona 'nobody'; known: concierge"
    assert unknown["page"]["personaOptions"] == ["default", "concierge"]
    assert unknown["page"]["status"] == {"text": "Call failed", "state": "error"}
    assert wrong_key["page"]["status"] == {"text": "Call failed", "state": "error"}
