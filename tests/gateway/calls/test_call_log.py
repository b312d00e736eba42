"""gateway.calls.call_log: what a call leaves behind. Real gateways with recording to a real S3 server
(SeaweedFS) and transcripts to SQLite and to a private PostgreSQL that is stopped mid-call."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import time
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.calls.call_log import CallLog
from gateway.config import Config
from gateway.logging import CallIdFilter, call_id
from gateway.sessions import Session
from gateway.simulate.call import SimulatedCall
from gateway.storage.transcripts import TranscriptWriter
from pipeline.conversation import BotSpeaking, ConversationSettings, Persona, TranscriptEvent, TurnLatency
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.pg_server import PgServer
from tests.s3_server import WeedS3
from tests.speech import speech_pcm

APOLOGY = ConversationSettings().apology_text


@pytest.fixture
def aws(s3server: WeedS3, monkeypatch: pytest.MonkeyPatch) -> WeedS3:
    """The standard AWS variables the gateway's aioboto3 session reads, pointing at the test server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.secret_key)
    return s3server


def storage(tmp_path: Path, s3: WeedS3, transcripts: dict[str, Any]) -> dict[str, Any]:
    return {"recording": {"enable": True, "bucket": s3.bucket, "endpoint_url": s3.endpoint_url,
                          "region": "us-east-1", "spool_dir": str(tmp_path / "spool"), "retry_base_secs": 0.05,
                          "respool_interval_secs": 0.5},
            "transcripts": {"enable": True, "flush_interval_secs": 0.05, "retry_base_secs": 0.05,
                            "spool_dir": str(tmp_path / "tspool"), **transcripts}}


def new_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


async def answered_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    """A call that has been answered, connected and greeted (the greeting has finished)."""
    call = new_call(url, twilio)
    assert (await call.dial()).status_code == 200
    await call.connect()
    await call.wait_audio(after=0, timeout=5)
    await call.wait_quiet(400)
    return call


async def talk(call: SimulatedCall, text: str) -> None:
    end = await call.speak(speech_pcm(text, 8000))
    await call.wait_audio(after=end, timeout=10)
    await call.wait_quiet(400)


async def recording(s3: WeedS3, session_id: str, timeout_s: float = 20.0) -> bytes:
    client = s3.client()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listing = client.list_objects_v2(Bucket=s3.bucket, Prefix="recordings/")
            keys = [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(f"/{session_id}.wav")]
            if keys:
                return client.get_object(Bucket=s3.bucket, Key=keys[0])["Body"].read()
            await asyncio.sleep(0.1)
        raise AssertionError(f"no recording of {session_id} arrived in {timeout_s} s")
    finally:
        client.close()


def channels(wav_bytes: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        assert (w.getsampwidth(), w.getnchannels()) == (2, 2)
        rate = w.getframerate()
        return rate, np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2).astype(np.float64) / 32768


def sqlite_rows(path: Path, session_id: str) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM call_transcripts WHERE session_id = ? ORDER BY seq",
                                            (session_id,))]


# ------------------------------------------------------------------------------------------ unit
@pytest.mark.asyncio
async def test_rows_number_utterances_time_the_caller_and_carry_the_turn_latency(tmp_path: Path) -> None:
    writer = TranscriptWriter(driver="sqlite", dsn=str(tmp_path / "t.db"), table_name="call_transcripts",
                              batch_size=10, flush_interval_s=0.01, retry_base_s=0.05, max_buffered_rows=100,
                              spool_dir=tmp_path / "spool")
    await writer.start()
    clock = iter([100.0, 100.5, 104.0, 104.2, 104.3, 105.0]).__next__
    session = Session.new(carrier="twilio", call_id="CA1", from_="+15550001", to="+15550002")
    log = CallLog(session, persona="concierge", carrier="twilio", writer=writer, clock=clock)
    log.observe(BotSpeaking(True))                                          # 100.0 the greeting starts
    log.observe(TranscriptEvent("assistant", "Hello!"))                     # 100.5
    log.observe(TranscriptEvent("user", "a table for two", spoken_s=1.5, ended_s_ago=0.5))   # 104.0
    log.observe(TurnLatency(400, 300, 200, 100, 900))                       # 104.2 first audio of the answer
    log.observe(BotSpeaking(True))                                          # 104.3
    log.observe(TranscriptEvent("assistant", "Sure. For what time?"))       # 105.0
    await log.close()
    await log.close()                                                       # idempotent
    assert await writer.flush(5)
    await writer.close(5)
    rows = sqlite_rows(tmp_path / "t.db", session.id)
    assert [(r["seq"], r["role"], r["text"]) for r in rows] == [
        (1, "assistant", "Hello!"), (2, "user", "a table for two"), (3, "assistant", "Sure. For what time?")]
    assert rows[0]["latency"] is None and rows[1]["latency"] is None
    assert json.loads(rows[2]["latency"]) == {"turn_wait_ms": 400, "stt_ms": 300, "llm_first_token_ms": 200,
                                              "tts_first_audio_ms": 100, "first_audio_out_ms": 900}
    assert [(r["started_at"], r["ended_at"]) for r in rows] == [(100.0, 100.5), (102.0, 103.5), (104.3, 105.0)]
    assert {(r["carrier"], r["call_id"], r["from_number"], r["to_number"], r["persona"]) for r in rows} == {
        ("twilio", "CA1", "+15550001", "+15550002", "concierge")}


@pytest.mark.parametrize("enabled", [True, False])
def test_log_transcripts_logs_each_utterance_with_the_call_id_only_when_on(
        enabled: bool, caplog: pytest.LogCaptureFixture) -> None:
    services = SimpleNamespace(config=Config.from_mapping({"log_transcripts": enabled}), recordings=None,
                               transcripts=None)
    session = Session.new(carrier="twilio", call_id="CA7", from_="+15550001", to="+15550002")
    log = CallLog.for_session(services, session, persona="concierge", carrier="twilio")  # type: ignore[arg-type]  # Services stand-in
    caplog.handler.addFilter(CallIdFilter())
    token = call_id.set("CA7")
    try:
        with caplog.at_level(logging.INFO, logger="gateway.calls.call_log"):
            log.observe(TranscriptEvent("assistant", "Hello! How can I help?"))
            log.observe(TranscriptEvent("user", "a table for two", final=False))     # partial: not logged
            log.observe(TranscriptEvent("user", "a table for two tonight", spoken_s=1.0))
            log.observe(BotSpeaking(True))
    finally:
        call_id.reset(token)
    lines = [(r.levelno, r.call_id, r.getMessage()) for r in caplog.records if r.name == "gateway.calls.call_log"]
    expected = [(logging.INFO, "CA7", "agent said: Hello! How can I help?"),
                (logging.INFO, "CA7", "caller said: a table for two tonight")]
    assert lines == (expected if enabled else [])


# ------------------------------------------------------------------------------------------ whole calls
@pytest.mark.asyncio
async def test_a_call_is_recorded_in_stereo_to_s3_and_transcribed_to_sqlite(tmp_path: Path, aws: WeedS3) -> None:
    db = tmp_path / "transcripts.db"
    async with (FakeOpenAI(transcripts=["I would like a table for two"], replies=["Sure. For what time?"],
                           tts_ms_per_char=20) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url,
                              **storage(tmp_path, aws, {"driver": "sqlite", "dsn": str(db)}))
        async with running_gateway(config):
            pass            # startup with storage enabled and nothing to do: clean start and stop
        async with running_gateway(config) as url:
            call = await answered_call(url, twilio)
            await talk(call, "I would like to book a table for two people tonight.")
            await call.hang_up()
            wav = await recording(aws, call.session_id)
            await call.close()
            async with httpx.AsyncClient() as http:
                deadline = time.monotonic() + 5
                while "voxray_recordings_uploaded 1.0" not in (metrics := (await http.get(f"{url}/metrics")).text):
                    assert time.monotonic() < deadline, metrics
                    await asyncio.sleep(0.05)
    for line in ("voxray_recording_backlog 0.0", "voxray_recording_upload_retries 0.0",
                 "voxray_transcript_backlog 0.0", 'voxray_sessions{store="memory"} 0.0', "voxray_draining 0.0"):
        assert line in metrics
    rate, audio = channels(wav)
    assert rate == 16000 and 2.0 < len(audio) / rate < 60
    caller, agent = audio[:, 0], audio[:, 1]
    assert np.sqrt(np.mean(caller ** 2)) > 0.005 and np.sqrt(np.mean(agent ** 2)) > 0.005
    # the agent's greeting comes first: the agent side is loud in the first second, the caller side quiet
    first = slice(0, rate)
    assert np.sqrt(np.mean(agent[first] ** 2)) > 10 * np.sqrt(np.mean(caller[first] ** 2)) + 1e-4
    rows = sqlite_rows(db, call.session_id)
    assert [(r["role"], r["text"]) for r in rows] == [
        ("assistant", Persona().greeting), ("user", "I would like a table for two"),
        ("assistant", "Sure. For what time?")]
    assert rows[2]["latency"] is not None and rows[1]["started_at"] < rows[1]["ended_at"] <= rows[2]["ended_at"]
    assert not any((tmp_path / "spool").glob("*.wav"))                      # uploaded, nothing left behind


@pytest.mark.asyncio
async def test_a_failing_provider_still_leaves_the_recording_and_the_transcript(tmp_path: Path, aws: WeedS3) -> None:
    db = tmp_path / "transcripts.db"
    async with (FakeOpenAI(transcripts=["hello"], tts_ms_per_char=20) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, provider_retries=0,
                              **storage(tmp_path, aws, {"driver": "sqlite", "dsn": str(db)}))
        async with running_gateway(config) as url:
            call = await answered_call(url, twilio)
            fake.state.fail["llm"] = "500"
            await call.speak(speech_pcm("Hello, are you there?", 8000))
            await call.wait_closed(timeout=15)                              # apology, then a clean end
            assert call.close_code == 1000
            wav = await recording(aws, call.session_id)
            await call.close()
    assert channels(wav)[0] == 16000
    rows = sqlite_rows(db, call.session_id)
    assert [r["role"] for r in rows] == ["assistant", "user", "assistant"]
    assert rows[-1]["text"] == APOLOGY


@pytest.mark.asyncio
async def test_postgresql_stopped_mid_call_loses_no_row_and_duplicates_none(tmp_path: Path, aws: WeedS3) -> None:
    import asyncpg

    pg = PgServer()
    pg.start()
    try:
        async with (FakeOpenAI(transcripts=["first question", "second question", "third question"],
                               replies=["First answer.", "Second answer.", "Third answer."],
                               tts_ms_per_char=20) as fake,
                    FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
            config = phone_config(fake.base_url, twilio.base_url,
                                  **storage(tmp_path, aws, {"driver": "postgres", "dsn": pg.dsn}))
            async with running_gateway(config) as url:
                call = await answered_call(url, twilio)
                await talk(call, "This is my first question for you.")
                pg.stop(mode="immediate")                                   # the database goes away
                await talk(call, "This is my second question for you.")
                await talk(call, "This is my third question for you.")
                pg.start()
                await call.hang_up()
                await call.close()
                db = await asyncpg.connect(pg.dsn)
                try:
                    deadline = time.monotonic() + 30
                    while True:
                        rows = await db.fetch("SELECT seq, role, text FROM call_transcripts WHERE session_id = $1 "
                                              "ORDER BY seq", call.session_id)
                        if len(rows) >= 7 or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.2)
                finally:
                    await db.close()
        assert [(r["seq"], r["role"], r["text"]) for r in rows] == [
            (1, "assistant", Persona().greeting), (2, "user", "first question"), (3, "assistant", "First answer."),
            (4, "user", "second question"), (5, "assistant", "Second answer."), (6, "user", "third question"),
            (7, "assistant", "Third answer.")]
    finally:
        pg.destroy()


# ------------------------------------------------------------------------------------------ browsers
@pytest.mark.asyncio
async def test_browser_sessions_are_recorded_and_transcribed_too(tmp_path: Path, aws: WeedS3,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import aioice.ice

    from tests.gateway.browser.test_webrtc import MIC_RATE, Browser
    from tests.gateway.browser.test_ws import open_session

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    db = tmp_path / "transcripts.db"
    async with FakeOpenAI(transcripts=["a table for two"], replies=["Sure. For what time?"],
                          tts_ms_per_char=15) as fake:
        config = phone_config(fake.base_url, "http://127.0.0.1:9",
                              **storage(tmp_path, aws, {"driver": "sqlite", "dsn": str(db)}))
        async with running_gateway(config) as url, httpx.AsyncClient(timeout=10) as http:
            # /ws
            client = await open_session(url)
            ws_id = (await client.event("ready"))["session_id"]
            await client.quiet()
            end = await client.speak(1000)
            await client.event("transcript", role="assistant", after=end, text="Sure. For what time?", timeout=8)
            await client.ws.send(json.dumps({"type": "end"}))
            await client.closed_with()
            # WebRTC
            peer = Browser()
            try:
                answer = await peer.connect(http, f"{url}/webrtc/offer")
                rtc_id = answer["session_id"]
                await peer.event("transcript", role="assistant")                # the greeting
                await peer.quiet()
                said = await peer.mic.say(speech_pcm("I would like a table for two.", MIC_RATE))
                await peer.event("transcript", role="assistant", after=said - 3, text="Sure. For what time?",
                                 timeout=8)
                assert (await http.delete(f"{url}/sessions/{rtc_id}")).status_code == 200
            finally:
                await peer.close()
            for sid in (ws_id, rtc_id):
                rate, audio = channels(await recording(aws, sid))
                assert rate == 16000 and np.sqrt(np.mean(audio[:, 0] ** 2)) > 0.005     # the caller's side
                assert np.sqrt(np.mean(audio[:, 1] ** 2)) > 0.005                      # the agent's side
    for sid, carrier in ((ws_id, "browser"), (rtc_id, "webrtc")):
        rows = sqlite_rows(db, sid)
        assert [(r["role"], r["text"], r["carrier"]) for r in rows] == [
            ("assistant", Persona().greeting, carrier), ("user", "a table for two", carrier),
            ("assistant", "Sure. For what time?", carrier)]
