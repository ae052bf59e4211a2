"""A worker's step split: the phases are measured apart and together make up the step."""
import statistics
from types import SimpleNamespace

import pytest

from disttrain.observe import channel, steps
from disttrain.observe.steps import StepTimer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_phases_of_a_step_add_up_to_it_and_replies_written_in_a_wait_count_as_apply(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(steps.time, "perf_counter", clock)
    traffic = SimpleNamespace(bytes_sent=0, bytes_received=0)
    timer = StepTimer(traffic=traffic)
    timer.restart()                                  # t = 0: the step starts
    timer.add("push", 1.0, 2.0)                      # a bucket sent from backward's hook
    clock.now = 5.0
    timer.step_entered()
    reply = SimpleNamespace(applied=[(7.0, 8.0)])    # its callback wrote weights 7..8
    timer.waited(5.0, 9.0, [reply])
    timer.add("apply", 9.0, 9.5)
    traffic.bytes_sent, traffic.bytes_received = 400, 300
    clock.now = 9.5
    timer.step_done()
    assert timer.last == {"compute_s": 4.0, "push_s": 1.0, "pull_s": 3.0, "apply_s": 1.5,
                          "step_s": 9.5, "bytes_sent": 400, "bytes_received": 300}
    # The next step starts where this one ended and counts only its own bytes.
    traffic.bytes_sent = 500
    clock.now = 10.0
    timer.step_entered()
    timer.step_done()
    assert timer.last == {"compute_s": 0.5, "push_s": 0.0, "pull_s": 0.0, "apply_s": 0.0,
                          "step_s": 0.5, "bytes_sent": 100, "bytes_received": 0}


def test_the_end_of_run_report_gives_the_median_step(monkeypatch, capfd):
    clock = FakeClock()
    monkeypatch.setattr(steps.time, "perf_counter", clock)
    timer = StepTimer(rank=1, report=True)
    durations = [0.010, 0.030, 0.012, 0.011]
    for duration in durations:
        clock.now += duration
        timer.step_done()
    timer.close()
    [line] = capfd.readouterr().err.encode().splitlines()
    report = channel.parse(line)
    assert report["role"] == "worker" and report["rank"] == 1 and report["steps"] == 4
    assert report["median_step_s"] == pytest.approx(statistics.median(durations))
