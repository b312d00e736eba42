"""The calls running in this process: one registry object instead of a dict written from many places.

Usage::

    calls = CallRegistry()
    calls.add(call)                  # Call.run does this
    calls.get(session_id)            # control, DELETE, the cluster bus
    len(calls), list(calls)          # /ready, drain, metrics
    calls.remove(call)               # the finaliser (only if it is still the registered one)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.calls.call import Call
    from gateway.sessions import Session

__all__ = ["CallRegistry"]


class CallRegistry:
    """Live calls by session id."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[str, Call] = {}

    def add(self, call: Call) -> None:
        self._calls[call.session.id] = call

    def remove(self, call: Call) -> None:
        """Forget ``call`` (a newer call under the same id stays)."""
        if self._calls.get(call.session.id) is call:
            del self._calls[call.session.id]

    def get(self, session_id: str) -> Call | None:
        return self._calls.get(session_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[Call]:
        """The calls (a snapshot: the registry may change while the caller awaits)."""
        return iter(list(self._calls.values()))

    def __getitem__(self, session_id: str) -> Call:
        return self._calls[session_id]

    def live_sessions(self) -> list[Session]:
        """Sessions of the calls running here and not ending (written back after a store outage)."""
        return [call.session for call in self._calls.values() if call.reason is None]
