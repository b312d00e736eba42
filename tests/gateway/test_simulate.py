"""``voxray simulate``: zero setup (its own gateway in the process), real speech, the conversation printed,
non-zero exit when a turn gets no real answer, and one line for every failure.

The end-to-end runs are real subprocesses (``python -m gateway simulate``) with the offline providers,
as a new user would run them; the failure paths that start no gateway call ``main`` directly."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shlex
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import websockets

from gateway.__main__ import main
from gateway.config import Config
from gateway.simulate.caller_audio import RATE, CallerAudioError, from_wav, trim_silence
from gateway.simulate.local_gateway import DevCredentials, dev_config
from tests.conftest import PUBLIC_URL, running_gateway
from tests.gateway.test_main import REPO, clean_env

README = (REPO / "README.md").read_text()
RUN_TIMEOUT_S = 180.0


def simulate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "simulate", *args], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def agent_lines(stdout: str) -> list[str]:
    return re.findall(r"^\[call 1\] agent said: (.*)$", stdout, re.MULTILINE)


def no_traceback(run: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in run.stderr + run.stdout, run.stderr


def write_wav(path: Path, samples: np.ndarray, *, rate: int, width: int = 2) -> Path:
    """``samples`` (frames x channels, float in [-1, 1]) as a PCM WAV of ``width`` bytes per sample."""
    scaled = np.round(samples * (2 ** (8 * width - 1) - 1)).astype("<i4")
    raw = scaled.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :width] if width > 1 else \
        (scaled + 128).astype(np.uint8).reshape(-1, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw.tobytes())
    return path


# ---------------------------------------------------------------------------------------------- end to end
def try_it_command() -> list[str]:
    """The simulate command line of the README's "Try it" section."""
    section = README.split("## Try it", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
             for line in block.splitlines() if "voxray simulate" in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#", 1)[0])


def test_the_readme_try_it_command_with_no_arguments_talks_to_its_own_gateway() -> None:
    command = try_it_command()
    assert command[0].endswith("voxray") and command[1:] == ["simulate"], command   # zero setup: no arguments
    run = simulate(*command[2:])
    no_traceback(run)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "a gateway in this process on http://127.0.0.1:" in out
    agent = agent_lines(out)
    assert agent[0] == "Hello! How can I help you today?"
    # the offline agent repeats what the offline recogniser heard: the caller's words came through
    assert "weather today" in agent[1] and "pay my bill" in agent[2], agent
    assert "[call 1] gateway heard: can you tell me the weather today" in out
    assert re.search(r"^\[call 1\] turn 1: answered, \d+ ms", out, re.MULTILINE)
    assert re.search(r"^2/2 turns answered; latency p50 \d+ ms, max \d+ ms", out, re.MULTILINE)
    # the README's sample output has the same lines
    for sample in ("gateway heard: can you tell me the weather today", "turn 2: answered", "2/2 turns answered"):
        assert sample in README


def test_say_speaks_a_custom_sentence_over_another_carrier() -> None:
    run = simulate("--carrier", "vonage", "--say", "I want to speak to a person.")
    no_traceback(run)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "speak to a person" in agent_lines(run.stdout)[1], run.stdout
    assert "1/1 turns answered" in run.stdout


def test_a_silent_caller_gets_only_the_greeting_and_the_silence_prompt_and_fails(tmp_path: Path) -> None:
    silence = write_wav(tmp_path / "silence.wav", np.zeros((16000, 1)), rate=8000)
    env = {**clean_env(), "VOXRAY_SILENCE_PROMPT_SECS": "2"}
    run = simulate("--audio", str(silence), "--turns", "1", env=env)
    no_traceback(run)
    assert run.returncode == 1, run.stdout + run.stderr
    assert agent_lines(run.stdout) == ["Hello! How can I help you today?", "Are you still there?"]
    assert "turn 1: NO ANSWER: the agent only said 'Are you still there?'" in run.stdout
    assert "0/1 turns answered" in run.stdout


# ---------------------------------------------------------------------------------------------- failures: one line
def one_line_failure(capsys: pytest.CaptureFixture[str], code: int) -> str:
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxray simulate: "), captured.err
    return lines[0]


def test_an_unreachable_gateway_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    audio = write_wav(tmp_path / "a.wav", np.full((800, 1), 0.3), rate=8000)
    line = one_line_failure(capsys, main(["simulate", "--url", "http://127.0.0.1:9", "--audio", str(audio)]))
    assert "cannot reach the gateway at http://127.0.0.1:9" in line and "voxray serve" in line


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("missing.wav", None, "no such file"),
    ("text.wav", b"this is not audio", "is not a PCM WAV file"),
])
def test_a_bad_audio_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str,
                                      content: bytes | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    line = one_line_failure(capsys, main(["simulate", "--url", "http://127.0.0.1:9", "--audio", str(path)]))
    assert str(path) in line and expected in line


@pytest.mark.asyncio
@pytest.mark.parametrize(("carriers", "expected"), [
    ({}, "has no twilio credentials (503: twilio is not configured: set TWILIO_AUTH_TOKEN)"),
    ({"twilio": {"account_sid": "AC" + "1" * 32, "auth_token": "the-gateways-token"}},
     "refused the webhook's signature (403"),
])
async def test_a_refused_webhook_is_one_line_with_the_gateways_reason(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        carriers: dict[str, dict[str, str]], expected: str) -> None:
    for var in ("TWILIO_AUTH_TOKEN", "TWILIO_ACCOUNT_SID"):
        monkeypatch.delenv(var, raising=False)
    audio = write_wav(tmp_path / "a.wav", np.full((800, 1), 0.3), rate=8000)
    config = Config.from_mapping({"public_url": PUBLIC_URL, "carriers": carriers, "allow_unauthenticated": True},
                                 environ={})
    async with running_gateway(config) as url:
        code = await asyncio.to_thread(main, ["simulate", "--url", url, "--public-url", PUBLIC_URL,
                                              "--credential", "auth_token=not-the-token", "--audio", str(audio)])
    line = one_line_failure(capsys, code)
    assert expected in line and "--credential" in line, line


@pytest.mark.asyncio
async def test_a_full_gateway_answering_busy_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """At max_concurrent_calls the gateway speaks its busy answer; the simulator says so instead of 'not markup'."""
    audio = write_wav(tmp_path / "a.wav", np.full((800, 1), 0.3), rate=8000)
    token = "busy-test-token-0123456789"
    config = Config.from_mapping({"public_url": PUBLIC_URL, "allow_unauthenticated": True, "max_concurrent_calls": 1,
                                  "carriers": {"twilio": {"auth_token": token, "account_sid": "AC" + "1" * 32}}},
                                 environ={})
    async with running_gateway(config) as url, websockets.connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send('{"type": "start"}')
        await ws.recv()                                  # ready: the one call this gateway takes is up
        code = await asyncio.to_thread(main, ["simulate", "--url", url, "--public-url", PUBLIC_URL,
                                              "--credential", f"auth_token={token}", "--audio", str(audio)])
    line = one_line_failure(capsys, code)
    assert "answered busy" in line and "max_concurrent_calls" in line, line


# ---------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize(("channels", "rate", "width"), [(1, 8000, 2), (2, 44100, 2), (2, 22050, 3), (1, 16000, 1)])
def test_any_pcm_wav_becomes_8khz_16bit_mono(tmp_path: Path, channels: int, rate: int, width: int) -> None:
    t = np.arange(rate) / rate                                          # one second of 440 Hz
    tone = np.repeat((0.5 * np.sin(2 * np.pi * 440 * t))[:, None], channels, axis=1)
    utterance = from_wav(write_wav(tmp_path / "tone.wav", tone, rate=rate, width=width))
    pcm = np.frombuffer(utterance.pcm, dtype="<i2")
    assert abs(pcm.size - RATE) <= 40 and utterance.seconds == pytest.approx(1.0, abs=0.01)
    assert np.abs(pcm).max() == pytest.approx(0.5 * 32767, rel=0.06)


def test_a_float_wav_is_refused_with_the_fix(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 100)
    data = bytearray(buf.getvalue())
    data[20:22] = (3).to_bytes(2, "little")                              # WAVE_FORMAT_IEEE_FLOAT
    path = tmp_path / "float.wav"
    path.write_bytes(bytes(data))
    with pytest.raises(CallerAudioError, match=r"is not a PCM WAV file .*sox"):
        from_wav(path)


def test_trim_silence_keeps_the_speech_and_a_little_margin() -> None:
    quiet, loud = b"\x00\x00" * 800, b"\xff\x3f" * 80
    assert trim_silence(quiet + loud + quiet) == b"\x00\x00" * 160 + loud + b"\x00\x00" * 160
    assert trim_silence(quiet) == quiet                                   # a silent caller stays silent


@pytest.mark.parametrize("carrier", ["twilio", "telnyx", "vonage", "plivo", "exotel"])
def test_the_dev_config_configures_the_emulated_carrier_and_nothing_real(carrier: str) -> None:
    base = Config.from_mapping({"public_url": "https://voice.example.com", "log_level": "debug"}, environ={})
    assert base.carriers.missing(carrier)                                 # not configured by the user
    config = dev_config(base, DevCredentials.generate(carrier), port=43210)
    assert config.carriers.missing(carrier) == []
    assert (config.host, config.port, config.public_url) == ("127.0.0.1", 43210, "https://127.0.0.1:43210")
    assert config.log_transcripts and config.server_api_key and config.log_level == "debug"
    assert config.carriers[carrier]["api_base_url"].startswith("http://127.0.0.1:")
    again = DevCredentials.generate(carrier)
    assert again.gateway != DevCredentials.generate(carrier).gateway     # a new credential every run


@pytest.mark.asyncio
@pytest.mark.parametrize(("voice", "code", "expected"), [
    (["--say", "I would like to pay my bill."], 0, r"^\[call 1\] turn 1: answered, \d+ ms"),
    (["--audio", "silence"], 1, r"^\[call 1\] turn 1: NO ANSWER: no agent audio within 6 s of the end of speech"),
])
async def test_an_external_gateway_gets_latencies_and_a_late_or_missing_answer_fails(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, voice: list[str], code: int, expected: str) -> None:
    if voice[0] == "--audio":
        voice = ["--audio", str(write_wav(tmp_path / "silence.wav", np.zeros((8000, 1)), rate=8000))]
    creds = {"account_sid": "AC" + "2" * 32, "auth_token": "external-token"}
    config = Config.from_mapping({"public_url": PUBLIC_URL, "carriers": {"twilio": creds}, "vad_stop_ms": 400,
                                  "allow_unauthenticated": True}, environ={})
    async with running_gateway(config) as url:
        got = await asyncio.to_thread(main, [
            "simulate", "--url", url, "--public-url", PUBLIC_URL, "--credential", f"auth_token={creds['auth_token']}",
            "--credential", f"account_sid={creds['account_sid']}", "--answer-timeout", "6", *voice])
    # 6 s, not 3: the offline STT and TTS answer in about 1 s alone but slower on a loaded machine
    out = capsys.readouterr().out
    assert got == code, out
    assert re.search(expected, out, re.MULTILINE), out
    assert "agent said" not in out and "transcripts are shown only for a gateway in this process" in out


def test_missing_offline_packages_are_one_line(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The configuration check names them (as for ``serve``) before any gateway starts."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pocketsphinx" else real(name, *a))
    for var in [v for v in os.environ if v.startswith("VOXRAY_") or v.endswith("_API_KEY")]:
        monkeypatch.delenv(var)
    assert main(["simulate"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["voxray: configuration error: the offline 'local' stt provider needs pocketsphinx: install it "
                     "with pip install 'voxray[local]', or configure a provider and its key"]


@pytest.mark.asyncio
async def test_speaking_ends_when_the_gateway_closes_the_call() -> None:
    """The emulated caller stops talking when the line drops: ``speak`` returns instead of waiting for
    frames that can no longer be sent (a simulation, a benchmark or a test would hang there)."""
    import httpx

    from gateway.simulate.call import SimulatedCall, synthetic_voice
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, phone_config
    from tests.fakes.openai_server import FakeOpenAI
    from tests.fakes.twilio_rest import FakeTwilioREST

    async with FakeOpenAI() as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            twilio.known_calls = twilio.known_calls | {call.call_sid}
            await call.dial()
            await call.connect()
            speaking = asyncio.create_task(call.speak(synthetic_voice(30.0)))      # 30 s of speech
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient() as http:
                assert (await http.delete(f"{url}/sessions/{call.session_id}")).status_code in (200, 202, 204)
            await asyncio.wait_for(speaking, 5)
            await call.close()
