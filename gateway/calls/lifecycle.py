"""What every call type shares about its bounds: caller audio at real time, and an end within a bounded time.

:class:`MediaGate` admits caller audio through the session's :class:`~pipeline.media_budget.MediaBudget`:
audio beyond the burst allowance is dropped and counted (``voxray_media_dropped_total``), and a session
that keeps flooding is ended (1008). Readers call :func:`pause_every` so a socket with a backlog of
messages never holds the event loop for more than a few of them.

:func:`run_until_ended` runs a call's work (its TaskGroup: reader, playout, conversation) until the
work returns or the call is asked to end; then the work gets ``stop_timeout_s`` to wind down, is
cancelled, gets as long again, and is abandoned (with a log line saying where it is stuck) so the
finaliser still runs: ``DELETE``, drain and a closed socket end a session whatever its tasks do.

Usage::

    gate = MediaGate(config, metrics, label="twilio", finish=call.finish)
    if gate.admit(frame):
        conversation.on_audio(frame)
    await run_until_ended(self._converse(), self._ended, stop_timeout_s=config.call_stop_timeout_secs)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pipeline.frames import AudioFrame
from pipeline.media_budget import MediaBudget

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import Metrics

__all__ = ["MediaGate", "pause_every", "run_until_ended"]

logger = logging.getLogger(__name__)

# A reader yields to the event loop after this many messages in a row: a socket's backlog (one TCP read
# can hold hundreds of small frames) is then handled in slices of well under a millisecond each.
_MESSAGES_PER_SLICE = 32


async def pause_every(count: int) -> None:
    """Call after each message with a running count: every ``_MESSAGES_PER_SLICE``-th lets others run."""
    if count % _MESSAGES_PER_SLICE == 0:
        await asyncio.sleep(0)


class MediaGate:
    """Caller audio at real time (plus ``media_burst_ms``); drops are counted, flooding ends the session.

    ``finish`` is the call's ``finish(reason, code=..., text=...)``."""

    __slots__ = ("_budget", "_dropped", "_finish", "_warned")

    def __init__(self, config: Config, metrics: Metrics, *, label: str, finish: Callable[..., None]) -> None:
        self._budget = MediaBudget(burst_ms=config.media_burst_ms, close_after_dropped_ms=config.media_flood_close_ms)
        self._dropped = metrics.media_dropped.labels(carrier=label, reason="faster_than_real_time")
        self._finish = finish
        self._warned = False

    def admit(self, frame: AudioFrame) -> bool:
        """True when the frame may be heard; False when it was dropped (and the session may be ending)."""
        if self._budget.admit(frame.duration_ms):
            return True
        self._dropped.inc()
        if not self._warned:
            self._warned = True
            logger.warning("caller audio is arriving faster than real time; dropping what exceeds media_burst_ms")
        if self._budget.flooding:
            logger.warning("%.0f ms of caller audio dropped (media_flood_close_ms); closing the session",
                           self._budget.dropped_ms)
            self._finish("media_flood", code=1008, text="media arriving faster than real time")
        return False


async def run_until_ended(work: Coroutine[Any, Any, None], ended: asyncio.Event, *, stop_timeout_s: float) -> None:
    """Await ``work``; once ``ended`` is set, bound how long it may take to stop.

    The work's own exception (or return) comes out of here as if it had been awaited directly. If the
    caller of this function is cancelled (shutdown), the work is cancelled too and the cancellation
    propagates without waiting for the work."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(ended.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=stop_timeout_s)        # its own end: convo.close(), TaskGroup exit
        if not task.done():
            logger.warning("call tasks still running %.1f s after the end was asked; cancelling them",
                           stop_timeout_s)
            task.cancel()
            await asyncio.wait({task}, timeout=stop_timeout_s)
        if not task.done():
            logger.error("call tasks ignored cancellation for %.1f s; abandoning them so the call can end "
                         "(stuck at: %s)", stop_timeout_s, _where(task))
            return
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.cancelled():
        return        # cancelled by us above: the end was asked for, nothing failed
    task.result()     # re-raise what the work raised


def _where(task: asyncio.Task[None]) -> str:
    """The innermost frames the stuck task is suspended in (file:line function), for the log line."""
    frames = [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
              for f in task.get_stack(limit=8)]
    coro: Any = task.get_coro()
    chain: list[str] = []
    while coro is not None and len(chain) < 12:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " <- ".join(reversed(chain or frames)) or "unknown"

