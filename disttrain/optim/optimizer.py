"""Optimizer classes: thin wrappers holding param_groups and per-parameter state around a rule of
``rules.py`` (the arithmetic lives there so that parameter servers run the very same code)."""
import inspect

import numpy as np

from disttrain import backend
from disttrain.optim import rules
from disttrain.tensor import RowSparseGrad


class Optimizer:
    """Base class: ``param_groups`` (dicts with "params" and hyper-parameters) and ``state``.

    ``state`` maps a parameter's index (its position over all groups, in order) to the dict its
    rule keeps; indices are also the keys of ``state_dict()``.
    """

    name = None  # key of the rule in rules.RULES

    def __init__(self, params, defaults):
        """``defaults``: the hyper-parameters, lr first; the subclasses pass their own
        ``__init__``'s arguments (see ``hyper_parameters``), so each is named once, in the signature."""
        self._check_hyper(defaults)
        flags = {name for name, parameter in inspect.signature(type(self).__init__).parameters.items()
                 if isinstance(parameter.default, bool)}
        self.defaults = {key: bool(value) if key in flags else value for key, value in defaults.items()}
        self.param_groups = []
        self.state = {}
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty list of parameters")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a group; hyper-parameters it leaves out take the optimizer's defaults."""
        group = {**self.defaults, **group}
        group["params"] = list(group["params"])
        if not group["params"]:
            raise ValueError(f"{type(self).__name__}: a parameter group has an empty 'params' list")
        self._check_hyper(group)
        known = {id(p) for p in self._parameters()}
        for p in group["params"]:
            if not hasattr(p, "data") or not hasattr(p, "grad"):
                raise TypeError(f"{type(self).__name__}: parameters must be Tensors, got {type(p).__name__}")
            if id(p) in known:
                raise ValueError(f"{type(self).__name__}: a parameter of shape {p.shape} appears twice")
            known.add(id(p))
        self.param_groups.append(group)

    def _check_hyper(self, hyper):
        """Reject values torch.optim rejects, naming them."""
        name = type(self).__name__
        if "lr" in hyper and not hyper["lr"] >= 0:
            raise ValueError(f"{name}: invalid learning rate lr={hyper['lr']} (must be >= 0)")
        for key in ("eps", "weight_decay", "momentum", "lr_decay", "initial_accumulator_value", "alpha"):
            if key in hyper and not hyper[key] >= 0:
                raise ValueError(f"{name}: invalid {key}={hyper[key]} (must be >= 0)")
        if "betas" in hyper:
            betas = tuple(hyper["betas"])
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"{name}: invalid betas={hyper['betas']} (need two values in [0, 1))")

    def _parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def hyper_names(self):
        """The rule's keyword arguments besides lr."""
        return tuple(key for key in self.defaults if key != "lr")

    def hyper(self, group):
        """The rule's keyword arguments for one group (lr included), as plain msgpack-able values."""
        values = {"lr": float(group["lr"])}
        for key in self.hyper_names:
            value = group[key]
            if isinstance(value, (tuple, list)):  # betas
                values[key] = [float(v) for v in value]
            else:
                values[key] = value if isinstance(value, bool) else float(value)
        return values

    def config(self, group=0):
        """``{"name", "hyper"}`` of one group, msgpack-able, so servers can run the same rule."""
        return {"name": self.name, "hyper": self.hyper(self.param_groups[group])}

    def zero_grad(self):
        """Drop every gradient (``grad = None``): the next backward() writes fresh ones."""
        for p in self._parameters():
            p.grad = None

    def step(self):
        """Apply the rule to every parameter that has a gradient; sparse row gradients lazily."""
        rule = rules.RULES[self.name]
        index = 0
        for group in self.param_groups:
            hyper = self.hyper(group)
            for p in group["params"]:
                grad = p.grad
                if grad is not None:
                    state = self.state.setdefault(index, {})
                    if isinstance(grad, RowSparseGrad):
                        rules.apply_rows(rule, p.data, grad.indices, grad.values, state, **hyper)
                    elif getattr(state.get("step"), "ndim", 0) > 0:  # this key was updated lazily
                        rows = backend.array_module(p.data).arange(p.data.shape[0])
                        rules.apply_rows(rule, p.data, rows, grad, state, **hyper)
                    else:
                        rule(p.data, grad, state, **hyper)
                index += 1

    def state_dict(self):
        """``{"state": {index: {name: array | int}}, "param_groups": [{hyper..., "params": [index]}]}``.

        Arrays are the live state arrays (not copies), as in torch; save them with ``dt.save``.
        """
        groups, index = [], 0
        for group in self.param_groups:
            saved = {key: (list(value) if isinstance(value, tuple) else value)
                     for key, value in group.items() if key != "params"}
            saved["params"] = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append(saved)
        return {"state": {index: dict(state) for index, state in self.state.items()},
                "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore from ``state_dict()`` output (keys may be ints or, after ``dt.load``, strings)."""
        name = type(self).__name__
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: {len(groups)} parameter groups saved, "
                             f"this optimizer has {len(self.param_groups)}")
        for saved, group in zip(groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: a saved group has {len(saved['params'])} "
                                 f"parameters, this one has {len(group['params'])}")
        params = self._parameters()
        state = {}
        for key, saved_state in state_dict["state"].items():
            index = int(key)
            if not 0 <= index < len(params):
                raise ValueError(f"{name}.load_state_dict: state for parameter {index}, "
                                 f"but there are only {len(params)}")
            state[index] = {k: _restore(v, params[index], k, name) for k, v in saved_state.items()}
        for saved, group in zip(groups, self.param_groups):
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
        self.state = state


def hyper_parameters(arguments):
    """An optimizer's defaults from the ``locals()`` of its ``__init__``: every argument but
    ``params``, sequences (betas) as tuples, as torch keeps them."""
    return {key: tuple(value) if isinstance(value, (list, tuple)) else value
            for key, value in arguments.items() if key not in ("self", "params", "__class__")}


def _restore(value, param, key, optimizer_name):
    """A saved state entry, copied onto the parameter's device and (for moments) into its dtype."""
    if key == "step":
        if getattr(value, "ndim", 0) == 0:
            return int(value)
        if tuple(value.shape) != param.data.shape[:1]:
            raise ValueError(f"{optimizer_name}.load_state_dict: per-row step of shape {tuple(value.shape)} "
                             f"for a parameter of shape {param.data.shape}")
        return backend.array_module(param.data).asarray(value, dtype=np.int64).copy()
    if tuple(value.shape) != param.data.shape:
        raise ValueError(f"{optimizer_name}.load_state_dict: state {key!r} has shape {tuple(value.shape)}, "
                         f"the parameter has shape {param.data.shape}")
    return backend.array_module(param.data).asarray(value, dtype=param.data.dtype).copy()


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD."""

    name = "sgd"

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"SGD: nesterov needs momentum > 0 and dampening = 0, "
                             f"got momentum={momentum}, dampening={dampening}")
        super().__init__(params, hyper_parameters(locals()))


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight_decay is an L2 term, as torch.optim.Adam."""

    name = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, hyper_parameters(locals()))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW."""

    name = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


class RMSprop(Optimizer):
    """RMSprop (Tieleman & Hinton), optionally centered and with momentum, as torch.optim.RMSprop."""

    name = "rmsprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__(params, hyper_parameters(locals()))


class Adagrad(Optimizer):
    """Adagrad (Duchi et al.) with optional learning-rate decay, as torch.optim.Adagrad."""

    name = "adagrad"

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10):
        super().__init__(params, hyper_parameters(locals()))
