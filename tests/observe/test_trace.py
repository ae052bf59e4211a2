"""Trace events: the clock offset to the scheduler, and batches whose spans keep their nesting."""
import pytest

from disttrain.observe import channel
from disttrain.observe.trace import ClockOffset, Tracer


def test_clock_offset_keeps_the_exchange_with_the_shortest_round_trip():
    clock = ClockOffset()
    # The scheduler is 5 s ahead; the reply of the first exchange was delayed on its way back.
    clock.sample(sent=100.0, received=100.4, remote=105.05)
    assert clock() == pytest.approx(4.85)
    clock.sample(sent=101.0, received=101.02, remote=106.01)
    assert clock() == pytest.approx(5.0)
    clock.sample(sent=102.0, received=102.3, remote=107.0)   # a worse one changes nothing
    assert clock() == pytest.approx(5.0)
    clock.sample(sent=103.0, received=102.9, remote=108.0)   # time ran backwards: ignored
    assert clock() == pytest.approx(5.0) and clock.round_trip == pytest.approx(0.02)


def sent_batches(capfd):
    return [channel.parse(line) for line in capfd.readouterr().err.encode().splitlines()]


def test_a_batch_carries_spans_relative_to_one_origin_on_the_schedulers_clock(capfd):
    tracer = Tracer(clock=lambda: 2.5)
    origin = tracer.origin
    tracer.span("step", origin + 0.5, origin + 0.510)
    tracer.span("push", origin + 0.502, origin + 0.503, {"bucket": 0})
    tracer.instant("last: worker 1", origin + 0.511)
    tracer.flush()
    [batch] = sent_batches(capfd)
    assert batch["kind"] == "trace"
    assert batch["base"] == pytest.approx(tracer.origin_wall + 2.5)
    assert batch["events"] == [["step", 5e5, 5.1e5, None], ["push", 5.02e5, 5.03e5, {"bucket": 0}],
                               ["last: worker 1", 5.11e5, None, None]]
    tracer.flush()
    assert sent_batches(capfd) == []   # nothing new, nothing sent


def test_a_span_ending_after_the_flush_time_sends_the_batch(capfd):
    tracer = Tracer()
    tracer.span("compute", tracer.origin, tracer.origin + 0.001)
    assert sent_batches(capfd) == []
    tracer.span("compute", tracer.next_flush, tracer.next_flush + 0.001)
    [batch] = sent_batches(capfd)
    assert len(batch["events"]) == 2 and tracer.events == []
