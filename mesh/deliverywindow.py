"""``DeliveryWindow``: delivery-attempt records over a sliding window: success rate,
throughput and the last failures per target."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mesh.logs import scrub_text

DELIVERED = "delivered"
FAILED_OUTCOMES = frozenset({"retry", "dead", "disabled", "circuit_open"})
MAX_ERROR_CHARS = 200


@dataclass
class _Bucket:
    second: int
    delivered: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass
class _TargetWindow:
    buckets: deque[_Bucket] = field(default_factory=deque)
    last_delivered_at: str | None = None
    last_failed_at: str | None = None


class DeliveryWindow:
    """Delivery attempts per target over the last ``window_s`` seconds, in 1 s buckets.

    Success rate = delivered / (delivered + failed attempts); skipped events
    (loops, hop limit, filters) are not attempts and count for neither.
    Throughput is deliveries per second over the last ``rate_window_s``.
    """

    def __init__(
        self,
        window_s: float = 300.0,
        *,
        rate_window_s: float = 10.0,
        max_failures: int = 50,
        max_targets: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.max_targets = max_targets
        self.clock = clock
        self._targets: dict[str, _TargetWindow] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=max_failures)
        # Skipped events (filters, loops, hop limit) with their reason: "why didn't my
        # endpoint get this?" answered on the dashboard.
        self.skips: deque[dict[str, Any]] = deque(maxlen=max_failures)

    def observe(
        self,
        target: str,
        outcome: str,
        *,
        event_id: str = "",
        attempt: int = 0,
        status_code: int | None = None,
        error: str | None = None,
        at: str | None = None,
    ) -> None:
        tw = self._targets.get(target)
        if tw is None:
            if len(self._targets) >= self.max_targets:
                return
            tw = self._targets[target] = _TargetWindow()
        second = int(self.clock())
        if not tw.buckets or tw.buckets[-1].second != second:
            tw.buckets.append(_Bucket(second))
        bucket = tw.buckets[-1]
        at = at or datetime.now(UTC).isoformat()
        if outcome == DELIVERED:
            bucket.delivered += 1
            tw.last_delivered_at = at
        elif outcome in FAILED_OUTCOMES:
            bucket.failed += 1
            tw.last_failed_at = at
            self.failures.append(
                {
                    "at": at,
                    "target": target,
                    "event_id": event_id,
                    "attempt": attempt,
                    "outcome": outcome,
                    "status_code": status_code,
                    # Bounded and scrubbed: a receiver's error text is not ours to vouch for.
                    "error": scrub_text(error or "")[:MAX_ERROR_CHARS] or None,
                }
            )
        else:
            bucket.skipped += 1
            self.skips.append(
                {
                    "at": at,
                    "target": target,
                    "event_id": event_id,
                    "reason": (error or "")[:MAX_ERROR_CHARS] or None,
                }
            )
        self._trim(tw, second)

    def _trim(self, tw: _TargetWindow, now_second: int) -> None:
        horizon = now_second - self.window_s
        while tw.buckets and tw.buckets[0].second <= horizon:
            tw.buckets.popleft()

    def targets(self) -> list[str]:
        return sorted(self._targets)

    def summary(self, target: str | None = None) -> dict[str, Any]:
        """Counts, success rate and throughput for one target (or all of them)."""
        now_second = int(self.clock())
        names = [target] if target is not None else list(self._targets)
        delivered = failed = skipped = recent = 0
        last_ok: str | None = None
        last_bad: str | None = None
        for name in names:
            tw = self._targets.get(name)
            if tw is None:
                continue
            self._trim(tw, now_second)
            for b in tw.buckets:
                delivered += b.delivered
                failed += b.failed
                skipped += b.skipped
                # The current second is still filling: the rate covers the last full seconds.
                if now_second - self.rate_window_s <= b.second < now_second:
                    recent += b.delivered
            last_ok = max(filter(None, (last_ok, tw.last_delivered_at)), default=None)
            last_bad = max(filter(None, (last_bad, tw.last_failed_at)), default=None)
        attempts = delivered + failed
        return {
            "window_s": self.window_s,
            "delivered": delivered,
            "failed": failed,
            "skipped": skipped,
            "attempts": attempts,
            "success_rate": round(delivered / attempts, 4) if attempts else None,
            "delivered_per_s": round(recent / self.rate_window_s, 3),
            "last_delivered_at": last_ok,
            "last_failed_at": last_bad,
        }

    def recent_failures(self, limit: int = 20, target: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        rows = [f for f in reversed(self.failures) if target is None or f["target"] == target]
        return rows[:limit]

    def recent_skips(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first."""
        return list(reversed(self.skips))[:limit]


def monotonic_ms() -> float:
    return time.monotonic() * 1000
