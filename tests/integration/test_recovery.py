"""Recovery of a running job (issue 13): one section per kind of death; each keeps its
fixtures and helpers inside its section."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from disttrain import checkpoint
from disttrain.observe import channel
from tests.integration.conftest import PYTHON, TAG_VARIABLE, new_tag, wait_for_no_tagged
from tests.ps.cluster import ROOT, Cluster, free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


# === worker recovery ===================================================================# A 2-worker seeded sync MNIST MLP job of 20 steps (1,280 samples, batch 32), started process=======
# by process as the launcher would; the test kills a worker and starts its replacement itself
# (DISTTRAIN_INCARNATION=1, same rank and key), as `launch --max-restarts` does.
STEPS = 20
MNIST = [sys.executable, os.path.join(ROOT, "workers", "mnist.py"), "--model", "mlp",
         "--limit-train", str(STEPS * 2 * 32), "--batch-size", "32", "--epochs", "1",
         "--seed", "0", "--no-progress", "--slow-rank", "1", "--slow-ms", "100"]


class RecoveryJob(Cluster):
    """A Cluster whose processes run with recovery on (DISTTRAIN_RESTART_TIMEOUT)."""

    def __init__(self, directory, num_servers, heartbeat_timeout=10, mode="sync"):
        super().__init__(directory, 2, num_servers, heartbeat_timeout=heartbeat_timeout,
                         timeout=120)
        self.env["DISTTRAIN_RESTART_TIMEOUT"] = "60"
        self.argv = MNIST + ["--mode", mode, "--loss-log", os.path.join(self.directory, "loss.log"),
                             "--checkpoint-dir", os.path.join(self.directory, "checkpoints")]

    def start(self):
        self.start_roles()
        self.start_workers(program=self.argv[1:])

    def losses(self):
        """Rank 0's --loss-log: a 'step loss' line per finished step."""
        try:
            with open(os.path.join(self.directory, "loss.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def steps_logged(self):
        return self.losses().count("\n")

    def kill(self, name, sig=signal.SIGKILL):
        os.killpg(self.processes[name].pid, sig)
        if sig == signal.SIGKILL:
            self.processes[name].wait()

    def replace(self, rank):
        """Start the replacement of worker `rank`, as the launcher's first restart of it."""
        env, self.env = self.env, dict(self.env, DISTTRAIN_INCARNATION="1")
        try:
            self._start(f"worker{rank}-replacement", self.argv, "worker", rank)
        finally:
            self.env = env

    def finish(self):
        codes = self.wait(240)
        assert all(code is not None for code in codes.values()), self.report(codes)
        return codes

    def report(self, codes):
        return f"exit codes {codes}; " + "; ".join(
            f"{name}: {self.read(name)[-1500:]}" for name in self.processes)

    def contributions(self):
        """{chunk: [applied, version]} from every server's exit line."""
        counts = {}
        for rank in range(self.num_servers):
            match = re.search(r"server \d+ contributions (\{.*?\})", self.read(f"server{rank}"))
            assert match, self.read(f"server{rank}")
            counts.update(json.loads(match.group(1)))
        return counts

    def summary(self, name="worker0"):
        return json.loads(self.read(name, "out").strip().splitlines()[-1])

    def final_state(self):
        """Every server's shard of the last checkpoint: weights and optimizer state."""
        step_dir = os.path.join(self.directory, "checkpoints", f"step-{STEPS:06d}")
        return {rank: _flatten(checkpoint.load(os.path.join(step_dir, f"server-{rank}.safetensors"))
                               ["chunks"]) for rank in range(self.num_servers)}


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{name}.").items()}
    return {prefix[:-1]: np.asarray(tree)}


def _unbroken(directory, num_servers):
    with RecoveryJob(directory, num_servers) as job:
        job.start()
        codes = job.finish()
        assert set(codes.values()) == {0}, job.report(codes)
        return job.steps_logged(), job.summary(), job.final_state(), job.losses()


def _assert_every_chunk_applied_workers_times_clocks(job, versions=STEPS):
    counts = job.contributions()
    assert counts and all(pair == [2 * STEPS, versions] for pair in counts.values()), counts


@pytest.mark.slow
@pytest.mark.parametrize("num_servers,killed", [(1, 1), (2, 0)])
def test_a_killed_worker_replaced_mid_run_leaves_the_job_as_if_nothing_happened(
        tmp_path, num_servers, killed):
    steps, summary, state, losses = _unbroken(tmp_path / "unbroken", num_servers)
    assert steps == STEPS
    with RecoveryJob(tmp_path / "recovered", num_servers) as job:
        job.start()
        wait_until(lambda: job.steps_logged() >= 6, 120, lambda: job.report(job.wait(0)))
        job.kill(f"worker{killed}")
        job.replace(killed)
        codes = job.finish()
        assert codes.pop(f"worker{killed}") == -signal.SIGKILL
        assert set(codes.values()) == {0}, job.report(codes)
        replacement = job.read(f"worker{killed}-replacement")
        clock = int(re.search(r"resuming at clock (\d+)", replacement).group(1))
        assert 5 <= clock <= STEPS and f"continues at step {clock}" in replacement
        assert "recovered" in job.read("scheduler")
        # Nothing lost, nothing twice: every chunk summed 2 workers' pushes of each clock.
        _assert_every_chunk_applied_workers_times_clocks(job)
        # Bit for bit the unbroken run: every server's weights and optimizer state, and the
        # test accuracy of the final model.
        recovered = job.final_state()
        for rank in range(num_servers):
            assert recovered[rank].keys() == state[rank].keys()
            for name in state[rank]:
                np.testing.assert_array_equal(recovered[rank][name], state[rank][name],
                                              err_msg=name)
        final = job.summary(f"worker{killed}-replacement" if killed == 0 else "worker0")
        assert final["test_accuracy"] == summary["test_accuracy"]
        if killed != 0:   # rank 0 lived: its loss of every step is the unbroken run's
            assert job.losses() == losses


@pytest.mark.slow
def test_in_async_mode_a_replacement_continues_where_its_predecessor_stopped(tmp_path):
    """Async: the other worker does not wait; the replacement pulls the current weights
    (no exact version: there is none to redo) and pushes the clocks its predecessor had not,
    so every worker's every clock is still applied exactly once."""
    with RecoveryJob(tmp_path, 1, mode="async") as job:
        job.start()
        wait_until(lambda: job.steps_logged() >= 6, 120, lambda: job.report(job.wait(0)))
        job.kill("worker1")
        job.replace(1)
        codes = job.finish()
        assert codes.pop("worker1") == -signal.SIGKILL
        assert set(codes.values()) == {0}, job.report(codes)
        assert "resuming at clock" in job.read("worker1-replacement")
        # Async applies each push as it comes: one version per push.
        _assert_every_chunk_applied_workers_times_clocks(job, versions=2 * STEPS)


@pytest.mark.slow
def test_a_frozen_worker_is_reported_unresponsive_and_the_job_goes_on_with_its_replacement(
        tmp_path):
    with RecoveryJob(tmp_path, 1, heartbeat_timeout=3) as job:
        job.start()
        wait_until(lambda: job.steps_logged() >= 4, 120, lambda: job.report(job.wait(0)))
        job.kill("worker1", signal.SIGSTOP)

        def reported():
            text = job.read("scheduler")
            return [m for m in map(channel.parse, text.encode().split(b"\n"))
                    if m and m["kind"] == "unresponsive"]
        [message] = wait_until(reported, 60, lambda: job.read("scheduler"))
        assert (message["role"], message["rank"]) == ("worker", 1)
        assert message["why"].startswith("no heartbeat for")
        job.kill("worker1")   # what the launcher does on that message: SIGKILL, then restart
        job.replace(1)
        codes = job.finish()
        assert codes.pop("worker1") == -signal.SIGKILL
        assert set(codes.values()) == {0}, job.report(codes)
        assert "dead:" not in job.read("worker0")
        _assert_every_chunk_applied_workers_times_clocks(job)

# --- scheduler restart ----------------------------------------------------------------------
# kill -9 the scheduler of a running sync MNIST job and start it again on the same port with
# DISTTRAIN_INCARNATION=1: every live process rejoins it, none is restarted, and the job ends
# as the same seeded job run unbroken.

SCHEDULER_RESTART_JOB_S = 300.0   # a short MNIST job on 2 shared cores, generously
# --slow-ms (a sleep per step of rank 0, which sync mode imposes on both) keeps training
# going across the kill, the silence and the restart; it changes no number.
MNIST_SHORT = [os.path.join(ROOT, "workers", "mnist.py"), "--no-progress", "--seed", "3",
               "--limit-train", "4000", "--max-steps", "60", "--slow-ms", "100"]


class SchedulerRestartJob:
    """A 2-worker, 1-server job started process by process as the launcher would (the
    DISTTRAIN_* environment of launch/placement.py, CURVE keys from `python -m launch keys`
    unless `insecure`), with recovery on; every process in its own process group, output in
    files, all killed (by their pids) on close."""

    def __init__(self, directory, insecure=False):
        self.directory = str(directory)
        keys = os.path.join(self.directory, "keys")
        if insecure:
            security = {"DISTTRAIN_INSECURE": "1"}
        else:
            subprocess.run([PYTHON, "-m", "launch", "keys", keys, "-n", "2", "-s", "1"],
                           cwd=ROOT, check=True, capture_output=True)
            security = {"DISTTRAIN_KEYS": keys}
        self.tag = new_tag()
        self.loss_log = os.path.join(self.directory, "loss.log")
        self.env = dict(os.environ, DISTTRAIN_SCHEDULER=f"127.0.0.1:{free_port()}",
                        DISTTRAIN_NUM_WORKERS="2", DISTTRAIN_NUM_SERVERS="1",
                        DISTTRAIN_DEVICE="cpu", DISTTRAIN_HOST="127.0.0.1", **security,
                        DISTTRAIN_RESTART_TIMEOUT="60", DISTTRAIN_HEARTBEAT_TIMEOUT="2",
                        DISTTRAIN_TIMEOUT="120", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,
                        OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                        **{TAG_VARIABLE: self.tag})
        self.processes = {}   # name -> Popen

    def start(self, name, argv, role, rank=None, **env):
        variables = dict(self.env, DISTTRAIN_ROLE=role, **env)
        if rank is not None:
            variables["DISTTRAIN_RANK"] = str(rank)
        with open(os.path.join(self.directory, f"{name}.out"), "w") as out, \
                open(os.path.join(self.directory, f"{name}.err"), "w") as err:
            self.processes[name] = subprocess.Popen(argv, env=variables, stdout=out,
                                                    stderr=err, cwd=ROOT,
                                                    start_new_session=True)

    def start_all(self):
        self.start("scheduler", [PYTHON, "-m", "disttrain.ps"], "scheduler")
        self.start("server0", [PYTHON, "-m", "disttrain.ps"], "server", 0)
        for rank in range(2):
            self.start(f"worker{rank}", [PYTHON] + MNIST_SHORT + ["--loss-log", self.loss_log],
                       "worker", rank)

    def steps_logged(self):
        if not os.path.exists(self.loss_log):
            return 0
        with open(self.loss_log) as f:
            return f.read().count("\n")

    def wait(self):
        """{name: exit code} once every process exited (the assertion says who did not)."""
        wait_until(lambda: all(p.poll() is not None for p in self.processes.values()),
                   SCHEDULER_RESTART_JOB_S, lambda: f"the job ended: {self.report()}")
        return {name: p.poll() for name, p in self.processes.items()}

    def read(self, name, stream="err"):
        with open(os.path.join(self.directory, f"{name}.{stream}")) as f:
            return f.read()

    def summary(self):
        lines = self.read("worker0", "out").strip().splitlines()
        assert lines, f"worker 0 printed nothing: {self.report()}"
        return json.loads(lines[-1])

    def report(self):
        return "\n".join(f"--- {name} (exit {p.poll()}):\n{self.read(name)[-1500:]}"
                         for name, p in self.processes.items())

    def close(self):
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()


@pytest.fixture(scope="module")
def unbroken_mnist_summary(tmp_path_factory):
    """The JSON summary of the job run without any kill (sync mode: the same numbers, with
    or without CURVE)."""
    job = SchedulerRestartJob(tmp_path_factory.mktemp("unbroken"))
    try:
        job.start_all()
        assert set(job.wait().values()) == {0}, job.report()
        return job.summary()
    finally:
        job.close()


@pytest.mark.parametrize("insecure", [False, True], ids=["curve", "insecure"])
def test_a_killed_scheduler_restarted_on_its_port_lets_the_job_finish_as_if_unbroken(
        unbroken_mnist_summary, tmp_path, insecure):
    job = SchedulerRestartJob(tmp_path, insecure)
    try:
        scheduler_killed_and_restarted_mid_run(job)
    finally:
        job.close()
    ended, expected = job.summary(), unbroken_mnist_summary
    assert (ended["steps"], ended["train_loss"], ended["test_accuracy"]) == \
        (expected["steps"], expected["train_loss"], expected["test_accuracy"])
    assert wait_for_no_tagged(job.tag) == []


def scheduler_killed_and_restarted_mid_run(job):
    """Run `job`, kill -9 its scheduler after a few steps and start it again on its port
    while training goes on; check every process rejoined and the job ended 0."""
    job.start_all()
    wait_until(lambda: job.steps_logged() >= 3, SCHEDULER_RESTART_JOB_S,
               lambda: f"training began: {job.report()}")
    killed = job.processes.pop("scheduler")
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    # Without a scheduler, training goes on, and everyone waits for its restart.
    steps_at_kill = job.steps_logged()
    wait_until(lambda: job.steps_logged() >= steps_at_kill + 2, SCHEDULER_RESTART_JOB_S,
               lambda: f"training went on without the scheduler: {job.report()}")
    for name in ("server0", "worker0", "worker1"):
        wait_until(lambda: "waiting up to 60 s for its restart" in job.read(name),
                   SCHEDULER_RESTART_JOB_S, lambda: f"{name} waits for the restart: {job.report()}")
    job.start("scheduler1", [PYTHON, "-m", "disttrain.ps"], "scheduler", DISTTRAIN_INCARNATION="1")

    assert set(job.wait().values()) == {0}, job.report()
    for name in ("server0", "worker0", "worker1"):
        assert "rejoined scheduler incarnation" in job.read(name), job.report()
    assert "all 3 processes are back (incarnation 1)" in job.read("scheduler1"), job.report()


# --- server recovery -----------------------------------------------------------------------
# A seeded 2-worker, 2-server sync SERVER_MNIST MLP job started by the test itself (scheduler,
# servers and workers as processes on 127.0.0.1, CURVE keys as launched jobs have them);
# one server is killed with SIGKILL mid-run and a replacement started with the same rank
# and keys (DISTTRAIN_INCARNATION=1), as `launch --max-restarts` does.

SERVER_JOB_S = 240   # the whole job on 2 busy cores; it normally takes a few seconds
SERVER_MNIST = os.path.join(ROOT, "workers", "mnist.py")


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
            SERVER_MNIST, "--no-progress", "--seed", "3", "--limit-train", "4096", "--epochs", "1",
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
