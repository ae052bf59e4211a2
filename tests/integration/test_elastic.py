"""Elastic membership end to end (launch -n MIN:MAX): real scheduler, server and workers on
127.0.0.1. A worker leaves on SIGTERM mid-run, a third joins when the discovery script
offers a slot, and the job falls below MIN: each time the servers average every clock over
the workers present, and every sample of every epoch is trained on exactly once."""

import collections
import json
import os
import signal
import sys

import pytest

from tests.integration.conftest import PROGRAMS, PYTHON, new_tag, wait_for_no_tagged
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

PS_COMMAND = f"{PYTHON} -m disttrain.ps"
ELASTIC_WORKER = [PYTHON, os.path.join(PROGRAMS, "elastic_worker.py")]
SAMPLES = 48   # divisible by 2 x 2 and 3 x 2 (workers x batch): epochs split evenly


class Hosts:
    """The --host-discovery-script and the slots it prints, which the test changes."""

    def __init__(self, tmp_path, slots):
        self.slots_file = tmp_path / "slots"
        self.script = tmp_path / "discover.sh"
        self.script.write_text(f"#!/bin/sh\ncat {self.slots_file}\n")
        self.script.chmod(0o755)
        self.set(slots)

    def set(self, slots):
        temporary = self.slots_file.with_suffix(".new")
        temporary.write_text(f"localhost:{slots}\n")
        temporary.replace(self.slots_file)   # the launcher never reads half a file


def elastic_argv(workers, hosts, logs, tag, *options, epochs=4):
    logs.mkdir(exist_ok=True)
    return [PYTHON, "-m", "launch", "-n", workers, "-s", "1", "--ps-command", PS_COMMAND,
            "--host-discovery-script", str(hosts.script), "--grace", "3",
            "--env", f"DISTTRAIN_TEST_TAG={tag}", "--env", "DISTTRAIN_HEARTBEAT_TIMEOUT=3",
            *options, "--", *ELASTIC_WORKER, "--log-dir", str(logs), "--epochs", str(epochs),
            "--samples", str(SAMPLES), "--step-sleep", "0.05"]


def steps(logs):
    """Every step every worker process logged: {"rank", "pid", "step", "epoch", "samples",
    "workers"} each."""
    found = []
    for path in logs.glob("worker-*.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def samples_by_epoch(logs):
    seen = collections.defaultdict(list)
    for step in steps(logs):
        seen[step["epoch"]] += step["samples"]
    return {epoch: sorted(samples) for epoch, samples in seen.items()}


def assert_every_sample_once_per_epoch(logs, epochs):
    seen = samples_by_epoch(logs)
    assert sorted(seen) == list(range(epochs))
    for epoch, samples in seen.items():
        assert samples == list(range(SAMPLES)), f"epoch {epoch}: {samples}"


def pid_of(logs, rank):
    found = [step["pid"] for step in steps(logs) if step["rank"] == rank]
    return found[0] if found else None


def test_a_worker_that_gets_sigterm_leaves_after_its_step_and_the_job_ends_with_every_sample_once(
        launch_run, tmp_path):
    tag, logs, hosts = new_tag(), tmp_path / "logs", Hosts(tmp_path, 2)
    run = launch_run(elastic_argv("1:2", hosts, logs, tag), tag)
    wait_until(lambda: sum(s["rank"] == 1 for s in steps(logs)) >= 3, 60,
               lambda: f"worker 1 to train 3 steps: {run.popen.poll()}")
    hosts.set(1)   # no slot for a new worker once it left
    os.kill(pid_of(logs, 1), signal.SIGTERM)
    assert run.finish() == 0, run.stderr
    assert "launch: worker 1 left on host localhost; its rank is free\n" in run.stderr
    assert "worker 1 got SIGTERM: it leaves the job after its step" in run.stderr
    assert "joined on host" not in run.stderr
    assert_every_sample_once_per_epoch(logs, 4)
    last_of_1 = max(s["step"] for s in steps(logs) if s["rank"] == 1)
    after = [s for s in steps(logs) if s["step"] > last_of_1]
    assert after and all(s["rank"] == 0 and s["workers"] == 1 for s in after)
    # Each clock was averaged over the workers present at it: applied = sum of those.
    assert "every chunk applied the present workers x its clocks" in run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1].split("] ", 1)[1])["changes"] == [[2, 1]]
    assert wait_for_no_tagged(tag) == []


def test_a_worker_started_on_a_new_slot_joins_and_every_sample_is_still_seen_once(
        launch_run, tmp_path):
    tag, logs, hosts = new_tag(), tmp_path / "logs", Hosts(tmp_path, 2)
    run = launch_run(elastic_argv("2:3", hosts, logs, tag, epochs=6), tag)
    wait_until(lambda: len(steps(logs)) >= 4, 60, "the first two workers to train")
    hosts.set(3)
    assert run.finish() == 0, run.stderr
    assert "launch: worker 2 joined on host localhost\n" in run.stderr
    assert_every_sample_once_per_epoch(logs, 6)
    joined = [s for s in steps(logs) if s["rank"] == 2]
    assert joined, run.stderr
    first = min(s["step"] for s in joined)
    assert all(s["workers"] == 3 for s in steps(logs) if s["step"] >= first)
    assert all(s["workers"] == 2 for s in steps(logs) if s["step"] < first)
    assert "every chunk applied the present workers x its clocks" in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_below_min_workers_the_job_waits_the_restart_timeout_then_fails_naming_the_cause(
        launch_run, tmp_path):
    tag, logs, hosts = new_tag(), tmp_path / "logs", Hosts(tmp_path, 2)
    run = launch_run(elastic_argv("2:2", hosts, logs, tag, "--restart-timeout", "2",
                                  epochs=1000), tag)
    wait_until(lambda: pid_of(logs, 1), 60, "worker 1 to train")
    hosts.set(1)
    os.kill(pid_of(logs, 1), signal.SIGTERM)
    assert run.finish() == 1, run.stderr
    assert "launch: 1 worker(s) in the job, below the minimum of 2; waiting up to 2 s" in run.stderr
    assert ("launch: 1 worker(s) in the job, below the minimum of 2 (-n 2:2), and no worker "
            "came back within 2 s (--restart-timeout)\n") in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_below_min_workers_the_others_pause_until_a_worker_comes_back_and_no_sample_is_lost(
        launch_run, tmp_path):
    tag, logs, hosts = new_tag(), tmp_path / "logs", Hosts(tmp_path, 2)
    run = launch_run(elastic_argv("2:2", hosts, logs, tag, epochs=3), tag)
    wait_until(lambda: sum(s["rank"] == 1 for s in steps(logs)) >= 3, 60, "worker 1 to train")
    hosts.set(1)
    leaver = pid_of(logs, 1)
    os.kill(leaver, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(f"/proc/{leaver}") or
               open(f"/proc/{leaver}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
               60, "the leaver to exit")
    hosts.set(2)   # a slot again: a new worker 1 starts and joins
    assert run.finish() == 0, run.stderr
    assert "launch: 1 worker(s) in the job, below the minimum of 2; waiting up to" in run.stderr
    assert "worker 0: 1 worker(s) in the job, below the minimum of 2; waiting" in run.stderr
    assert "launch: worker 1 joined on host localhost\n" in run.stderr
    # Worker 0 paused until the new worker 1 registered; alone it trained only the steps
    # that let it in: the one whose pushes mark the join, and at most one more to reach a
    # step from which the rest of the epoch splits evenly over 2 (positions move by 2 alone).
    assert 1 <= sum(s["workers"] == 1 for s in steps(logs)) <= 2
    assert len({s["pid"] for s in steps(logs) if s["rank"] == 1}) == 2
    assert_every_sample_once_per_epoch(logs, 3)
    assert wait_for_no_tagged(tag) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
