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


# --- a replacement worker's place in the data --------------------------------------------
def _loader(rank, workers=2):
    import numpy as np
    from disttrain.data import DataLoader, TensorDataset
    data = np.arange(53, dtype=np.float32)[:, None]   # 53: epochs do not divide evenly
    return DataLoader(TensorDataset(data, data), batch_size=4, shuffle=True, drop_last=True,
                      seed=3, num_shards=workers, shard_index=rank)


@pytest.mark.parametrize("clock", [0, 3, 6, 7, 15])
@pytest.mark.parametrize("checkpoint", [None, {"step": 2, "epoch": 0, "start": 16}])
def test_a_replacement_at_clock_c_sees_what_its_predecessor_would_have_from_step_c_on(
        clock, checkpoint, capsys):
    """Batches of an unbroken run from (launch start + c) on equal those of a replacement
    that recovered at clock c, across epoch ends (6 steps per epoch here)."""
    from types import SimpleNamespace
    import disttrain as dt
    first = checkpoint["step"] if checkpoint else 0
    last = first + 20
    unbroken = [(step, x.tolist()) for step, (x, _) in
                harness.Batches(_loader(1), first, last, checkpoint)]
    trainer = SimpleNamespace(recovered_clock=clock, rank=1)
    model = dt.nn.Linear(1, 1)
    optimizer = dt.optim.SGD(model.parameters(), lr=1.0)
    schedule = dt.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)

    class Saved:   # a job that resumed from `checkpoint` at its start
        def resume(self, *args):
            return dict(checkpoint)
    position = harness.resume(Saved() if checkpoint else None, trainer, model, optimizer,
                              schedule, _loader(1))
    assert position["step"] == first + clock
    replacement = [(step, x.tolist()) for step, (x, _) in
                   harness.Batches(_loader(1), position["step"], last, position)]
    assert replacement == unbroken[clock:]
    reference = dt.optim.lr_scheduler.CosineAnnealingLR(
        dt.optim.SGD(dt.nn.Linear(1, 1).parameters(), lr=1.0), T_max=40)
    for _ in range(clock):
        reference.step()
    assert optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
    assert f"continues at step {first + clock}" in capsys.readouterr().err
