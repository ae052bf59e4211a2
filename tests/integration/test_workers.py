"""Worker programs run alone as separate processes: summary contract, resumed checkpoints, closed form."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"model", "epochs", "workers", "servers", "mode", "train_loss", "test_accuracy",
                "samples_per_s", "wall_s"}


def run_worker(program, *flags, timeout=240):
    """Run workers/<program> in a fresh process; returns (stdout lines, parsed last line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTTRAIN_")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "workers" / program), "--no-progress", *flags],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{program} failed:\n{result.stderr[-3000:]}"
    lines = result.stdout.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_mnist_prints_the_summary_contract_as_last_stdout_line_and_to_metrics(tmp_path):
    metrics = tmp_path / "metrics.json"
    _, summary = run_worker("mnist.py", "--max-steps", "60", "--metrics", str(metrics))
    assert SUMMARY_KEYS <= set(summary)
    assert summary["model"] == "mlp" and summary["workers"] == 1 and summary["steps"] == 60
    assert json.loads(metrics.read_text()) == summary
    assert 0.5 < summary["test_accuracy"] <= 1.0  # 60 steps of Adam already learn digits


def test_lenet_trains_a_few_steps():
    _, summary = run_worker("mnist.py", "--model", "lenet", "--max-steps", "40", "--batch-size", "32")
    assert summary["model"] == "lenet" and summary["test_accuracy"] > 0.3


def test_resumed_run_continues_the_same_loss_curve(tmp_path):
    """100 steps, checkpoint, a fresh process does 100 more: the losses of an unbroken 200-step run."""
    common = ["--batch-size", "32", "--limit-train", "6400"]  # 200 steps = one epoch
    unbroken, resumed = tmp_path / "unbroken.txt", tmp_path / "resumed.txt"
    run_worker("mnist.py", *common, "--max-steps", "200", "--loss-log", str(unbroken))
    run_worker("mnist.py", *common, "--max-steps", "100", "--checkpoint-dir", str(tmp_path / "ckpt"),
               "--loss-log", str(resumed))
    run_worker("mnist.py", *common, "--max-steps", "200", "--checkpoint-dir", str(tmp_path / "ckpt"),
               "--loss-log", str(resumed))

    def curve(path):
        return [(int(step), float(loss)) for step, loss in (line.split() for line in path.read_text().splitlines())]
    expected, got = curve(unbroken), curve(resumed)
    assert [s for s, _ in got] == list(range(1, 201))
    assert got == expected  # bit-for-bit: same data order, weights, Adam moments and schedule


def test_linreg_reaches_the_closed_form_fit():
    _, summary = run_worker("linreg.py")
    assert summary["model"] == "linreg"
    assert summary["closed_form_max_abs_gap"] < 0.02
    assert summary["test_mse"] < 1.05 * summary["closed_form_test_mse"]


def test_char_lstm_reports_val_loss_and_a_sample():
    lines, summary = run_worker("char_lstm.py", "--max-steps", "6", "--eval-every", "3",
                                "--hidden-size", "32", "--seq-len", "16")
    assert summary["model"] == "char_lstm"
    assert [step for step, _, _ in summary["val_curve"]] == [3, 6]
    assert 0 < summary["val_loss"] < 4.2  # ln(65) = 4.17: no worse than uniform
    assert any(line.startswith("ROMEO:") for line in lines[:-1])  # the generated sample


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch-size", "-1"), ("--lr", "0")])
def test_bad_flags_exit_with_a_message_naming_the_flag(flag, value):
    result = subprocess.run([sys.executable, str(ROOT / "workers" / "mnist.py"), flag, value],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and flag in result.stderr


def launched_summary(launch_run, workers, flags):
    """Run workers/mnist.py under the launcher with 1 server; rank 0's JSON summary."""
    from tests.integration.conftest import PYTHON, new_tag, wait_for_no_tagged

    tag = new_tag()
    run = launch_run([PYTHON, "-m", "launch", "--env", f"DISTTRAIN_TEST_TAG={tag}", "-n", str(workers),
                      "-s", "1", "--", PYTHON, str(ROOT / "workers" / "mnist.py"), "--no-progress", *flags], tag)
    assert run.finish(240) == 0, run.stderr[-3000:]
    assert wait_for_no_tagged(tag) == []
    lines = [line for line in run.stdout.splitlines() if line.startswith("[worker 0] ")]
    return json.loads(lines[-1][len("[worker 0] "):])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_training_converge_on_mnist(launch_run, mode):
    summary = launched_summary(launch_run, 2, ["--mode", mode, "--limit-train", "12800", "--epochs", "1"])
    assert summary["mode"] == mode and summary["workers"] == 2
    assert summary["test_accuracy"] > 0.9, summary  # 200 steps of 2 x 32 examples


@pytest.mark.slow
def test_distributed_resume_starts_from_the_checkpoint_weights(launch_run, tmp_path):
    """2 launched workers: 50 steps, checkpoint, 50 more in a new job == 100 unbroken steps.

    Plain SGD keeps no optimizer state on the servers, so the curves agree up to the order in
    which the server sums the two workers' gradients.
    """
    sgd = ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.05", "--batch-size", "32", "--limit-train", "6400"]

    def launch(*flags):
        launched_summary(launch_run, 2, sgd + list(flags))

    unbroken, resumed, ckpt = tmp_path / "unbroken.txt", tmp_path / "resumed.txt", tmp_path / "ckpt"
    launch("--max-steps", "100", "--loss-log", str(unbroken))
    launch("--max-steps", "50", "--checkpoint-dir", str(ckpt), "--loss-log", str(resumed))
    launch("--max-steps", "100", "--checkpoint-dir", str(ckpt), "--loss-log", str(resumed))

    def curve(path):
        return np.array([float(line.split()[1]) for line in path.read_text().splitlines()])
    expected, got = curve(unbroken), curve(resumed)
    assert len(got) == len(expected) == 100
    np.testing.assert_allclose(got, expected, rtol=1e-4)
