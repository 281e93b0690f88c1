"""Pure resilience logic: the retry schedule, ``Retry-After``, a circuit breaker, a rate limiter.

Nothing here does I/O; the clocks are injectable so every rule is unit-testable.

- ``backoff_delay``: ``min(base * multiplier**(attempt-1), max_delay) * (1 + U(0, jitter))``.
  Jitter only ever lengthens a delay, so the un-jittered value is a hard lower bound.
- ``parse_retry_after``: delta-seconds or an HTTP date, capped at ``MAX_RETRY_AFTER_S``.
- ``CircuitBreaker``: closed -> open after ``threshold`` consecutive failures -> half-open
  once ``open_s`` has passed, letting exactly one probe through -> closed on its success,
  open again on its failure.
- ``RateLimiter``: a token bucket that hands out reservations, so waiters are served in
  order and the long-run rate is exact.
- ``retry_transient``: run an operation again while it fails in a way the caller calls
  passing (a broker still electing a leader), for a bounded time, then let it fail.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Protocol, TypeVar

# A receiver asking for more than this is capped: an event is not parked for days.
MAX_RETRY_AFTER_S = 3600.0

Clock = Callable[[], float]
T = TypeVar("T")


class BackoffPolicy(Protocol):
    """What ``backoff_delay`` reads (``mesh.registry.RetryPolicy`` fits)."""

    base_s: float
    multiplier: float
    max_delay_s: float
    max_retries: int
    jitter: float


def backoff_delay(
    policy: BackoffPolicy, attempt: int, rng: Callable[[], float] = random.random
) -> float:
    """The wait after failed attempt number ``attempt`` (1-based), in seconds."""
    exponent = max(0, attempt - 1)
    try:
        raw = policy.base_s * policy.multiplier**exponent
    except OverflowError:
        raw = math.inf
    delay = min(raw, policy.max_delay_s)
    return delay * (1.0 + policy.jitter * rng())


def backoff_bounds(policy: BackoffPolicy, attempt: int) -> tuple[float, float]:
    """``(lowest, highest)`` delay ``backoff_delay`` can return for ``attempt``."""
    low = backoff_delay(policy, attempt, rng=lambda: 0.0)
    return low, low * (1.0 + policy.jitter)


def schedule(policy: BackoffPolicy) -> list[tuple[float, float]]:
    """The bounds of every retry delay the policy allows, in order."""
    return [backoff_bounds(policy, n) for n in range(1, policy.max_retries + 1)]


def is_last_attempt(policy: BackoffPolicy, attempt: int) -> bool:
    """Attempt ``max_retries + 1`` is the last: a failure there goes to the dead letters."""
    return attempt > policy.max_retries


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None when absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER_S)


def retry_delay(
    policy: BackoffPolicy,
    attempt: int,
    retry_after: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """The policy's delay, never shorter than what the receiver asked for."""
    delay = backoff_delay(policy, attempt, rng)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


# Circuit breaker ---------------------------------------------------------------


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """The value of the ``mesh_circuit_state`` gauge (0 closed, 1 half-open, 2 open)."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


class CircuitBreaker:
    """One target's breaker, for one process.

    ``allow()`` is asked before each request. While closed it always says yes. While open
    it says no until ``open_s`` has passed; then the breaker turns half-open and the one
    caller that gets yes carries the probe; everyone else gets no until the probe's
    result is recorded (or ``release_probe`` hands the probe back unused).

    Results: ``record_success`` closes it (from any state but open, where a late answer
    to a request sent before it opened proves nothing); ``record_failure`` counts
    consecutive failures while closed and re-opens a half-open breaker.
    """

    def __init__(self, threshold: int = 5, open_s: float = 60.0, clock: Clock = time.monotonic):
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if open_s <= 0:
            raise ValueError("open_s must be positive")
        self.threshold = threshold
        self.open_s = open_s
        self.clock = clock
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_until = 0.0
        self.probe_out = False

    def allow(self) -> bool:
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self.clock() < self.opened_until:
                return False
            self.state = CircuitState.HALF_OPEN
            self.probe_out = False
        if self.probe_out:
            return False
        self.probe_out = True
        return True

    def release_probe(self) -> None:
        """The probe was granted but never sent: let the next caller carry it."""
        if self.state is CircuitState.HALF_OPEN:
            self.probe_out = False

    def record_success(self) -> None:
        if self.state is CircuitState.OPEN:
            return
        self.reset()

    def record_failure(self) -> bool:
        """Count a failure; True when this failure opened the breaker."""
        if self.state is CircuitState.OPEN:
            return False
        if self.state is CircuitState.HALF_OPEN:
            self.trip()
            return True
        self.failures += 1
        if self.failures >= self.threshold:
            self.trip()
            return True
        return False

    # Explicit transitions (also used to mirror a state shared between processes).

    def trip(self, until: float | None = None) -> None:
        self.state = CircuitState.OPEN
        self.opened_until = self.clock() + self.open_s if until is None else until
        self.probe_out = False

    def half_open(self) -> None:
        self.state = CircuitState.HALF_OPEN
        self.probe_out = False

    def reset(self) -> None:
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.probe_out = False

    def remaining(self) -> float:
        """Seconds left in the open period (0 when not open or already over)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.opened_until - self.clock())


# Rate limiter ------------------------------------------------------------------


def default_burst(rate: float) -> float:
    """A bucket holding 50 ms of traffic (at least one token): smooth, not bursty."""
    return max(1.0, rate * 0.05)


class RateLimiter:
    """Token bucket: ``rate`` tokens a second, at most ``burst`` saved up.

    ``reserve()`` takes a token now, possibly going into debt, and returns how long the
    caller must wait before using it; debt is paid back by the refill. Callers are thus
    served in arrival order and the long-run rate is exactly ``rate``.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Clock = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.clock = clock
        self.rate = rate
        self.burst = default_burst(rate) if burst is None else max(1.0, burst)
        self.tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._refill()
        self.rate = rate
        self.burst = default_burst(rate) if burst is None else max(1.0, burst)
        self.tokens = min(self.tokens, self.burst)

    def reserve(self) -> float:
        """Take one token; seconds to wait before it may be used (0 when available now)."""
        self._refill()
        self.tokens -= 1.0
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate

    def try_take(self) -> bool:
        """Take a token only if one is there now (never into debt)."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


@dataclass(frozen=True, slots=True)
class Backoff:
    """A doubling pause between tries of an in-process retry loop: ``first_s``, then twice
    the last, at most ``max_s``."""

    first_s: float
    max_s: float

    def next(self, delay: float) -> float:
        return min(delay * 2, self.max_s)


# The in-process retry loops, with their pauses in one place:
PULL_BACKOFF = Backoff(0.1, 2.0)  # a failing fetch (mesh/_nats/pull.py)
TARGET_BACKOFF = Backoff(0.5, 5.0)  # a target not ready (services/egress/worker.py)
DATABASE_BACKOFF = Backoff(0.2, 10.0)  # a database write (services/sink)


async def retry_transient(
    op: Callable[[], Awaitable[T]],
    transient: Callable[[BaseException], bool],
    *,
    within_s: float = 15.0,
    first_delay_s: float = 0.1,
    max_delay_s: float = 2.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Clock = time.monotonic,
) -> T:
    """``await op()``, again after a doubling pause while it raises what ``transient``
    accepts; the error itself once the next pause would end past ``within_s``. Any other
    error is raised at once."""
    deadline = clock() + within_s
    delay = first_delay_s
    while True:
        try:
            return await op()
        except Exception as exc:
            if not transient(exc) or clock() + delay > deadline:
                raise
        await sleep(delay)
        delay = min(delay * 2, max_delay_s)
