"""DataParallel through real scheduler / server / worker processes: exactness of sync mode,
and a worker killed mid-run ending the whole job with a named culprit."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.ps import train_program
from tests.ps.cluster import Cluster
from tests.waiting import wait_until


def test_local_mode_is_the_plain_optimizer(monkeypatch):
    monkeypatch.delenv("DISTTRAIN_ROLE", raising=False)
    wrapped, plain = train_program.TinyNet(), train_program.TinyNet()
    wrapped_optimizer = train_program.make_optimizer("adam", wrapped.parameters())
    plain_optimizer = train_program.make_optimizer("adam", plain.parameters())
    tokens, x, y = train_program.dataset(8)
    with train_program.DataParallel(wrapped, wrapped_optimizer) as parallel:
        assert (parallel.rank, parallel.num_workers, parallel.is_distributed) == (0, 1, False)
        for model, optimizer, step in ((wrapped, wrapped_optimizer, parallel.step),
                                       (plain, plain_optimizer, plain_optimizer.step)):
            for _ in range(3):
                optimizer.zero_grad()
                error = model(tokens, train_program.dt.tensor(x)) - train_program.dt.tensor(y)
                (error * error).mean().backward()
                step()
    for (name, a), (_, b) in zip(wrapped.state_dict().items(), plain.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.array_equal(wrapped.state_dict()["w1"], train_program.TinyNet().state_dict()["w1"])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("num_servers", [1, 3])
def test_two_sync_workers_equal_one_process_with_double_batch(tmp_path, monkeypatch,
                                                                optimizer, num_servers):
    monkeypatch.delenv("DISTTRAIN_ROLE", raising=False)
    reference, _ = train_program.train(optimizer, steps=20, batch=16)
    with Cluster(tmp_path, num_workers=2, num_servers=num_servers) as cluster:
        cluster.start_roles()
        cluster.start_workers("--optimizer", optimizer, "--steps", 20, "--batch", 8)
        codes = cluster.wait(120)
        assert codes == {name: 0 for name in codes}, \
            {name: cluster.read(name)[-2000:] for name, code in codes.items() if code != 0}
    for rank in range(2):
        result = np.load(tmp_path / f"params-{rank}.npz")
        for name, expected in reference.items():
            np.testing.assert_allclose(result[name], expected, rtol=2e-5, atol=2e-6,
                                       err_msg=f"{name} on worker {rank} ({optimizer}, "
                                               f"{num_servers} servers)")


@pytest.mark.slow
def test_killed_worker_is_named_by_every_process_and_the_job_ends(tmp_path):
    with Cluster(tmp_path, num_workers=2, num_servers=1, heartbeat_timeout=3) as cluster:
        cluster.start_roles()
        cluster.start_workers("--steps", 100000, "--batch", 4, "--sleep", 0.01)
        def trained_5_steps():
            assert cluster.processes["worker1"].poll() is None, cluster.read("worker1")
            return "step 5 " in cluster.read("worker1", "out")
        wait_until(trained_5_steps, 60, lambda: cluster.read("worker1"))
        os.kill(cluster.processes["worker1"].pid, signal.SIGKILL)
        codes = cluster.wait(15)
        assert all(code is not None for code in codes.values()), f"still running: {codes}"
        for name in ("scheduler", "server0", "worker0"):
            assert codes[name] != 0, f"{name} exited {codes[name]}"
            assert "dead: worker 1 (no heartbeat for" in cluster.read(name), cluster.read(name)


@pytest.mark.slow
def test_a_worker_failing_with_an_exception_is_named_by_every_process(tmp_path):
    # The exception leaves DataParallel's block without a goodbye: the scheduler notices
    # the silence and tells everyone which worker it was.
    with Cluster(tmp_path, num_workers=2, num_servers=1, heartbeat_timeout=3) as cluster:
        cluster.start_roles()
        cluster.start_workers("--steps", 100000, "--batch", 4, "--fail", "1:5")
        codes = cluster.wait(60)
        assert all(code is not None for code in codes.values()), f"still running: {codes}"
        assert "worker 1 fails on purpose at step 5" in cluster.read("worker1")
        for name in ("scheduler", "server0", "worker0", "worker1"):
            assert codes[name] != 0, f"{name} exited {codes[name]}"
        for name in ("scheduler", "server0", "worker0"):
            assert "dead: worker 1 (no heartbeat for" in cluster.read(name), cluster.read(name)


def test_a_worker_never_loads_server_or_scheduler_code():
    # -X importtime lists every module the import loads, one "| name" line each, on stderr.
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import disttrain.parallel"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:") and "|" in line}
    assert "disttrain.ps.client" in loaded and "disttrain.ps.membership" in loaded, loaded
    assert "disttrain.ps.server" not in loaded
    assert "disttrain.ps.scheduler" not in loaded
