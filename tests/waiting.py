"""Waiting in tests: poll a condition until it holds or a deadline passes, never a bare sleep."""
import time

POLL_S = 0.05


def wait_until(condition, deadline_s, what=None):
    """condition()'s first truthy value, polled every POLL_S seconds. Past `deadline_s`, an
    AssertionError saying what was awaited (`what`: text, or a callable that makes it when
    needed); with what=None the last falsy value is returned instead, for a caller that
    reports the failure itself."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value or time.monotonic() >= end:
            break
        time.sleep(POLL_S)
    if value or what is None:
        return value
    raise AssertionError(f"not within {deadline_s:g} s: {what() if callable(what) else what}")
