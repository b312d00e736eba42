"""The hub and its members in one process (gateway.group.hub, gateway.group.member): two members on a
real unix socket share sessions, reach each other's calls and join their metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.config import Config
from gateway.group.hub import Hub
from gateway.group.member import HubControlBus, HubSessionStore, Member
from gateway.metrics import Metrics
from gateway.sessions import Session, SessionStoreUnavailable

pytestmark = pytest.mark.asyncio


class _Services:
    """What a member answers the hub from (the parts it reads)."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.calls: dict[str, object] = {}
        self.draining = False
        self.admission = None


@pytest_asyncio.fixture
async def group(tmp_path: Path) -> AsyncIterator[tuple[Hub, Member, Member]]:
    hub = Hub.from_config(Config.from_mapping({"cluster_request_timeout_secs": 1}))
    path = str(tmp_path / "hub.sock")
    await hub.start(path)
    members = [Member(path, worker=n, timeout_s=1.0) for n in (1, 2)]
    for member in members:
        await member.connect()
        member.attach(_Services())  # type: ignore[arg-type]  # the parts of Services a member reads
    yield hub, members[0], members[1]
    for member in members:
        await member.close()
    await hub.close()


async def test_a_session_made_on_one_worker_is_claimed_once_in_the_group(group: Any) -> None:
    hub, one, two = group
    a, b = HubSessionStore(one), HubSessionStore(two)
    session = await a.create(Session.new(carrier="twilio", call_id="CA1", persona="default"))
    assert (await b.get(session.id)) == session
    claimed = await b.claim(session.id, carrier="twilio")
    assert claimed is not None and claimed.state == "active"
    assert await a.claim(session.id, carrier="twilio") is None           # a replay, on either worker
    assert await b.claim(session.id, carrier="twilio") is None
    assert await a.bind_call("twilio", "CA1", session.id) is None
    assert await b.bind_call("twilio", "CA1", "other") == session.id      # the same call id answered before


async def test_the_sessions_of_a_worker_that_disconnects_are_removed(group: Any) -> None:
    hub, one, two = group
    session = await HubSessionStore(one).create(Session.new(carrier="twilio"))
    assert await HubSessionStore(two).claim(session.id, carrier="twilio") is not None
    await two.close()                                                     # worker 2 died
    for _ in range(100):
        if hub.workers == [1]:
            break
        await asyncio.sleep(0.01)
    assert hub.workers == [1]
    assert await HubSessionStore(one).get(session.id) is None
    with pytest.raises(SessionStoreUnavailable):
        await HubSessionStore(two).get(session.id)                        # its link is gone: unavailable


async def test_control_reaches_the_worker_holding_the_call(group: Any) -> None:
    hub, one, two = group
    asked: list[tuple[int, str, str]] = []

    def handler(worker: int, holds: str) -> Any:
        async def act(op: str, session_id: str, args: Mapping[str, Any]) -> dict[str, Any] | None:
            asked.append((worker, op, session_id))
            return {"status": 200, "body": {"ended": session_id}} if session_id == holds else None
        return act

    await HubControlBus(one).start(handler(1, "s-one"))
    await HubControlBus(two).start(handler(2, "s-two"))
    assert await HubControlBus(one).request("end", "s-two", {}) == {"status": 200, "body": {"ended": "s-two"}}
    assert await HubControlBus(two).request("end", "s-one", {}) == {"status": 200, "body": {"ended": "s-one"}}
    assert await HubControlBus(one).request("end", "nobody", {}) is None
    assert (1, "end", "s-two") not in asked                               # never the asking worker itself


async def test_metrics_and_status_cover_every_worker(group: Any) -> None:
    hub, one, two = group
    hub.restarts = 3
    for member, calls in ((one, 2), (two, 5)):
        services = member._services
        services.metrics.calls_started.labels(carrier="twilio").inc(calls)
        services.calls = {str(n): object() for n in range(calls)}
    body = (await one.metrics()).decode()
    assert 'voxray_calls_started_total{carrier="twilio"} 7.0' in body
    assert "voxray_workers 2.0" in body and "voxray_worker_restarts_total 3.0" in body
    status = await two.status()
    assert status is not None and not status["draining"]
    assert sorted((w["worker"], w["calls"]) for w in status["workers"]) == [(1, 2), (2, 5)]



async def test_each_worker_spools_into_its_own_directory(tmp_path: Path) -> None:
    """Uploaders rescan their spool directory for leftovers: two workers sharing one would both upload a
    recording and both replay the same transcript rows."""
    from gateway.app import build_storage

    config = Config.from_mapping({
        "recording": {"enable": True, "bucket": "b", "spool_dir": str(tmp_path / "rec")},
        "transcripts": {"enable": True, "driver": "sqlite", "dsn": str(tmp_path / "t.db"),
                        "spool_dir": str(tmp_path / "tr")}}, environ={})
    alone, alone_rows = build_storage(config)
    first, first_rows = build_storage(config, 1)
    second, second_rows = build_storage(config, 2)
    assert alone is not None and first is not None and second is not None
    assert alone.spool_dir == tmp_path / "rec"
    assert (first.spool_dir, second.spool_dir) == (tmp_path / "rec" / "worker-1", tmp_path / "rec" / "worker-2")
    spools = {rows._spool_dir.parent for rows in (alone_rows, first_rows, second_rows) if rows is not None}
    assert spools == {tmp_path / "tr", tmp_path / "tr" / "worker-1", tmp_path / "tr" / "worker-2"}
