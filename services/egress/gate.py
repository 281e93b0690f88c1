"""The circuit's side of a target's worker (mixed into ``TargetWorker``): waiting for
clearance to send, the loop that moves the shared circuit on, and pausing or resuming
the target's consumer while the circuit is open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mesh.resilience import CircuitState, RateLimiter

if TYPE_CHECKING:
    from mesh.client import MeshClient
    from services.egress.circuit import SharedCircuit

WAKE_S = 1.0  # safety net for every wait on a state change


def rfc3339_epoch(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class CircuitGate:
    """Clearance and the circuit loop; the state it uses belongs to ``TargetWorker``."""

    client: MeshClient
    circuit: SharedCircuit
    limiter: RateLimiter | None
    log: Any
    stream: str
    consumer: str

    async def _clearance(self) -> bool:
        """Wait until the circuit lets this message go; True when it is the probe."""
        while True:
            changed = self.circuit.changed()
            if self.circuit.state is CircuitState.CLOSED:
                probe = False
            elif self.circuit.try_probe():
                probe = True
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WAKE_S * 5):
                        await changed.wait()
                continue
            if self.limiter is not None:
                try:
                    await self.limiter.acquire()
                except asyncio.CancelledError:
                    if probe:
                        self.circuit.release_probe()
                    raise
            if probe:
                if self.circuit.lease_ok():
                    return True
                self.circuit.release_probe()
            elif self.circuit.state is CircuitState.CLOSED:
                return False

    def _still_clear(self, probe: bool) -> bool:
        if probe:
            return self.circuit.lease_ok()
        return self.circuit.state is CircuitState.CLOSED

    async def _circuit_loop(self) -> None:
        while True:
            changed = self.circuit.changed()
            deadline = self.circuit.next_deadline()
            timeout = 30.0 if deadline is None else max(0.0, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
            try:
                await self.circuit.tick()
            except Exception as exc:
                self.log.warning("circuit tick failed", error=str(exc) or repr(exc))
                await asyncio.sleep(1.0)

    async def _pause(self, until: float) -> None:
        try:
            await self.client.port.pause_consumer(self.stream, self.consumer, rfc3339_epoch(until))
        except Exception as exc:
            self.log.warning("could not pause the consumer", error=str(exc) or repr(exc))

    async def _resume(self) -> None:
        try:
            await self.client.port.resume_consumer(self.stream, self.consumer)
        except Exception as exc:
            self.log.warning("could not resume the consumer", error=str(exc) or repr(exc))
