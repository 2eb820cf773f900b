"""The tests' one poll loop, on a fake clock: no real time passes."""

from __future__ import annotations

from waiting import FakeClock, wait_until


def test_wait_until_returns_the_first_truthy_value_and_polls_at_its_pace():
    clock, calls = FakeClock(), []

    def ready():
        calls.append(clock.now)
        return "ready" if clock.now >= 1.0 else None

    assert wait_until(ready, timeout=5, every=0.5, clock=clock, sleep=clock.sleep) == "ready"
    assert calls == [0.0, 0.5, 1.0]


def test_wait_until_gives_up_at_the_deadline_with_the_last_value():
    clock, calls = FakeClock(), []

    def never():
        calls.append(clock.now)
        return []

    assert wait_until(never, timeout=2, every=0.5, clock=clock, sleep=clock.sleep) == []
    assert calls == [0.0, 0.5, 1.0, 1.5, 2.0]
