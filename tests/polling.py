"""``wait_for`` / ``wait_for_async``: poll a condition until it holds or time runs out (shared
by the tests; the async one sleeps on the event loop, so tasks it waits on keep running)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """``predicate()``'s first truthy value within ``timeout_s``, else its value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


async def wait_for_async(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """``wait_for`` inside a coroutine: sleeps with ``asyncio.sleep`` between checks."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(interval_s)
    return predicate()
