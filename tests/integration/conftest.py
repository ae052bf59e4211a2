"""Helpers for tests that start real processes: run the launcher, find processes by a
tag in their environment, and make throw-away network namespaces as "hosts"."""

import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from tests.waiting import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAMS = os.path.join(ROOT, "tests", "integration", "programs")
PYTHON = sys.executable
TAG_VARIABLE = "DISTTRAIN_TEST_TAG"
DEADLINE_S = 20.0  # the bound for every lifecycle test
FAKE_PS = f"{PYTHON} {os.path.join(PROGRAMS, 'fake_ps.py')}"
TOY_WORKER = [PYTHON, os.path.join(PROGRAMS, "toy_worker.py")]


def new_tag():
    return uuid.uuid4().hex[:12]


def tagged_pids(tag):
    """Pids of live processes whose environment carries DISTTRAIN_TEST_TAG=tag."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                found = needle in environ.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as stat:
                zombie = stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if found and not zombie:
            pids.append(int(entry))
    return pids


def kill_tagged(tag):
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_no_tagged(tag, deadline_s=5.0):
    """Leftovers get a moment to finish exiting before they count as orphans."""
    wait_until(lambda: not tagged_pids(tag), deadline_s)
    return tagged_pids(tag)


def launcher_argv(*options, command, tag, ps_command=FAKE_PS):
    return [PYTHON, "-m", "launch", "--ps-command", ps_command, "--env",
            f"{TAG_VARIABLE}={tag}", *options, "--", *command]


class LaunchRun:
    """A launcher started as a subprocess; `finish()` waits under the test deadline."""

    def __init__(self, argv, tag, prefix=(), env=None):
        self.tag = tag
        self.popen = subprocess.Popen(
            list(prefix) + list(argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
            env={**os.environ, **(env or {}), TAG_VARIABLE: tag})
        self.stdout = self.stderr = ""

    def finish(self, deadline_s=DEADLINE_S):
        try:
            self.stdout, self.stderr = self.popen.communicate(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            self.stdout, self.stderr = self.popen.communicate()
            pytest.fail(f"launcher still running after {deadline_s:g} s\n"
                        f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
        return self.popen.returncode

    def kill(self):
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_tagged(self.tag)


@pytest.fixture
def launch_run():
    """Starts launchers; whatever happens in the test, kills them and their processes."""
    runs = []

    def start(argv, tag, **kwargs):
        run = LaunchRun(argv, tag, **kwargs)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            if run.popen.poll() is None:
                run.kill()
                run.popen.communicate()
            kill_tagged(run.tag)


# ---- network namespaces as hosts -------------------------------------------------

def namespaces_unavailable():
    """Why this machine cannot make network namespaces, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"dtprobe-{new_tag()[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is refused here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def delete_namespace(name):
    """Kills what still runs inside, then deletes it (with its veth ends)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


class NamespaceHosts:
    """Hosts 0..count-1 as namespaces on one private subnet: namespace 0 holds a bridge
    with a veth link to every other one. The subnet exists only between them."""

    SUBNET = "10.77.0"

    def __init__(self, count):
        tag = new_tag()[:6]
        self.names = [f"dt{tag}h{index}" for index in range(count)]
        self.addresses = [f"{self.SUBNET}.{index + 1}" for index in range(count)]

    def create(self):
        hub = self.names[0]
        for name in self.names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{self.addresses[0]}/24", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        for index, name in enumerate(self.names[1:], 1):
            ip("-n", hub, "link", "add", f"h{index}", "type", "veth", "peer", "name", "eth0",
               "netns", name)
            ip("-n", hub, "link", "set", f"h{index}", "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{self.addresses[index]}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")

    def delete(self):
        for name in self.names:
            delete_namespace(name)

    def host_list(self, slots):
        """-H value: name:slots@address for each namespace."""
        return ",".join(f"{name}:{count}@{address}"
                        for name, count, address in zip(self.names, slots, self.addresses))


@pytest.fixture
def namespace_hosts():
    """Three namespace "hosts"; skips where the machine forbids namespaces."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = NamespaceHosts(3)
    try:
        hosts.create()
        yield hosts
    finally:
        hosts.delete()


def environ_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            pairs = environ.read().split(b"\0")
    except OSError:
        return {}
    return dict(pair.decode(errors="replace").split("=", 1) for pair in pairs if b"=" in pair)


def wait_for_tagged(tag, count, role=None, deadline_s=10.0):
    """Pids of `count` tagged processes of `role` (any role if None), once they all run."""
    def pids():
        return [pid for pid in tagged_pids(tag)
                if role is None or environ_of(pid).get("DISTTRAIN_ROLE") == role]
    return wait_until(lambda: len(pids()) >= count and pids(), deadline_s,
                      lambda: f"only {len(pids())} of {count} {role or 'tagged'} processes started")


def program_pid(tag, role, rank, program):
    """The pid of the process running `program` as `role` `rank` (not its guard or shell)."""
    for pid in wait_for_tagged(tag, 1, role):
        env = environ_of(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().decode().split("\0")
        except OSError:
            continue
        if env.get("DISTTRAIN_RANK") == str(rank) and any(program in word for word in argv) \
                and "launch.guard" not in argv:
            return pid
    return None


def wait_for_program_pid(tag, role, rank, program, deadline_s=10.0):
    return wait_until(lambda: program_pid(tag, role, rank, program), deadline_s,
                      f"{role} {rank} running {program} to start")
