"""The one way tests wait for something: poll a condition until it holds or time runs out."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, every: float = 0.2, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """``condition()`` again every ``every`` seconds until it is truthy or ``timeout`` seconds have passed; its last value.

    The caller asserts on what comes back, so a timeout fails where the reason is known.
    ``clock`` and ``sleep`` are injectable: a test of this helper runs in no time.
    """
    deadline = clock() + timeout
    while True:
        value = condition()
        if value or clock() >= deadline:
            return value
        sleep(every)


class FakeClock:
    """A clock a test moves by hand, and a ``sleep`` that moves it: waits and expiries without real time passing."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
