"""`python -m disttrain.ps` as the launcher uses it: SIGTERM ends the scheduler and servers
with exit 0, bad settings end them with a message naming the setting."""
import os
import signal
import subprocess
import sys

import pytest

from disttrain.ps import transport
from disttrain.ps.protocol import Message
from tests.ps.cluster import Cluster
from tests.waiting import wait_until


def catches_sigterm(pid):
    """Whether process `pid` has a SIGTERM handler installed (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def scheduler_answers(address):
    """Whether the scheduler at host:port answers a heartbeat (it does so in its loop, even
    for a node that never registered)."""
    connection = transport.Connection(f"tcp://{address}", b"test-probe")
    try:
        probe = Message("heartbeat", 1, "test-probe", meta={"node": "test-probe"})
        return connection.request(probe, transport.Deadline(30, "probe the scheduler")).op == "reply"
    finally:
        connection.close()


@pytest.mark.slow
def test_sigterm_ends_scheduler_and_servers_with_exit_code_0(tmp_path):
    with Cluster(tmp_path, num_workers=1, num_servers=2) as cluster:
        cluster.start_roles()
        # Every process past its set-up (SIGTERM handled), the scheduler in its loop, waiting
        # for the worker that never comes.
        wait_until(lambda: all(catches_sigterm(p.pid) for p in cluster.processes.values()), 30,
                   "the scheduler and servers to install their SIGTERM handlers")
        assert scheduler_answers(cluster.env["DISTTRAIN_SCHEDULER"])
        assert all(p.poll() is None for p in cluster.processes.values())
        for process in cluster.processes.values():
            process.send_signal(signal.SIGTERM)
        codes = cluster.wait(15)
        assert codes == {name: 0 for name in codes}, \
            {name: cluster.read(name) for name in codes}


@pytest.mark.slow
def test_a_job_run_without_launcher_ends_by_itself_when_workers_say_goodbye(tmp_path):
    with Cluster(tmp_path, num_workers=2, num_servers=2) as cluster:
        cluster.start_roles()
        cluster.start_workers("--steps", 3, "--batch", 4)
        codes = cluster.wait(60)
        assert codes == {name: 0 for name in codes}, \
            {name: cluster.read(name) for name in codes}


@pytest.mark.parametrize("env, message", [
    ({"DISTTRAIN_ROLE": "scheduler", "DISTTRAIN_NUM_WORKERS": "two"},
     "DISTTRAIN_NUM_WORKERS='two' must be a non-negative integer"),
    ({"DISTTRAIN_ROLE": "worker"}, "DISTTRAIN_ROLE='worker'"),
    ({"DISTTRAIN_ROLE": "server", "DISTTRAIN_SCHEDULER": ""}, "DISTTRAIN_SCHEDULER='' must be host:port"),
    ({"DISTTRAIN_ROLE": "server", "DISTTRAIN_TIMEOUT": "soon"}, "DISTTRAIN_TIMEOUT='soon' is not a number"),
])
def test_bad_settings_exit_non_zero_naming_the_setting(env, message):
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISTTRAIN_")}
    base.update({"DISTTRAIN_SCHEDULER": "127.0.0.1:1", "DISTTRAIN_NUM_WORKERS": "1",
                 "DISTTRAIN_NUM_SERVERS": "1", "DISTTRAIN_TIMEOUT": "5"})
    base.update(env)
    done = subprocess.run([sys.executable, "-m", "disttrain.ps"], env=base, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_a_realtime_server_runs_sched_fifo_or_says_why_not():
    # In a child process: the test runner's own scheduling must not change.
    code = ("import os; from disttrain.ps import __main__ as ps_main; ok = ps_main.use_realtime_priority(3); "
            "print(ok, os.sched_getscheduler(0) == os.SCHED_FIFO)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if result.stdout.split() == ["True", "True"]:
        assert result.stderr == ""
    else:
        assert result.stdout.split() == ["False", "False"], result.stdout
        assert "server 3 keeps normal priority (SCHED_FIFO refused" in result.stderr


def test_a_refused_realtime_priority_is_reported_and_not_fatal(monkeypatch, capsys):
    from disttrain.ps import __main__ as ps_main

    def refuse(pid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert ps_main.use_realtime_priority(0) is False
    assert "server 0 keeps normal priority (SCHED_FIFO refused: [Errno 1] Operation not " \
           "permitted)" in capsys.readouterr().err
