"""A running job survives the death of one of its processes (issue 13, recovery on). One
section per kind of death; each keeps its fixtures and helpers inside its section."""

import json
import os
import signal
import subprocess

import pytest

from tests.integration.conftest import PYTHON, ROOT, TAG_VARIABLE, new_tag, wait_for_no_tagged
from tests.ps.cluster import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


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
