"""Test helper: a real parameter-server job on 127.0.0.1 (scheduler, servers and worker
processes, each in its own process group, output in files) that is always torn down."""
import os
import signal
import socket
import subprocess
import sys

from tests.waiting import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAM = os.path.join(ROOT, "tests", "ps", "train_program.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    def __init__(self, directory, num_workers, num_servers, heartbeat_timeout=10, timeout=60):
        self.directory = str(directory)
        self.env = dict(os.environ, DISTTRAIN_SCHEDULER=f"127.0.0.1:{free_port()}",
                        DISTTRAIN_NUM_WORKERS=str(num_workers),
                        DISTTRAIN_NUM_SERVERS=str(num_servers), DISTTRAIN_HOST="127.0.0.1",
                        DISTTRAIN_HEARTBEAT_TIMEOUT=str(heartbeat_timeout),
                        DISTTRAIN_TIMEOUT=str(timeout), DISTTRAIN_DEVICE="cpu",
                        OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=ROOT)
        self.num_workers, self.num_servers = num_workers, num_servers
        self.processes = {}   # name -> Popen

    def _start(self, name, argv, role, rank):
        env = dict(self.env, DISTTRAIN_ROLE=role)
        if rank is not None:
            env["DISTTRAIN_RANK"] = str(rank)
        out = open(os.path.join(self.directory, f"{name}.out"), "w")
        err = open(os.path.join(self.directory, f"{name}.err"), "w")
        self.processes[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=err,
                                                cwd=ROOT, start_new_session=True)
        out.close()
        err.close()

    def start_roles(self):
        self._start("scheduler", [sys.executable, "-m", "disttrain.ps"], "scheduler", None)
        for rank in range(self.num_servers):
            self._start(f"server{rank}", [sys.executable, "-m", "disttrain.ps"], "server", rank)

    def start_workers(self, *args):
        for rank in range(self.num_workers):
            self._start(f"worker{rank}", [sys.executable, PROGRAM, "--out", self.directory,
                                          *map(str, args)], "worker", rank)

    def wait(self, seconds):
        """{name: exit code} once all exited; None for those still running at the deadline."""
        wait_until(lambda: all(p.poll() is not None for p in self.processes.values()), seconds)
        return {name: p.poll() for name, p in self.processes.items()}

    def read(self, name, stream="err"):
        with open(os.path.join(self.directory, f"{name}.{stream}")) as f:
            return f.read()

    def kill_all(self):
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.kill_all()
        return False
