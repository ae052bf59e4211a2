"""End to end: the launcher runs the real parameter server and workers/mnist.py, on one
machine and across three network-namespace hosts, and training reaches its accuracy."""

import json
import os

import pytest

from tests.integration.conftest import PYTHON, ROOT, new_tag, wait_for_no_tagged

pytestmark = pytest.mark.slow

MNIST = [PYTHON, os.path.join(ROOT, "workers", "mnist.py"), "--no-progress"]
TRAINING_DEADLINE_S = 300.0  # a full epoch on 2 shared cores; the launcher itself never waits


def summary_of_rank_0(stdout):
    """The JSON summary: rank 0's last stdout line, through its prefix."""
    lines = [line for line in stdout.splitlines() if line.startswith("[worker 0] ")]
    assert lines, f"worker 0 printed nothing:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("[worker 0] "):])


def real_ps_argv(tag, *options, command):
    return [PYTHON, "-m", "launch", "--env", f"DISTTRAIN_TEST_TAG={tag}", *options, "--", *command]


@pytest.mark.parametrize("servers", [1, 2])
def test_two_workers_reach_97_percent_in_one_epoch(launch_run, tmp_path, servers):
    tag = new_tag()
    metrics = tmp_path / "metrics.json"
    run = launch_run(real_ps_argv(tag, "-n", "2", "-s", str(servers),
                                  command=MNIST + ["--epochs", "1", "--metrics", str(metrics)]), tag)
    assert run.finish(TRAINING_DEADLINE_S) == 0, run.stderr[-3000:]
    summary = summary_of_rank_0(run.stdout)
    assert (summary["workers"], summary["servers"]) == (2, servers)
    assert summary["test_accuracy"] >= 0.97, summary
    assert json.loads(metrics.read_text()) == summary
    assert f"scheduler 0; servers {' '.join(['0'] * servers)}; workers 0 0" in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_multihost_training_matches_the_same_run_on_one_host(namespace_hosts, launch_run):
    """Sync mode makes the result independent of where the processes run: the same
    seed and data give the same model whether workers share a host or not."""
    small = ["--epochs", "1", "--limit-train", "3000", "--seed", "1"]
    tag = new_tag()
    local = launch_run(real_ps_argv(tag, "-n", "2", "-s", "1", command=MNIST + small), tag)
    assert local.finish(TRAINING_DEADLINE_S) == 0, local.stderr[-3000:]
    tag = new_tag()
    remote = launch_run(real_ps_argv(tag, "-n", "2", "-s", "1", "-H", namespace_hosts.host_list([0, 1, 1]),
                                     "--remote-cmd", "ip netns exec {host}", command=MNIST + small), tag)
    assert remote.finish(TRAINING_DEADLINE_S) == 0, remote.stderr[-3000:]
    here, there = summary_of_rank_0(local.stdout), summary_of_rank_0(remote.stdout)
    assert there["workers"] == 2
    assert abs(there["test_accuracy"] - here["test_accuracy"]) <= 0.002, (here, there)
    assert there["train_loss"] == pytest.approx(here["train_loss"], rel=1e-3)
    assert there["test_accuracy"] > 0.8  # 3000 examples are enough to learn, not to excel
    assert wait_for_no_tagged(tag) == []
