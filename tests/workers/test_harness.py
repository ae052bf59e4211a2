"""The worker harness's reporting conventions: progress bars as tqdm does them, and the
--tensorboard flag without its optional package."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "workers"))
import harness  # noqa: E402


def test_progress_is_off_with_DISTTRAIN_PROGRESS_0(monkeypatch, capsys):
    monkeypatch.setenv("DISTTRAIN_PROGRESS", "0")
    progress = harness.Progress(10, "lenet rank 0")
    for step in range(1, 11):
        progress.update(step, 32, loss=0.5)
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_progress_on_a_pipe_writes_plain_lines_to_stderr_only(monkeypatch, capsys):
    monkeypatch.delenv("DISTTRAIN_PROGRESS", raising=False)
    progress = harness.Progress(3, "lenet rank 0")   # pytest's captured stderr is no terminal
    for step in range(1, 4):
        progress.update(step, 32, loss=0.5)
    progress.close()
    out, err = capsys.readouterr()
    assert out == ""
    # Not redrawn in place, and not a line per step: only the last step, within 10 s.
    assert "\r" not in err and err.count("\n") == 1 and "3/3" in err


def test_tensorboard_without_tensorboardX_exits_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # makes the import fail
    args = harness.parser("test", epochs=1, batch_size=8, lr=0.1).parse_args(
        ["--tensorboard", "runs"])
    with pytest.raises(SystemExit) as exit_info:
        harness.prepare(args)
    assert "pip install" in str(exit_info.value) and "tensorboardX" in str(exit_info.value)


def test_a_bad_DISTTRAIN_PROGRESS_exits_naming_the_variable_and_value(monkeypatch):
    monkeypatch.setenv("DISTTRAIN_PROGRESS", "off")
    with pytest.raises(SystemExit) as exit_info:
        harness.parser("test", epochs=1, batch_size=8, lr=0.1)
    assert "DISTTRAIN_PROGRESS='off' must be 0 or 1" in str(exit_info.value)
