"""Worker programs run alone as separate processes: summary contract, resumed checkpoints, closed form."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
