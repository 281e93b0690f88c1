"""How many requests a target may have on the wire right now: adaptive, under its
``max_in_flight`` (``Pace``, one per ``TargetWorker``).

A target whose requests run into their timeout holds its slots for the whole timeout and
then lets them all go at once: with 20 such targets, a few hundred requests time out in
the same instant every ``timeout_s``, and the egress spends that instant closing and
reopening their connections, writing their records and naking their messages, while
every other target's (and tenant's) deliveries wait for the event loop. The breaker
stops this only once it opens; a target whose timeouts never reach the threshold (or
that sets a high one) keeps doing it.

So the limit follows what the target answers, as TCP's window does:

- it starts at ``START`` (one request) and grows by one with each success, up to
  ``max_in_flight``: a chunk's successes add up, so a healthy target doubles per round
  trip (1, 2, 4 ... 64 in seven) and a blackholed one never leaves the start. Starting
  at 8 left a first storm of 8 x the targets (160 for 20) one timeout after they began,
  which alone put A's p99 at 15.8x idle in a 5 s window (``bench tenants --quick``);
  from 1 it was 1.41x;
- a timeout cuts it to the successes seen in the last ``timeout_s`` (at least 1): a target
  that answered most requests in that time keeps its limit, one that answered none goes
  down to one request at a time until it answers again.

Ordered targets have a limit of 1 anyway. Nothing else changes: a cut only delays what
is fetched, never drops or reorders it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

START = 1  # requests on the wire before the target has answered any (slow start)


class Pace:
    def __init__(self, ceiling: int, timeout_s: float) -> None:
        self.ceiling = max(1, ceiling)
        self.timeout_s = timeout_s
        self.limit = min(self.ceiling, START)
        self.cuts = 0
        self._oks: deque[float] = deque(maxlen=self.ceiling)
        self._room = asyncio.Event()

    def configure(self, ceiling: int, timeout_s: float) -> None:
        """A changed target: a new ``max_in_flight`` or timeout."""
        ceiling = max(1, ceiling)
        if ceiling != self.ceiling:
            self._oks = deque(self._oks, maxlen=ceiling)
            self.ceiling = ceiling
            self.limit = min(self.limit, ceiling)
        self.timeout_s = timeout_s
        self._room.set()

    def open(self, on_wire: int) -> bool:
        """Whether one more request may go out with ``on_wire`` already out."""
        return on_wire < self.limit

    def fits(self, on_wire: int, waiting: int) -> bool:
        """Whether a chunk may start with ``on_wire`` already out when ``waiting`` requests
        wait to go: with nothing out, yes (what clears goes: nothing else would wake the
        wait); otherwise only if the room left takes all of them (up to the limit).

        A batch that sent the sliver there is room for would send its rest beside the
        next batch, which is then split in turn: after slow start, chunks of 1 and 31 for
        the rest of the run, twice the calls for the same deliveries. The requests out
        wake the wait when they come back (``wake``), as the rest would have waited for
        them anyway."""
        if on_wire == 0:
            return True
        return self.limit - on_wire >= max(1, min(waiting, self.limit))

    async def wait(self) -> None:
        """Until the limit or the count on the wire may have changed: check ``open``
        again on waking."""
        self._room.clear()
        await self._room.wait()

    def wake(self) -> None:
        """A request came off the wire."""
        self._room.set()

    def done(self, ok: int, timed_out: int, now: float | None = None) -> None:
        """Requests came back: ``ok`` succeeded, ``timed_out`` ran into the timeout (the
        rest failed otherwise, which says nothing about how many the target can take)."""
        now = time.monotonic() if now is None else now
        for _ in range(min(ok, self.ceiling)):
            self._oks.append(now)
        if timed_out:
            since = now - self.timeout_s
            answered = sum(1 for t in self._oks if t >= since)
            limit = max(1, min(self.limit, answered))
            if limit < self.limit:
                self.cuts += 1
            self.limit = limit
        elif ok and self.limit < self.ceiling:
            self.limit = min(self.ceiling, self.limit + ok)
        self._room.set()
