"""Distributed checkpoints with real processes: a job killed with SIGKILL after a checkpoint,
preempted with SIGTERM, or killed while a server writes its shard, resumes (also on other
server and worker counts) to exactly the weights and optimizer moments of an unbroken run."""

import os
import signal

import numpy as np
import pytest

from disttrain import checkpoint_dist
from tests.integration.conftest import PYTHON, ROOT, kill_tagged, new_tag, wait_for_no_tagged
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

PROGRAMS = os.path.join(ROOT, "tests", "integration", "programs")
MNIST = [PYTHON, os.path.join(ROOT, "workers", "mnist.py"), "--no-progress"]
PAUSED = [PYTHON, os.path.join(PROGRAMS, "paused_worker.py"), "--no-progress"]
STALLED_PS = f"{PYTHON} {os.path.join(PROGRAMS, 'stalled_shard_ps.py')}"
DEADLINE_S = 240.0
STEPS = 40
# 3200 examples: 50 steps of 2 x 32 per epoch, so step 20 and 40 are mid-epoch.
OPTIMIZERS = {"sgd": ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"],
              "adam": ["--optimizer", "adam", "--lr", "0.002"]}


def flags(optimizer, batch_size=32):
    return OPTIMIZERS[optimizer] + ["--limit-train", "3200", "--batch-size", str(batch_size),
                                    "--seed", "3"]


def argv(tag, workers, servers, command, *options):
    return [PYTHON, "-m", "launch", "--env", f"DISTTRAIN_TEST_TAG={tag}", "-n", str(workers),
            "-s", str(servers), *options, "--", *command]


def run_job(launch_run, workers, servers, command, *options, expect=0):
    tag = new_tag()
    run = launch_run(argv(tag, workers, servers, command, *options), tag)
    code = run.finish(DEADLINE_S)
    assert code == expect, run.stderr[-4000:]
    assert wait_for_no_tagged(tag) == []
    return run


def wait_for(condition, what):
    wait_until(condition, DEADLINE_S, what)


def crash_after_checkpoint(launch_run, tmp_path, directory, optimizer, servers, step):
    """Run the job until every worker wrote the checkpoint of `step`, then SIGKILL every
    process this test started (a crash); only the checkpoint remains."""
    tag, marker = new_tag(), tmp_path / f"paused-{new_tag()}"
    command = PAUSED + flags(optimizer) + ["--max-steps", str(STEPS), "--checkpoint-dir",
                                           str(directory), "--checkpoint-every", str(step)]
    run = launch_run(argv(tag, 2, servers, command, "--env", f"DISTTRAIN_TEST_PAUSE_AT={step}",
                          "--env", f"DISTTRAIN_TEST_MARKER={marker}"), tag)
    wait_for(lambda: all(os.path.exists(f"{marker}.{rank}") for rank in range(2)) or
             run.popen.poll() is not None, f"the checkpoint of step {step}")
    assert run.popen.poll() is None, run.popen.communicate()[1][-4000:]
    os.killpg(run.popen.pid, signal.SIGKILL)
    kill_tagged(tag)
    run.popen.communicate()
    assert wait_for_no_tagged(tag) == []
    assert (directory / checkpoint_dist.LATEST).read_text().strip() == checkpoint_dist.step_name(step)


def final_state(directory):
    step_dir = checkpoint_dist.resolve(directory)
    assert step_dir.name == checkpoint_dist.step_name(STEPS)
    return checkpoint_dist.full_state(step_dir)


def assert_same_state(expected, got, tolerance=0.0):
    """Weights, every optimizer moment and the step counts of every key."""
    assert sorted(expected) == sorted(got)
    worst = 0.0
    for name, entry in expected.items():
        assert sorted(entry["state"]) == sorted(got[name]["state"]), name
        assert np.array_equal(entry["step"], got[name]["step"]), name
        for a, b in [(entry["param"], got[name]["param"])] + \
                [(value, got[name]["state"][key]) for key, value in entry["state"].items()]:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
    print(f"max abs difference of weights and optimizer state: {worst}")
    assert worst <= tolerance, f"max abs difference {worst} > {tolerance}"
    return worst


_unbroken = {}


def unbroken(launch_run, tmp_path_factory, optimizer, servers):
    """The final state of 40 uninterrupted steps (one run per optimizer and server count)."""
    if (optimizer, servers) not in _unbroken:
        directory = tmp_path_factory.mktemp(f"unbroken-{optimizer}-{servers}")
        run_job(launch_run, 2, servers, MNIST + flags(optimizer) +
                ["--max-steps", str(STEPS), "--checkpoint-dir", str(directory)])
        _unbroken[optimizer, servers] = final_state(directory)
    return _unbroken[optimizer, servers]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("servers", [1, 3])
def test_sigkill_after_a_checkpoint_then_resume_ends_exactly_where_an_unbroken_run_ends(
        launch_run, tmp_path, tmp_path_factory, optimizer, servers):
    expected = unbroken(launch_run, tmp_path_factory, optimizer, servers)
    directory = tmp_path / "ckpt"
    crash_after_checkpoint(launch_run, tmp_path, directory, optimizer, servers, 20)
    run = run_job(launch_run, 2, servers, MNIST + flags(optimizer) +
                  ["--max-steps", str(STEPS), "--checkpoint-dir", str(directory)])
    assert "resumed from" in run.stderr and "at step 20" in run.stderr
    assert_same_state(expected, final_state(directory))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_one_server_checkpoint_resumes_on_three_servers_exactly(
        launch_run, tmp_path, tmp_path_factory, optimizer):
    expected = unbroken(launch_run, tmp_path_factory, optimizer, 1)
    directory = tmp_path / "ckpt"
    crash_after_checkpoint(launch_run, tmp_path, directory, optimizer, 1, 20)
    run_job(launch_run, 2, 3, MNIST + flags(optimizer) +
            ["--max-steps", str(STEPS), "--checkpoint-dir", str(directory)])
    assert_same_state(expected, final_state(directory))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_two_worker_checkpoint_resumes_on_four_workers_at_half_the_batch(
        launch_run, tmp_path, tmp_path_factory, optimizer):
    """The same global batch in 4 parts: only the order of the float sums changes."""
    expected = unbroken(launch_run, tmp_path_factory, optimizer, 1)
    directory = tmp_path / "ckpt"
    crash_after_checkpoint(launch_run, tmp_path, directory, optimizer, 1, 20)
    run_job(launch_run, 4, 1, MNIST + flags(optimizer, batch_size=16) +
            ["--max-steps", str(STEPS), "--checkpoint-dir", str(directory)])
    assert_same_state(expected, final_state(directory), tolerance=1e-7)


def test_sigterm_to_the_launcher_checkpoints_every_process_and_a_rerun_ends_as_unbroken(
        launch_run, tmp_path, tmp_path_factory):
    expected = unbroken(launch_run, tmp_path_factory, "adam", 1)
    directory, losses = tmp_path / "ckpt", tmp_path / "loss.txt"
    command = MNIST + flags("adam") + ["--max-steps", str(STEPS), "--checkpoint-dir",
                                       str(directory), "--loss-log", str(losses)]
    tag = new_tag()
    run = launch_run(argv(tag, 2, 1, command, "--grace", "60"), tag)
    wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3 or
             run.popen.poll() is not None, "three steps")
    os.kill(run.popen.pid, signal.SIGTERM)
    assert run.finish(DEADLINE_S) == checkpoint_dist.PREEMPTED_EXIT, run.stderr[-4000:]
    assert wait_for_no_tagged(tag) == []
    preempted_at = int((directory / checkpoint_dist.LATEST).read_text().strip()[len("step-"):])
    assert 3 <= preempted_at < STEPS
    run = run_job(launch_run, 2, 1, command)
    assert f"at step {preempted_at}" in run.stderr
    assert_same_state(expected, final_state(directory))


def test_sigkill_while_a_server_writes_its_shard_resumes_from_the_previous_checkpoint(
        launch_run, tmp_path, tmp_path_factory):
    expected = unbroken(launch_run, tmp_path_factory, "sgd", 1)
    directory, marker = tmp_path / "ckpt", tmp_path / "stalled"
    command = MNIST + flags("sgd") + ["--max-steps", str(STEPS), "--checkpoint-dir",
                                      str(directory), "--checkpoint-every", "10"]
    tag = new_tag()
    run = launch_run(argv(tag, 2, 1, command, "--ps-command", STALLED_PS,
                          "--env", "DISTTRAIN_TEST_STALL_AT=20",
                          "--env", f"DISTTRAIN_TEST_MARKER={marker}"), tag)
    wait_for(lambda: marker.exists() or run.popen.poll() is not None, "the stalled shard write")
    assert run.popen.poll() is None, run.popen.communicate()[1][-4000:]
    os.killpg(run.popen.pid, signal.SIGKILL)
    kill_tagged(tag)
    run.popen.communicate()
    assert wait_for_no_tagged(tag) == []
    assert (directory / checkpoint_dist.LATEST).read_text().strip() == "step-000010"
    assert not (directory / "step-000020" / "manifest.json").exists()
    run = run_job(launch_run, 2, 1, command)
    assert "at step 10" in run.stderr
    assert_same_state(expected, final_state(directory))


def test_a_truncated_shard_is_refused_by_name_and_the_run_falls_back(
        launch_run, tmp_path, tmp_path_factory):
    expected = unbroken(launch_run, tmp_path_factory, "sgd", 1)
    directory = tmp_path / "ckpt"
    command = MNIST + flags("sgd") + ["--checkpoint-dir", str(directory), "--checkpoint-every", "10"]
    run_job(launch_run, 2, 1, command + ["--max-steps", "20"])
    shard = directory / "step-000020" / "server-0.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    run = run_job(launch_run, 2, 1, command + ["--max-steps", str(STEPS)])
    assert f"refusing checkpoint step-000020" in run.stderr and str(shard) in run.stderr
    assert "resuming from step-000010" in run.stderr
    assert_same_state(expected, final_state(directory))


def test_export_of_a_distributed_checkpoint_loads_in_one_process_and_in_safetensors(
        launch_run, tmp_path, tmp_path_factory):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import sys
    sys.path.insert(0, os.path.join(ROOT, "workers"))
    import mnist
    expected = unbroken(launch_run, tmp_path_factory, "adam", 1)
    directory = tmp_path / "ckpt"
    run_job(launch_run, 2, 3, MNIST + flags("adam") + ["--max-steps", "5", "--checkpoint-dir",
                                                       str(directory)])
    out = tmp_path / "model.safetensors"
    assert checkpoint_dist.main(["export", str(directory), str(out)]) == 0
    loaded = safetensors_numpy.load_file(str(out))
    model = mnist.mlp()
    model.load_state_dict(loaded)          # strict: exactly the model's names and shapes
    state = checkpoint_dist.full_state(checkpoint_dist.resolve(directory))
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, state[name]["param"])
    assert sorted(loaded) == sorted(expected)


def test_sigterm_preempts_workers_on_remote_hosts_and_a_rerun_resumes_there(
        namespace_hosts, launch_run, tmp_path, tmp_path_factory):
    """The ssh back end's path (each process under launch.guard, stopped by closing its
    stdin), with network namespaces as hosts that share this file system."""
    expected = unbroken(launch_run, tmp_path_factory, "adam", 1)
    directory, losses = tmp_path / "ckpt", tmp_path / "loss.txt"
    command = MNIST + flags("adam") + ["--max-steps", str(STEPS), "--checkpoint-dir",
                                       str(directory), "--loss-log", str(losses)]
    hosts = ["-H", namespace_hosts.host_list([0, 1, 1]), "--remote-cmd", "ip netns exec {host}",
             "--grace", "60"]
    tag = new_tag()
    run = launch_run(argv(tag, 2, 1, command, *hosts), tag)
    wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3 or
             run.popen.poll() is not None, "three steps")
    os.kill(run.popen.pid, signal.SIGTERM)
    assert run.finish(DEADLINE_S) == checkpoint_dist.PREEMPTED_EXIT, run.stderr[-4000:]
    assert wait_for_no_tagged(tag) == []
    run = run_job(launch_run, 2, 1, command, *hosts)
    assert "resumed from" in run.stderr
    assert_same_state(expected, final_state(directory))


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_jobs_checkpoint_on_sigterm_and_resume_each_worker_where_it_was(
        launch_run, tmp_path, mode):
    """No exact reference exists for async runs; what must hold: the preempted job writes one
    complete checkpoint, its shards record the clocks each key has seen, and the rerun resumes
    every worker from the step its own file recorded and finishes."""
    directory, losses = tmp_path / "ckpt", tmp_path / "loss.txt"
    command = MNIST + flags("adam") + ["--mode", mode, "--max-steps", str(STEPS),
                                       "--checkpoint-dir", str(directory), "--loss-log", str(losses)]
    tag = new_tag()
    run = launch_run(argv(tag, 2, 2, command, "--grace", "60"), tag)
    wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3 or
             run.popen.poll() is not None, "three steps")
    os.kill(run.popen.pid, signal.SIGTERM)
    assert run.finish(DEADLINE_S) == checkpoint_dist.PREEMPTED_EXIT, run.stderr[-4000:]
    assert wait_for_no_tagged(tag) == []
    step_dir = checkpoint_dist.resolve(directory)
    manifest = checkpoint_dist.verify(step_dir, roles=("worker", "server"))
    assert (manifest["mode"], manifest["servers"], manifest["workers"]) == (mode, 2, 2)
    steps = [checkpoint_dist.checkpoint.load(step_dir / f"worker-{rank}.safetensors")["step"]
             for rank in range(2)]
    shard = checkpoint_dist.checkpoint.load(step_dir / "server-0.safetensors")
    assert all(sum(clocks["pushes"]) > 0 for clocks in shard["clocks"].values())
    run = run_job(launch_run, 2, 2, command)
    assert f"at step {steps[0]}" in run.stderr and f"at step {steps[1]}" in run.stderr
    assert final_state(directory)
