"""Recovery of a running job (issue 13): one section per part; each keeps its fixtures local."""
import json
import os
import re
import signal
import sys

import numpy as np
import pytest

from disttrain import checkpoint
from disttrain.observe import channel
from tests.ps.cluster import ROOT, Cluster
from tests.waiting import wait_until


# === worker recovery ==========================================================================
# A 2-worker seeded sync MNIST MLP job of 20 steps (1,280 samples, batch 32), started process
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
