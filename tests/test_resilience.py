"""Pure logic of mesh.resilience: retry schedule, Retry-After, circuit breaker, rate limiter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.registry import RetryPolicy
from mesh.resilience import (
    MAX_RETRY_AFTER_S,
    CircuitBreaker,
    CircuitState,
    RateLimiter,
    backoff_bounds,
    backoff_delay,
    is_last_attempt,
    parse_retry_after,
    retry_delay,
    retry_transient,
    schedule,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# Backoff ------------------------------------------------------------------------


def test_default_schedule_doubles_from_one_second() -> None:
    policy = RetryPolicy()  # base 1 s, x2, max 300 s, 5 retries, 10 % jitter
    lows = [low for low, _ in schedule(policy)]
    assert lows == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(high == pytest.approx(low * 1.1) for low, high in schedule(policy))


def test_delay_is_capped_at_max_delay_before_jitter() -> None:
    policy = RetryPolicy(base_s=1, multiplier=10, max_delay_s=30, jitter=0.1)
    assert backoff_delay(policy, 5, rng=lambda: 0.0) == 30.0
    assert backoff_delay(policy, 5, rng=lambda: 1.0) == pytest.approx(33.0)
    assert backoff_delay(policy, 10_000, rng=lambda: 0.0) == 30.0  # no overflow


@given(
    attempt=st.integers(min_value=1, max_value=60),
    jitter=st.floats(min_value=0, max_value=1),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_jitter_stays_within_bounds(attempt: int, jitter: float, r: float) -> None:
    policy = RetryPolicy(base_s=0.05, multiplier=2, max_delay_s=0.5, jitter=jitter)
    low, high = backoff_bounds(policy, attempt)
    d = backoff_delay(policy, attempt, rng=lambda: r)
    assert low <= d <= high + 1e-12
    assert low == min(0.05 * 2 ** (attempt - 1), 0.5)


def test_last_attempt_is_max_retries_plus_one() -> None:
    policy = RetryPolicy(max_retries=5)
    assert [is_last_attempt(policy, n) for n in range(1, 8)] == [False] * 5 + [True, True]
    assert is_last_attempt(RetryPolicy(max_retries=0), 1)


def test_retry_after_lengthens_but_never_shortens_the_delay() -> None:
    policy = RetryPolicy(base_s=2, jitter=0)
    assert retry_delay(policy, 1, retry_after=10) == 10
    assert retry_delay(policy, 1, retry_after=0.5) == 2
    assert retry_delay(policy, 1, retry_after=None) == 2


# Retry-After ----------------------------------------------------------------------


def test_retry_after_seconds_and_dates() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 7 ", now) == 7
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30)
    past = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(past, now) == 0
    assert parse_retry_after("99999999", now) == MAX_RETRY_AFTER_S


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e3", "Mon, 99 Foo"])
def test_retry_after_garbage_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value) is None


# Circuit breaker ----------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(threshold=3, open_s=10, clock=clock)
    assert not cb.record_failure()
    assert not cb.record_failure()
    cb.record_success()  # resets the count: failures must be consecutive
    assert cb.failures == 0
    assert not cb.record_failure()
    assert not cb.record_failure()
    assert cb.allow()
    assert cb.record_failure()  # the third in a row opens it
    assert cb.state is CircuitState.OPEN
    assert not cb.allow()
    assert cb.remaining() == pytest.approx(10)


def test_breaker_half_open_lets_exactly_one_probe() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(threshold=1, open_s=5, clock=clock)
    cb.record_failure()
    clock.advance(4.9)
    assert not cb.allow()
    clock.advance(0.2)
    assert cb.allow()  # the probe
    assert cb.state is CircuitState.HALF_OPEN
    assert [cb.allow() for _ in range(5)] == [False] * 5
    cb.record_success()
    assert cb.state is CircuitState.CLOSED
    assert all(cb.allow() for _ in range(5))


def test_failed_probe_reopens_for_a_new_period() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(threshold=2, open_s=5, clock=clock)
    cb.record_failure()
    cb.record_failure()
    clock.advance(5)
    assert cb.allow()
    assert cb.record_failure()
    assert cb.state is CircuitState.OPEN
    assert cb.remaining() == pytest.approx(5)
    assert not cb.allow()


def test_released_probe_goes_to_the_next_caller() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(threshold=1, open_s=1, clock=clock)
    cb.record_failure()
    clock.advance(1)
    assert cb.allow()
    assert not cb.allow()
    cb.release_probe()  # e.g. the message turned out not to be routed to this target
    assert cb.allow()
    assert not cb.allow()


def test_late_results_while_open_change_nothing() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(threshold=1, open_s=5, clock=clock)
    cb.record_failure()
    cb.record_success()  # an answer to a request sent before it opened
    assert cb.state is CircuitState.OPEN
    assert not cb.record_failure()
    assert cb.remaining() == pytest.approx(5)


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_s=0)


def test_gauge_values() -> None:
    assert [s.gauge for s in CircuitState] == [0, 2, 1]


# Rate limiter ---------------------------------------------------------------------


def test_rate_limiter_spaces_reservations_exactly() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=20, clock=clock)  # burst: 1 token
    waits = [rl.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.05, 0.10, 0.15, 0.20])
    clock.advance(0.20)  # debt paid off exactly
    assert rl.reserve() == pytest.approx(0.05)


def test_rate_limiter_long_run_rate_is_exact() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=1000, clock=clock)  # burst: 50 tokens
    last = 0.0
    for _ in range(10_000):
        last = rl.reserve()
    # 10 000 tokens at 1000/s with 50 saved up: the last may go at (10 000 - 50) / 1000 s.
    assert last == pytest.approx((10_000 - 50) / 1000)


def test_idle_bucket_refills_only_up_to_burst() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=10, burst=3, clock=clock)
    clock.advance(100)
    assert [rl.reserve() for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])


def test_try_take_takes_only_a_token_that_is_there_and_never_goes_into_debt() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=10, burst=2, clock=clock)
    assert [rl.try_take() for _ in range(3)] == [True, True, False]
    clock.advance(0.05)  # half a token: still none
    assert rl.try_take() is False
    clock.advance(0.06)  # 1.1 tokens
    assert rl.try_take() is True
    # No debt was taken by the refusals: 0.1 token left, 0.09 s to the next one.
    assert rl.reserve() == pytest.approx(0.09)


def test_set_rate_takes_effect() -> None:
    clock = FakeClock()
    rl = RateLimiter(rate=10, clock=clock)
    rl.reserve()
    rl.set_rate(5)
    assert rl.reserve() == pytest.approx(0.2)
    with pytest.raises(ValueError):
        rl.set_rate(0)
    with pytest.raises(ValueError):
        RateLimiter(rate=-1)


async def test_acquire_waits_for_its_slot() -> None:
    import time

    rl = RateLimiter(rate=50, burst=1)
    start = time.monotonic()
    for _ in range(6):
        await rl.acquire()
    assert time.monotonic() - start >= 5 / 50 - 0.005


class _Passing(Exception):
    pass


def _script(outcomes: list[BaseException | str]) -> tuple[list[float], object]:
    """An operation that raises or returns the next outcome each call, with a fake clock
    that the fake sleep advances."""
    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    async def op() -> str:
        got = outcomes.pop(0)
        if isinstance(got, BaseException):
            raise got
        return got

    return slept, (op, sleep, lambda: now[0])


async def test_retry_transient_tries_again_until_it_passes() -> None:
    slept, (op, sleep, clock) = _script([_Passing(), _Passing(), _Passing(), "ok"])  # type: ignore[misc]
    got = await retry_transient(
        op, lambda e: isinstance(e, _Passing), within_s=10, sleep=sleep, clock=clock
    )
    assert got == "ok"
    assert slept == [0.1, 0.2, 0.4]


async def test_retry_transient_raises_other_errors_at_once() -> None:
    slept, (op, sleep, clock) = _script([KeyError("x"), "ok"])  # type: ignore[misc]
    with pytest.raises(KeyError):
        await retry_transient(op, lambda e: isinstance(e, _Passing), sleep=sleep, clock=clock)
    assert slept == []


async def test_retry_transient_gives_up_past_its_time() -> None:
    slept, (op, sleep, clock) = _script([_Passing()] * 20)  # type: ignore[misc]
    with pytest.raises(_Passing):
        await retry_transient(
            op,
            lambda e: isinstance(e, _Passing),
            within_s=3,
            max_delay_s=1,
            sleep=sleep,
            clock=clock,
        )
    assert sum(slept) <= 3
    assert slept[:4] == [0.1, 0.2, 0.4, 0.8]
