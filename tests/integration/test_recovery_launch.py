"""Recovery end to end through the launcher (issue 13): a real seeded sync MNIST job
(`python -m launch` with the real scheduler, servers and workers/mnist.py) loses its
scheduler, a server or a worker to kill -9 mid-run, on the local back end and on the ssh
back end across network namespaces, and ends as the same job run unbroken."""

import json
import os
import re
import signal

import pytest

from tests.integration.conftest import (
    PYTHON, ROOT, NamespaceHosts, environ_of, namespaces_unavailable, new_tag, tagged_pids,
    wait_for_no_tagged)
from tests.integration.test_launch_mnist import summary_of_rank_0
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

# 24 sync steps of 2 x 32 examples; rank 0 sleeps 100 ms a step (sync mode imposes it on
# both workers; it changes no number), so training is still going when the kill lands.
STEPS = 24
KILL_AFTER_STEPS = 4
MNIST = [PYTHON, os.path.join(ROOT, "workers", "mnist.py"), "--no-progress", "--seed", "3",
         "--limit-train", str(STEPS * 2 * 32), "--batch-size", "32", "--epochs", "1",
         "--slow-ms", "100"]
JOB_DEADLINE_S = 300.0   # a hang guard for a few seconds of training on 2 busy cores
NETNS_TEMPLATE = "ip netns exec {host}"
VICTIMS = [("scheduler", None), ("server", 1), ("worker", 1)]


def launch_argv(tag, loss_log, hosts=None):
    """The job: -n 2 -s 2, one restart, server replicas; with `hosts`, the ssh back end
    over those namespaces (scheduler and servers on the first, worker r on host r + 1)."""
    remote = [] if hosts is None else ["-H", hosts.host_list([0, 1, 1]),
                                       "--remote-cmd", NETNS_TEMPLATE]
    return [PYTHON, "-m", "launch", "-n", "2", "-s", "2", *remote,
            "--max-restarts", "1", "--server-replicas", "1",
            "--env", f"DISTTRAIN_TEST_TAG={tag}", "--env", "DISTTRAIN_HEARTBEAT_TIMEOUT=3",
            "--", *MNIST, "--loss-log", str(loss_log)]


def steps_logged(loss_log):
    """Steps rank 0 finished: one 'step loss' line each in its --loss-log."""
    return loss_log.read_text().count("\n") if loss_log.exists() else 0


def program_of(tag, role, rank, incarnation):
    """The pid of `role` `rank` (None: the scheduler) in `incarnation`, among this test's
    tagged processes: the program itself, not the guard or shell around it."""
    program = "mnist.py" if role == "worker" else "disttrain.ps"
    wanted = (role, None if rank is None else str(rank), str(incarnation))
    for pid in tagged_pids(tag):
        env = environ_of(pid)
        if (env.get("DISTTRAIN_ROLE"), env.get("DISTTRAIN_RANK"),
                env.get("DISTTRAIN_INCARNATION")) != wanted:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().decode().split("\0")
        except OSError:
            continue   # gone meanwhile
        if argv[0] == PYTHON and "launch.guard" not in argv and \
                any(word.endswith(program) for word in argv):
            return pid
    return None


def servers_contributions(stderr):
    """{server rank: (chunk counts, the verdict)} from each server's exit line."""
    found = {}
    for rank, counts, verdict in re.findall(
            r"^\[server \d+\] disttrain: server (\d+) contributions (\{.*?\}); (.*)$",
            stderr, re.MULTILINE):
        assert int(rank) not in found, f"server {rank} printed its counts twice:\n{stderr}"
        found[int(rank)] = (json.loads(counts), verdict)
    return found


def output_of(stderr, name):
    """What process `name` ("worker 1") wrote to stderr, every incarnation, unprefixed."""
    prefix = f"[{name}] "
    return "\n".join(line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix))


def assert_recovered_in_place(stderr, role, rank):
    """The restarted process took its predecessor's place, as its role recovers."""
    if role == "scheduler":
        assert "scheduler: all 4 processes are back (incarnation 1)" in \
            output_of(stderr, role), stderr
        for name in ("server 0", "server 1", "worker 0", "worker 1"):
            assert re.search(rf"rejoined scheduler incarnation \w+ \(restart 1\) as {name}$",
                             output_of(stderr, name), re.MULTILINE), stderr
    elif role == "server":
        assert re.search(rf"server {rank} restarted: rebuilt \d+ chunks exactly from the replica "
                         rf"on server {1 - rank} ", output_of(stderr, f"server {rank}")), stderr
    else:
        said = output_of(stderr, f"worker {rank}")
        clock = int(re.search(rf"worker {rank} recovered: a replacement, resuming at clock (\d+)",
                              said).group(1))
        # Rank 0 had logged KILL_AFTER_STEPS steps before the kill: the job's clock was past them.
        assert KILL_AFTER_STEPS <= clock < STEPS and f"continues at step {clock} " in said, said


def run_job(launch_run, tmp_path, hosts=None, victim=None):
    """Run the job; with `victim` (role, rank), kill -9 that process once rank 0 logged a
    few steps. Returns the finished run (exit 0, nothing of it left running)."""
    tag, loss_log = new_tag(), tmp_path / "loss.log"
    run = launch_run(launch_argv(tag, loss_log, hosts), tag)
    if victim is not None:
        wait_until(lambda: steps_logged(loss_log) >= KILL_AFTER_STEPS or
                   run.popen.poll() is not None, JOB_DEADLINE_S, "rank 0 to log its first steps")
        assert run.popen.poll() is None, \
            f"the job ended before the kill, exit {run.finish()}:\n{run.stderr[-4000:]}"
        pid = wait_until(lambda: program_of(tag, *victim, 0), JOB_DEADLINE_S,
                         f"{victim} to be found")
        os.kill(pid, signal.SIGKILL)
        # The kill landed in the middle of training, not after its end.
        assert steps_logged(loss_log) < STEPS
    assert run.finish(JOB_DEADLINE_S) == 0, run.stderr[-4000:]
    assert wait_for_no_tagged(tag) == []
    return run


@pytest.fixture(scope="module")
def hosts():
    """Three namespace hosts for every ssh case of this module; skips where the machine
    forbids namespaces."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    made = NamespaceHosts(3)
    try:
        made.create()
        yield made
    finally:
        made.delete()


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """Rank 0's summary of the job run without a kill, per back end ("local", "ssh")."""
    summaries = {}

    def summary(backend, launch_run, hosts):
        if backend not in summaries:
            run = run_job(launch_run, tmp_path_factory.mktemp(f"unbroken-{backend}"), hosts)
            assert "launch: restarting" not in run.stderr, run.stderr[-4000:]
            summaries[backend] = summary_of_rank_0(run.stdout)
        return summaries[backend]
    return summary


@pytest.mark.parametrize("backend", ["local", "ssh"])
@pytest.mark.parametrize("role, rank", VICTIMS, ids=["scheduler", "server-1", "worker-1"])
def test_a_process_killed_mid_run_is_restarted_and_the_job_ends_as_an_unbroken_one(
        request, launch_run, unbroken, tmp_path, backend, role, rank):
    namespaces = request.getfixturevalue("hosts") if backend == "ssh" else None
    expected = unbroken(backend, launch_run, namespaces)
    run = run_job(launch_run, tmp_path, namespaces, victim=(role, rank))
    name = role if rank is None else f"{role} {rank}"
    if namespaces is None:
        why = "exit SIGKILL"
    else:   # the remote guard's exit, relayed by `ip netns exec`, on the victim's host
        host = namespaces.names[0 if role != "worker" else rank + 1]
        why = f"exit 137: SIGKILL on {host}"
    assert f"launch: restarting {name} ({why}), restart 1 of 1\n" in run.stderr, run.stderr[-4000:]
    assert run.stderr.count("launch: restarting ") == 1
    assert run.stderr.strip().splitlines()[-1].endswith("restarts 1 of 1")
    assert_recovered_in_place(run.stderr, role, rank)
    got = summary_of_rank_0(run.stdout)
    assert (got["steps"], got["train_loss"], got["test_accuracy"]) == \
        (expected["steps"], expected["train_loss"], expected["test_accuracy"])
    # Nothing lost, nothing twice: each server (the restarted one too) applied both workers'
    # pushes of every clock to every chunk of its shard.
    counts = servers_contributions(run.stderr)
    assert sorted(counts) == [0, 1], run.stderr[-4000:]
    for chunks, verdict in counts.values():
        assert verdict == "every chunk applied 2 workers x its clocks", verdict
        assert chunks and all(pair == [2 * STEPS, STEPS] for pair in chunks.values()), chunks
