"""Seeing a job: a 2-worker, 1-server LeNet run through the launcher with everything on
(--metrics-dir, --tensorboard, --timeline) writes metrics whose step split adds up, event
files TensorBoard reads, a timeline of nested spans and a plot; a slowed worker is named."""

import importlib.util
import json
import os
import subprocess

import pytest

from disttrain.observe import jsonl
from tests.integration.conftest import PYTHON, ROOT, new_tag, wait_for_no_tagged

pytestmark = pytest.mark.slow

MNIST = [PYTHON, os.path.join(ROOT, "workers", "mnist.py"), "--model", "lenet", "--no-progress",
         "--limit-train", "3000"]
STEPS, EVERY = 30, 10
DEADLINE_S = 300.0


def observed_run(launch_run, directory, *worker_flags, launcher_flags=()):
    tag = new_tag()
    argv = [PYTHON, "-m", "launch", "-n", "2", "-s", "1", "--env", f"DISTTRAIN_TEST_TAG={tag}",
            "--timeline", str(directory / "timeline.json"), *launcher_flags, "--", *MNIST,
            "--max-steps", str(STEPS), "--metrics-dir", str(directory / "metrics"), *worker_flags]
    run = launch_run(argv, tag)
    assert run.finish(DEADLINE_S) == 0, run.stderr[-3000:]
    assert wait_for_no_tagged(tag) == []
    return run


@pytest.fixture(scope="module")
def all_on(tmp_path_factory):
    """One run with every observer on, shared by the checks below."""
    from tests.integration.conftest import LaunchRun
    directory = tmp_path_factory.mktemp("observed")
    tag = new_tag()
    argv = [PYTHON, "-m", "launch", "-n", "2", "-s", "1", "--env", f"DISTTRAIN_TEST_TAG={tag}",
            "--timeline", str(directory / "timeline.json"), "--", *MNIST,
            "--max-steps", str(STEPS), "--metrics-dir", str(directory / "metrics")]
    # Without the observe extra the flag refuses to start (tested in tests/workers); the
    # TensorBoard check below then skips and the other observers are still checked.
    if importlib.util.find_spec("tensorboardX") is not None:
        argv += ["--tensorboard", str(directory / "tb"), "--tensorboard-every", str(EVERY)]
    run = LaunchRun(argv, tag)
    try:
        assert run.finish(DEADLINE_S) == 0, run.stderr[-3000:]
    finally:
        run.kill()
    return directory, run


def step_records(directory, rank):
    return [r for r in jsonl.read(jsonl.worker_path(directory / "metrics", rank)) if "eval" not in r]


def test_each_steps_time_split_adds_up_to_its_measured_time(all_on):
    directory, _ = all_on
    for rank in (0, 1):
        records = step_records(directory, rank)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        for r in records:
            split = r["compute_s"] + r["push_s"] + r["pull_s"] + r["apply_s"]
            assert split == pytest.approx(r["step_s"], rel=0.05), r
            assert r["bytes_sent"] > 0 and r["bytes_received"] > 0, r
            assert r["loss"] > 0 and r["lr"] > 0 and 0 <= r["accuracy"] <= 1
        # The steps, measured inside DataParallel, cover the program's own clock between
        # its reports of the first and the last step.
        wall = records[-1]["time"] - records[0]["time"]
        assert sum(r["step_s"] for r in records[1:]) == pytest.approx(wall, rel=0.05)


def test_the_server_names_the_last_worker_of_every_clock_once(all_on):
    directory, _ = all_on
    lines = jsonl.read(jsonl.server_path(directory / "metrics", 0))
    clocks = [entry for line in lines for entry in line["last_at_clock"]]
    assert sorted(clock for clock, _, _ in clocks) == list(range(STEPS))
    assert {worker for _, worker, _ in clocks} <= {0, 1}
    assert sum(line["messages_in"] for line in lines) >= 2 * STEPS
    assert all(line["bytes_in"] > 0 and line["update_s"] for line in lines)


def test_tensorboard_reads_one_point_per_window_of_steps(all_on):
    pytest.importorskip("tensorboardX")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    directory, _ = all_on
    runs = os.listdir(directory / "tb")
    assert len(runs) == 1 and runs[0].startswith("mnist-"), runs   # one run directory per job
    accumulator = event_accumulator.EventAccumulator(str(directory / "tb" / runs[0]))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    for tag in ("train/loss", "train/accuracy", "train/lr", "throughput/samples_per_s",
                "time/step_s", "time/compute_s", "time/push_s", "time/pull_s", "time/apply_s"):
        assert [event.step for event in accumulator.Scalars(tag)] == \
            list(range(EVERY, STEPS + 1, EVERY)), tag
    assert len(accumulator.Scalars("eval/test_accuracy")) == 1
    assert accumulator.Scalars("server0/bytes_in_per_s"), tags


def spans_nest(spans):
    """True if no two spans of one track overlap without one containing the other."""
    open_ends = []
    for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
        while open_ends and open_ends[-1] <= start:
            open_ends.pop()
        if open_ends and end > open_ends[-1]:
            return False
        open_ends.append(end)
    return True


def timeline_tracks(path):
    """{pid: process name} of a timeline file."""
    trace = json.loads(path.read_text())
    return {event["pid"]: event["args"]["name"] for event in trace["traceEvents"]
            if event["ph"] == "M" and event["name"] == "process_name"}


def test_the_timeline_has_one_track_per_process_and_nested_spans(all_on):
    directory, run = all_on
    trace = json.loads((directory / "timeline.json").read_text())
    names = timeline_tracks(directory / "timeline.json")
    assert sorted(names.values()) == ["server 0", "worker 0", "worker 1"]
    for pid, name in names.items():
        spans = [event for event in trace["traceEvents"] if event["pid"] == pid and event["ph"] == "X"]
        # (times have 0.1 us resolution: ends are rounded to it)
        assert spans_nest([(s["ts"], round(s["ts"] + s["dur"], 1)) for s in spans]), name
        counts = {label: sum(s["name"] == label for s in spans) for label in {s["name"] for s in spans}}
        if name.startswith("worker"):
            assert counts["step"] == counts["compute"] == STEPS, counts
            assert counts["pull wait"] >= STEPS and counts["push"] >= STEPS, counts
        else:
            assert counts["update"] >= 2 * STEPS, counts
    assert "timeline written to" in run.stderr


def test_the_plot_command_writes_a_png(all_on, tmp_path):
    pytest.importorskip("matplotlib")
    directory, _ = all_on
    output = tmp_path / "run.png"
    result = subprocess.run([PYTHON, "-m", "disttrain.plot", str(directory / "metrics"), "-o", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = output.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"matplotlib" in data.lower()


def test_a_slowed_worker_is_named_last_in_most_clocks(launch_run, tmp_path):
    run = observed_run(launch_run, tmp_path, "--slow-ms", "60", "--slow-rank", "1")
    report = [line for line in run.stderr.splitlines() if line.startswith("launch:   worker")]
    assert len(report) == 2, run.stderr[-2000:]
    assert "<- straggler" in report[1] and "<- straggler" not in report[0], report
    share = int(report[1].split("last at ")[1].split("%")[0])
    assert share > 80, report
    lines = jsonl.read(jsonl.server_path(tmp_path / "metrics", 0))
    lasts = [worker for line in lines for _, worker, _ in line["last_at_clock"]]
    assert len(lasts) == STEPS and lasts.count(1) > 0.8 * STEPS, lasts
