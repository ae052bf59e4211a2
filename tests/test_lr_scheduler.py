"""Learning-rate schedules against their formulas and torch.optim.lr_scheduler; resuming."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import checkpoint, optim
from disttrain.optim.lr_scheduler import CosineAnnealingLR, LinearWarmup, StepLR


def _optimizer(lr=0.1, groups=1):
    params = [dt.tensor(np.zeros(2), requires_grad=True) for _ in range(groups)]
    return optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr)


def _lrs(scheduler, steps):
    """The group-0 lr at step 0 (after construction) and after each of ``steps`` step() calls."""
    values = [scheduler.optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        scheduler.step()
        values.append(scheduler.optimizer.param_groups[0]["lr"])
    return values


def test_step_lr_multiplies_by_gamma_every_step_size():
    lrs = _lrs(StepLR(_optimizer(0.1), step_size=3, gamma=0.5), 7)
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


def test_cosine_annealing_follows_half_cosine_from_base_to_eta_min():
    lrs = _lrs(CosineAnnealingLR(_optimizer(0.1), T_max=10, eta_min=0.01), 10)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(11)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.01)


def test_linear_warmup_rises_linearly_then_holds_base():
    lrs = _lrs(LinearWarmup(_optimizer(0.1), warmup_steps=4, start_factor=0.2), 6)
    expected = [0.1 * (0.2 + 0.8 * e / 4) for e in range(4)] + [0.1] * 3
    assert lrs == pytest.approx(expected)


def test_linear_warmup_then_cosine_counts_cosine_from_end_of_warmup():
    opt = _optimizer(0.1)
    scheduler = LinearWarmup(opt, warmup_steps=3, start_factor=0.5, after=CosineAnnealingLR(opt, T_max=5))
    lrs = _lrs(scheduler, 8)
    warmup = [0.1 * (0.5 + 0.5 * e / 3) for e in range(3)]
    cosine = [0.1 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(6)]
    assert lrs == pytest.approx(warmup + cosine)


def test_every_param_group_is_scheduled_from_its_own_base_lr():
    scheduler = StepLR(_optimizer(0.1, groups=2), step_size=1, gamma=0.1)
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.01, 0.02])


def test_schedules_match_torch_lr_scheduler():
    torch = pytest.importorskip("torch")

    def torch_lrs(make, steps=12):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        scheduler = make(opt)
        values = [opt.param_groups[0]["lr"]]
        for _ in range(steps):
            opt.step()
            scheduler.step()
            values.append(opt.param_groups[0]["lr"])
        return values

    schedules = torch.optim.lr_scheduler
    assert _lrs(StepLR(_optimizer(), 4, gamma=0.3), 12) == pytest.approx(
        torch_lrs(lambda o: schedules.StepLR(o, 4, gamma=0.3)))
    assert _lrs(CosineAnnealingLR(_optimizer(), 7, eta_min=0.001), 12) == pytest.approx(
        torch_lrs(lambda o: schedules.CosineAnnealingLR(o, 7, eta_min=0.001)))
    ours = _optimizer()
    assert _lrs(LinearWarmup(ours, 5, start_factor=0.25, after=CosineAnnealingLR(ours, 6)), 12) == pytest.approx(
        torch_lrs(lambda o: schedules.SequentialLR(
            o, [schedules.LinearLR(o, start_factor=0.25, total_iters=5), schedules.CosineAnnealingLR(o, 6)],
            milestones=[5])))


def test_resumed_scheduler_continues_the_same_lrs_through_a_checkpoint(tmp_path):
    def make(opt):
        return LinearWarmup(opt, 3, after=StepLR(opt, 2, gamma=0.5))

    straight = _lrs(make(_optimizer()), 9)
    first = make(_optimizer())
    _lrs(first, 4)
    path = tmp_path / "schedule.safetensors"
    checkpoint.save({"scheduler": first.state_dict()}, path)
    saved = checkpoint.load(path)["scheduler"]  # plain values only: they survive a checkpoint
    resumed_opt = _optimizer()
    resumed = make(resumed_opt)
    resumed.load_state_dict(saved)
    assert [resumed_opt.param_groups[0]["lr"]] + _lrs(resumed, 5)[1:] == pytest.approx(straight[4:])


@pytest.mark.parametrize("make,message", [
    (lambda o: StepLR(o, step_size=0), "step_size.*0"),
    (lambda o: CosineAnnealingLR(o, T_max=0), "T_max.*0"),
    (lambda o: LinearWarmup(o, warmup_steps=2, start_factor=0.0), "start_factor.*0.0"),
], ids=["step-size-zero", "t-max-zero", "start-factor-zero"])
def test_invalid_schedule_arguments_raise_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make(_optimizer())
