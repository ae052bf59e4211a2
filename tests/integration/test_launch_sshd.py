"""The ssh back end through a real OpenSSH: sshd runs inside each namespace "host" with
a throw-away host key and client key, and the launcher runs in the first namespace."""

import os
import shutil
import signal
import subprocess

import pytest

from tests.integration.conftest import (
    TOY_WORKER, launcher_argv, new_tag, wait_for_no_tagged, wait_for_program_pid)
from tests.integration.test_launch_multihost import worker_reports
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

SSHD = "/usr/sbin/sshd"
SSHD_START_DEADLINE_S = 10.0


def make_key(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   timeout=20)


def wait_until_listening(namespace, address, deadline_s=SSHD_START_DEADLINE_S):
    def listening():
        return address in subprocess.run(
            ["ip", "netns", "exec", namespace, "ss", "-ltnH", "sport = :22"],
            capture_output=True, text=True, timeout=10).stdout
    wait_until(listening, deadline_s, f"sshd in {namespace} to listen on {address}:22")


@pytest.fixture
def sshd_hosts(namespace_hosts, tmp_path):
    """sshd on port 22 of every namespace host; yields the ssh template to reach them."""
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH is not installed (apt-get install -y openssh-server openssh-client)")
    os.chmod(tmp_path, 0o700)
    make_key(tmp_path / "host_key")
    make_key(tmp_path / "client_key")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    daemons = []
    try:
        for name, address in zip(namespace_hosts.names, namespace_hosts.addresses):
            daemons.append(subprocess.Popen(
                ["ip", "netns", "exec", name, SSHD, "-D", "-e", "-f", "/dev/null",
                 "-o", f"ListenAddress={address}", "-o", f"HostKey={tmp_path / 'host_key'}",
                 "-o", f"AuthorizedKeysFile={tmp_path / 'client_key.pub'}",
                 "-o", "PermitRootLogin=prohibit-password", "-o", "StrictModes=no",
                 "-o", "UsePAM=no", "-o", "PidFile=none"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        for name, address in zip(namespace_hosts.names, namespace_hosts.addresses):
            wait_until_listening(name, address)
        yield (f"ssh -i {tmp_path / 'client_key'} -o BatchMode=yes -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR {{host}}")
    finally:
        for daemon in daemons:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)


def sshd_argv(namespace_hosts, template, tag, command):
    hosts = ",".join(f"{address}:{slots}" for address, slots in zip(namespace_hosts.addresses, [0, 1, 1]))
    return launcher_argv("-n", "2", "-H", hosts, "--remote-cmd", template, "--grace", "2",
                         command=command, tag=tag)


def test_job_over_real_ssh_reaches_the_scheduler_and_exits_0(namespace_hosts, sshd_hosts, launch_run):
    tag = new_tag()
    launcher_host = ["ip", "netns", "exec", namespace_hosts.names[0]]
    run = launch_run(sshd_argv(namespace_hosts, sshd_hosts, tag, TOY_WORKER + ["--greet-scheduler"]),
                     tag, prefix=launcher_host)
    assert run.finish() == 0, run.stderr
    reports, greetings = worker_reports(run.stdout)
    for rank in (0, 1):
        assert reports[rank]["DISTTRAIN_HOST"] == namespace_hosts.addresses[rank + 1]
        assert greetings[rank].endswith(namespace_hosts.addresses[0])
    assert wait_for_no_tagged(tag) == []


def start_sleeping_job(namespace_hosts, sshd_hosts, launch_run):
    """Two toy workers that sleep 60 s, launched over ssh from host 0; (tag, run)."""
    tag = new_tag()
    launcher_host = ["ip", "netns", "exec", namespace_hosts.names[0]]
    run = launch_run(sshd_argv(namespace_hosts, sshd_hosts, tag, TOY_WORKER + ["--sleep", "60"]),
                     tag, prefix=launcher_host)
    return tag, run


def test_sigterm_to_the_launcher_stops_processes_behind_ssh(namespace_hosts, sshd_hosts, launch_run):
    """ssh cannot signal a remote group: closing the guards' stdin has to do it."""
    tag, run = start_sleeping_job(namespace_hosts, sshd_hosts, launch_run)
    for rank in (0, 1):
        wait_for_program_pid(tag, "worker", rank, "toy_worker.py")
    run.popen.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM
    assert wait_for_no_tagged(tag) == []


def test_remote_worker_killed_behind_ssh_is_named_with_its_signal(namespace_hosts, sshd_hosts, launch_run):
    tag, run = start_sleeping_job(namespace_hosts, sshd_hosts, launch_run)
    os.kill(wait_for_program_pid(tag, "worker", 0, "toy_worker.py"), signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    assert f"worker 0 exited with code 137 (SIGKILL on {namespace_hosts.addresses[1]})" in run.stderr
    assert wait_for_no_tagged(tag) == []
