"""Survive failures (issue 13): a process of a running job is killed and replaced, and the
job ends as an unbroken one would. One section per recovery; each keeps its fixtures."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.waiting import wait_until

pytestmark = pytest.mark.slow


# --- server recovery -----------------------------------------------------------------------
# A seeded 2-worker, 2-server sync MNIST MLP job started by the test itself (scheduler,
# servers and workers as processes on 127.0.0.1, CURVE keys as launched jobs have them);
# one server is killed with SIGKILL mid-run and a replacement started with the same rank
# and keys (DISTTRAIN_INCARNATION=1), as `launch --max-restarts` does.
from tests.ps.cluster import ROOT, Cluster   # noqa: E402 (the section's own helpers)

SERVER_JOB_S = 240   # the whole job on 2 busy cores; it normally takes a few seconds
MNIST = os.path.join(ROOT, "workers", "mnist.py")


class RecoveryCluster(Cluster):
    """tests.ps.cluster.Cluster with recovery on, and one process restartable."""

    def __init__(self, directory, replicas, servers=2):
        super().__init__(directory, 2, servers, heartbeat_timeout=2, timeout=60)
        self.env.update(DISTTRAIN_RESTART_TIMEOUT="30", DISTTRAIN_SERVER_REPLICAS=str(replicas),
                        DISTTRAIN_PROGRESS="0")

    def restart_server(self, rank):
        """Kill server `rank` with SIGKILL and start its replacement (incarnation 1)."""
        killed = self.processes[f"server{rank}"]
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        env = dict(self.env, DISTTRAIN_ROLE="server", DISTTRAIN_RANK=str(rank),
                   DISTTRAIN_INCARNATION="1")
        name = f"server{rank}-restarted"
        with open(os.path.join(self.directory, f"{name}.err"), "w") as err:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "disttrain.ps"], env=env, stdout=subprocess.DEVNULL,
                stderr=err, cwd=ROOT, start_new_session=True)


def mnist_job(directory, replicas, kill_server_after=None, killed=1, extra=(), servers=2):
    """Run the job; with kill_server_after=k, server `killed` dies once rank 0 logged k steps.
    Returns (exit codes, rank 0's summary, rank 0's per-step losses, the cluster)."""
    cluster = RecoveryCluster(directory, replicas, servers)
    losses = os.path.join(cluster.directory, "losses.txt")
    try:
        cluster.start_roles()
        # A straggler keeps the job long enough to be killed in the middle of it.
        cluster.start_workers(program=[
            MNIST, "--no-progress", "--seed", "3", "--limit-train", "4096", "--epochs", "1",
            "--batch-size", "64", "--max-steps", "24", "--loss-log", losses,
            "--slow-ms", "60", "--slow-rank", "1",
            "--metrics", os.path.join(cluster.directory, "summary.json"), *extra])
        if kill_server_after is not None:
            def steps_logged():
                return os.path.exists(losses) and \
                    len(open(losses).read().splitlines()) >= kill_server_after
            wait_until(steps_logged, SERVER_JOB_S, lambda: cluster.read("worker0"))
            cluster.restart_server(killed)
        codes = cluster.wait(SERVER_JOB_S)
    finally:
        cluster.kill_all()
    with open(losses) as f:
        steps = f.read().splitlines()
    summary_file = os.path.join(cluster.directory, "summary.json")
    summary = json.load(open(summary_file)) if os.path.exists(summary_file) else None
    return codes, summary, steps, cluster


# With 2 servers each keeps the other's replica; with 3, server 1's replica is on server 2
# and server 0 re-seeds its own replica on server 1's replacement.
@pytest.mark.parametrize("servers,killed", [(2, 0), (2, 1), (3, 1)])
def test_a_killed_server_with_a_replica_comes_back_and_the_job_ends_as_an_unbroken_one(
        tmp_path, servers, killed):
    codes, summary, steps, _ = mnist_job(tmp_path / "unbroken", replicas=1, servers=servers)
    assert set(codes.values()) == {0}, codes
    got_codes, got_summary, got_steps, cluster = mnist_job(
        tmp_path / "broken", replicas=1, kill_server_after=8, killed=killed, servers=servers)
    successor, predecessor = (killed + 1) % servers, (killed - 1) % servers
    restarted = cluster.read(f"server{killed}-restarted")
    assert got_codes.pop(f"server{killed}") == -signal.SIGKILL
    assert set(got_codes.values()) == {0}, (got_codes, restarted[-2000:],
                                           cluster.read("worker0")[-2000:])
    assert f"exactly from the replica on server {successor}" in restarted, restarted
    assert f"server {killed} was restarted; sending it the replica" in \
        cluster.read(f"server{predecessor}")
    # Every step's loss and the final test accuracy are those of the unbroken run: the
    # replacement continued from exactly the weights and Adam moments the dead server had.
    assert len(steps) == 24 and got_steps == steps
    assert (got_summary["test_accuracy"], got_summary["train_loss"]) == \
        (summary["test_accuracy"], summary["train_loss"])


def test_a_killed_server_without_a_replica_gets_the_workers_weights_and_checkpointed_state(
        tmp_path):
    checkpoints = ["--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-every", "4"]
    codes, summary, steps, _ = mnist_job(tmp_path / "unbroken", replicas=0)
    assert set(codes.values()) == {0}, codes
    got_codes, got_summary, got_steps, cluster = mnist_job(
        tmp_path / "broken", replicas=0, kill_server_after=10, extra=checkpoints)
    restarted = cluster.read("server1-restarted")
    assert got_codes.pop("server1") == -signal.SIGKILL
    assert set(got_codes.values()) == {0}, (got_codes, restarted[-2000:],
                                           cluster.read("worker0")[-2000:])
    rolled_back = [line for line in restarted.splitlines() if "rolled back to checkpoint" in line]
    assert rolled_back, restarted
    step_dir, step = rolled_back[0].split("rolled back to checkpoint ")[1].split(" (step ")
    step = int(step.split(")")[0])
    # The newest checkpoint when server 1 died: written every 4 steps, the kill after 10.
    assert os.path.dirname(step_dir) == str(tmp_path / "checkpoints")
    assert os.path.basename(step_dir) == f"step-{step:06d}" and step % 4 == 0 and step >= 8
    # Up to the kill, the run is the unbroken one; after it only the Adam moments of one
    # server's keys are older, so training goes on to about the same accuracy.
    assert len(got_steps) == 24 and got_steps[:10] == steps[:10]
    assert abs(got_summary["test_accuracy"] - summary["test_accuracy"]) < 0.05, \
        (got_summary, summary)


WORD2VEC = os.path.join(ROOT, "workers", "word2vec.py")


def clocks_completed(metrics_file):
    """The newest clock a server's metrics lines say all workers completed, or -1."""
    if not os.path.exists(metrics_file):
        return -1
    clocks = [clock for line in open(metrics_file).read().splitlines() if line.endswith("}")
              for clock, _, _ in json.loads(line)["last_at_clock"]]
    return max(clocks, default=-1)


def word2vec_job(directory, kill_server_after=None):
    """The sparse path (row pulls, row pushes answered once their clock is applied) with
    replicas; server 1 dies once its metrics say `kill_server_after` clocks were completed."""
    cluster = RecoveryCluster(directory, 1)
    metrics = os.path.join(cluster.directory, "metrics")
    cluster.env["DISTTRAIN_METRICS_DIR"] = metrics   # the servers' lines: the clocks done
    summary = os.path.join(cluster.directory, "summary.json")
    try:
        cluster.start_roles()
        cluster.start_workers(program=[WORD2VEC, "--no-progress", "--seed", "3", "--epochs",
                                       "1", "--max-steps", "200", "--metrics", summary])
        if kill_server_after is not None:
            wait_until(lambda: clocks_completed(os.path.join(metrics, "server-1.jsonl")) >=
                       kill_server_after, SERVER_JOB_S, lambda: cluster.read("worker0"))
            cluster.restart_server(1)
        codes = cluster.wait(SERVER_JOB_S)
    finally:
        cluster.kill_all()
    return codes, json.load(open(summary)) if os.path.exists(summary) else None, cluster


def test_a_killed_server_of_a_sparse_model_with_a_replica_ends_as_an_unbroken_one(tmp_path):
    codes, summary, _ = word2vec_job(tmp_path / "unbroken")
    assert set(codes.values()) == {0}, codes
    got_codes, got_summary, cluster = word2vec_job(tmp_path / "broken", kill_server_after=20)
    restarted = cluster.read("server1-restarted")
    assert got_codes.pop("server1") == -signal.SIGKILL
    assert set(got_codes.values()) == {0}, (got_codes, restarted[-2000:])
    assert "exactly from the replica on server 0" in restarted, restarted
    assert (got_summary["train_loss"], got_summary["val_loss"]) == \
        (summary["train_loss"], summary["val_loss"])
