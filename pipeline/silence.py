"""The silence watch: "are you still there?" after a quiet spell on both sides, then goodbye.

Both engines (the cascade and the speech-to-speech session) own one; they report activity and say how
to prompt and how to give up.

Usage::

    watch = SilenceWatch(prompt_secs=20, hangup_secs=10, busy=lambda: playout.speaking,
                         prompt=lambda: say("Are you still there?"), give_up=lambda: end_with("Goodbye.", "silence"))
    task = spawn(watch.run())
    watch.activity(at)                 # the agent's audio started or stopped at clock time ``at``
    watch.activity(caller=True)        # the caller spoke: a later silence is prompted afresh
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

__all__ = ["SilenceWatch"]

logger = logging.getLogger(__name__)


class SilenceWatch:
    """Calls ``prompt()`` after ``prompt_secs`` without activity while not ``busy()``, then
    ``give_up()`` after ``hangup_secs`` more without an answer; :meth:`run` returns after giving up."""

    def __init__(self, *, prompt_secs: float, hangup_secs: float, busy: Callable[[], bool],
                 prompt: Callable[[], object], give_up: Callable[[], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._prompt_secs = prompt_secs
        self._hangup_secs = hangup_secs
        self._busy = busy
        self._prompt = prompt
        self._give_up = give_up
        self._clock = clock
        self._last = clock()
        self._prompted = False

    def activity(self, at: float | None = None, *, caller: bool = False) -> None:
        """Something was heard or said at ``at`` (now by default); ``caller``: the caller spoke."""
        self._last = self._clock() if at is None else at
        if caller:
            self._prompted = False

    async def run(self) -> None:
        while True:
            wait = self._hangup_secs if self._prompted else self._prompt_secs
            delay = self._last + wait - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if self._busy():
                self._last = self._clock()
                continue
            if self._prompted:
                logger.info("no answer to the silence prompt; ending the call")
                self._give_up()
                return
            self._prompted = True
            self._last = self._clock()
            self._prompt()
