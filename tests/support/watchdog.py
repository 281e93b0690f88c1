"""Say where a hung async test is waiting, before pytest-timeout kills it.

pytest-timeout's report shows the event loop's ``select()``, which says nothing
about which ``await`` never returned. A timer thread fires a few seconds before
the timeout and prints every suspended coroutine and async generator of this
project (the chain each one awaits), so the failure report holds the culprit.
"""

from __future__ import annotations

import gc
import sys
import threading
import types
from typing import Any, TextIO

OURS = ("/mesh/", "/services/", "/tests/", "/bench/")


def _frames(obj: Any) -> list[types.FrameType]:
    """The frames of ``obj`` and of what it awaits, outermost first."""
    out: list[types.FrameType] = []
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        seen.add(id(obj))
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        frame = frame or getattr(obj, "gi_frame", None)
        if frame is not None:
            out.append(frame)
        obj = (
            getattr(obj, "cr_await", None)
            or getattr(obj, "ag_await", None)
            or getattr(obj, "gi_yieldfrom", None)
        )
    return out


def dump_suspended(file: TextIO = sys.stderr) -> None:
    """Print each suspended coroutine / async generator chain that runs our code."""
    chains = [
        _frames(obj)
        for obj in gc.get_objects()
        if isinstance(obj, types.CoroutineType | types.AsyncGeneratorType)
    ]
    # A chain awaited by another one is already printed as part of it.
    inner = {id(f) for frames in chains for f in frames[1:]}
    shown = 0
    for frames in chains:
        if not frames or id(frames[0]) in inner:
            continue
        lines = [
            f"  {'/'.join(f.f_code.co_filename.rsplit('/', 2)[-2:])}:{f.f_lineno}"
            f" {f.f_code.co_qualname}"
            for f in frames
            if any(part in f.f_code.co_filename for part in OURS)
        ]
        if lines:
            shown += 1
            print("\n".join([*lines, "  --"]), file=file)
    print(f"=== watchdog: {shown} suspended chains in our code (above) ===", file=file)
    file.flush()


def start(seconds: float) -> threading.Timer:
    """A daemon timer that dumps the suspended chains after ``seconds``; cancel it when done."""
    timer = threading.Timer(seconds, dump_suspended)
    timer.daemon = True
    timer.start()
    return timer
