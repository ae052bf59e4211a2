"""Learning-rate schedules with PyTorch's formulas, setting ``optimizer.param_groups[i]["lr"]``;
each is a closed form of the step count, so resumed or nested schedules give exact lrs."""
import math


class LRScheduler:
    """Base: ``step()`` advances ``last_epoch`` by one and sets every group's lr to ``lr_at()``.

    Like torch, constructing a scheduler already takes step 0 (sets lr = lr_at(0)); call
    ``step()`` after each ``optimizer.step()``. Base lrs are the groups' ``initial_lr``, which the
    first scheduler on an optimizer records, so several schedulers agree on them.
    """

    def __init__(self, optimizer, last_epoch=-1):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"{type(self).__name__}: last_epoch={last_epoch} needs 'initial_lr' "
                               f"in every param group (resume from a state_dict instead)")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, epoch, base_lr):
        """The learning rate at step ``epoch`` for a group whose base lr is ``base_lr``."""
        raise NotImplementedError

    def step(self):
        self.last_epoch += 1
        self._set_lrs()

    def _set_lrs(self):
        self._last_lr = [self.lr_at(self.last_epoch, base) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self):
        """The lrs the last ``step()`` set, one per param group."""
        return list(self._last_lr)

    def state_dict(self):
        """Plain values only (no optimizer): enough to continue the schedule where it was."""
        return {key: value for key, value in vars(self).items() if key not in ("optimizer", "_last_lr")}

    def load_state_dict(self, state_dict):
        """Continue from ``state_dict()``; the optimizer's lrs are set to this step's values."""
        for key, value in state_dict.items():
            setattr(self, key, value)
        self._set_lrs()


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` steps: base * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        if int(step_size) != step_size or step_size < 1:
            raise ValueError(f"StepLR: step_size must be a positive integer, got {step_size}")
        self.step_size, self.gamma = int(step_size), gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch, base_lr):
        return base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """eta_min + (base - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 (SGDR without restarts)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        if T_max <= 0:
            raise ValueError(f"CosineAnnealingLR: T_max must be positive, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch, base_lr):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class LinearWarmup(LRScheduler):
    """Linear warm-up from ``start_factor * base`` to ``base`` over ``warmup_steps``, then ``after``.

    Step e < warmup_steps: base * (start_factor + (1 - start_factor) * e / warmup_steps), which is
    torch's ``LinearLR(start_factor, 1.0, total_iters=warmup_steps)``. From then on, the lr is
    ``after``'s schedule counted from the end of warm-up (``after.lr_at(e - warmup_steps)``), as
    torch's ``SequentialLR([LinearLR, after], milestones=[warmup_steps])``; without ``after`` it
    stays at base. Step only the LinearWarmup, not ``after``.
    """

    def __init__(self, optimizer, warmup_steps, start_factor=1.0 / 3, after=None, last_epoch=-1):
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"LinearWarmup: warmup_steps must be a positive integer, got {warmup_steps}")
        if not 0 < start_factor <= 1:
            raise ValueError(f"LinearWarmup: start_factor must be in (0, 1], got {start_factor}")
        if after is not None and after.optimizer is not optimizer:
            raise ValueError("LinearWarmup: 'after' must schedule the same optimizer")
        self.warmup_steps, self.start_factor, self.after = int(warmup_steps), start_factor, after
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch, base_lr):
        if epoch < self.warmup_steps:
            return base_lr * (self.start_factor + (1 - self.start_factor) * epoch / self.warmup_steps)
        if self.after is None:
            return base_lr
        return self.after.lr_at(epoch - self.warmup_steps, base_lr)

    def step(self):
        super().step()
        if self.after is not None:  # keep its own counter meaningful for get_last_lr / state_dict
            self.after.last_epoch = max(self.last_epoch - self.warmup_steps, 0)
            self.after._last_lr = self.get_last_lr()

    def state_dict(self):
        state = super().state_dict()
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        after_state = state_dict.pop("after", None)
        if (after_state is None) != (self.after is None):
            raise ValueError("LinearWarmup.load_state_dict: saved and current 'after' schedules differ "
                             f"(saved {'none' if after_state is None else 'one'}, "
                             f"have {'none' if self.after is None else type(self.after).__name__})")
        if after_state is not None:
            for key, value in after_state.items():
                setattr(self.after, key, value)
        super().load_state_dict(state_dict)
