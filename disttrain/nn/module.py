"""Module: the container that registers sub-modules, parameters and buffers by attribute.

The dotted names it gives them ("features.0.weight") are the state-dict keys and the
parameter-server keys, so their order and spelling follow PyTorch exactly.
"""
from collections import OrderedDict

import numpy as np

from disttrain import backend
from disttrain.nn.parameter import Parameter
from disttrain.tensor import RowSparseGrad, Tensor, _HookHandle


class Module:
    """Base class of every layer: assign ``Parameter``s and ``Module``s as attributes in
    ``__init__`` and they are found by ``named_parameters()``, ``state_dict()`` and friends."""

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dictionaries to exist already.
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        for hook in self.__dict__.get("_forward_pre_hooks", ()):
            hook(self, args)
        return self.forward(*args, **kwargs)

    def register_forward_pre_hook(self, hook):
        """Call ``hook(module, args)`` before every ``forward()`` (its return value is ignored);
        the returned handle's ``remove()`` takes it off again."""
        hooks = self.__dict__.setdefault("_forward_pre_hooks", [])
        hooks.append(hook)
        return _HookHandle(hooks, hook)

    # --- registration ---------------------------------------------------------------------
    def __setattr__(self, name, value):
        parameters = self.__dict__.get("_parameters")
        if isinstance(value, (Parameter, Module)) and parameters is None:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() has run; "
                                 f"call super().__init__() first in {type(self).__name__}.__init__")
        if isinstance(value, Parameter):
            self._forget(name)
            parameters[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._modules[name] = value
        elif parameters is not None and name in parameters:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} of "
                                f"{type(self).__name__}: expected a Parameter or None")
            parameters[name] = None
        elif parameters is not None and name in self._modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to sub-module {name!r} of "
                                f"{type(self).__name__}: expected a Module or None")
            self._modules[name] = None
        elif parameters is not None and name in self._buffers:
            self._buffers[name] = _as_buffer(name, value)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only called when normal lookup fails: parameters, buffers and modules live in dicts.
        for registry in ("_parameters", "_buffers", "_modules"):
            found = self.__dict__.get(registry)
            if found is not None and name in found:
                return found[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if not self._forget(name):
            object.__delattr__(self, name)

    def _forget(self, name):
        """Remove ``name`` from every registry (and the plain attributes); True if it was registered."""
        found = False
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                found = True
        self.__dict__.pop(name, None)
        return found

    def register_parameter(self, name, parameter):
        """Register ``parameter`` (a Parameter, or None for an absent one such as a disabled bias)."""
        if parameter is not None and not isinstance(parameter, Parameter):
            raise TypeError(f"register_parameter({name!r}): expected a Parameter or None, "
                            f"got {type(parameter).__name__}")
        self._forget(name)
        self._parameters[name] = parameter

    def register_buffer(self, name, value):
        """Register state that is saved in ``state_dict()`` but is not trained (e.g. running means).

        Buffers are not in ``named_parameters()``: those names are the parameter-server keys.
        """
        self._forget(name)
        self._buffers[name] = _as_buffer(name, value)

    def add_module(self, name, module):
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module({name!r}): expected a Module or None, got {type(module).__name__}")
        self._forget(name)
        self._modules[name] = module

    # --- traversal ------------------------------------------------------------------------
    def named_modules(self, prefix="", memo=None):
        """(dotted name, module) for this module and every descendant, each module once."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None:
                yield from module.named_modules(dotted(prefix, name), memo)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_children(self):
        seen = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self):
        for _, module in self.named_children():
            yield module

    def _named_members(self, registry, prefix="", recurse=True):
        """(dotted name, tensor) from the given registry of every module; shared tensors once."""
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for module_prefix, module in modules:
            for name, value in getattr(module, registry).items():
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                yield dotted(module_prefix, name), value

    def named_parameters(self, prefix="", recurse=True):
        """(dotted name, Parameter) pairs: "features.0.weight" - the parameter-server keys."""
        return self._named_members("_parameters", prefix, recurse)

    def parameters(self, recurse=True):
        for _, parameter in self.named_parameters(recurse=recurse):
            yield parameter

    def named_buffers(self, prefix="", recurse=True):
        return self._named_members("_buffers", prefix, recurse)

    def buffers(self, recurse=True):
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    def apply(self, function):
        """Call ``function(module)`` on every descendant, then on this module; returns self."""
        for module in self.children():
            module.apply(function)
        function(self)
        return self

    # --- state ----------------------------------------------------------------------------
    def _state_tensors(self):
        """name -> tensor for every parameter and buffer: module by module, parameters first."""
        tensors = OrderedDict()
        for prefix, module in self.named_modules():
            for registry in (module._parameters, module._buffers):
                for name, value in registry.items():
                    if value is not None:
                        tensors[dotted(prefix, name)] = value
        return tensors

    def state_dict(self):
        """name -> numpy array copy of every parameter and buffer (module by module, in order)."""
        return OrderedDict((name, backend.to_numpy(value.data).copy())
                           for name, value in self._state_tensors().items())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters and buffers named by ``state_dict`` (in place).

        With ``strict`` every key must match exactly; any missing or unexpected key raises a
        KeyError listing them all. A shape mismatch always raises a ValueError naming the key.
        Returns ``(missing_keys, unexpected_keys)``.
        """
        own = self._state_tensors()
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if strict and (missing or unexpected):
            problems = []
            if missing:
                problems.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                problems.append(f"unexpected keys: {', '.join(unexpected)}")
            raise KeyError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems))
        mismatched = []
        for key, target in own.items():
            if key in state_dict:
                source = state_dict[key]
                source_shape = tuple(source.shape) if hasattr(source, "shape") else np.shape(source)
                if source_shape != tuple(target.shape):
                    mismatched.append(f"{key}: checkpoint has shape {source_shape}, "
                                      f"the model has {tuple(target.shape)}")
        if mismatched:
            raise ValueError(f"load_state_dict into {type(self).__name__}: shape mismatch for "
                             + "; ".join(mismatched))
        for key, target in own.items():
            if key in state_dict:
                source = state_dict[key]
                source = source.data if isinstance(source, Tensor) else source
                xp = backend.array_module(target.data)
                target.data[...] = xp.asarray(backend.to_numpy(source) if xp is np else source,
                                              dtype=target.dtype)
        return missing, unexpected

    # --- modes, gradients, dtype and device ---------------------------------------------
    def train(self, mode=True):
        """Training mode (Dropout drops, BatchNorm uses batch statistics); returns self."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self):
        """Evaluation mode: Dropout is the identity, BatchNorm uses its running statistics."""
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """Clear every parameter's gradient (to None by default, which costs no memory)."""
        for parameter in self.parameters():
            if set_to_none or isinstance(parameter.grad, RowSparseGrad):
                parameter.grad = None
            elif parameter.grad is not None:
                parameter.grad[...] = 0

    def requires_grad_(self, requires_grad=True):
        for parameter in self.parameters():
            parameter.requires_grad = requires_grad
        return self

    def _apply(self, convert):
        """Replace the array of every parameter and buffer by ``convert(array)`` (in place) and
        drop their gradients; returns self. astype() and to() are this one traversal."""
        for module in self.modules():
            for registry in (module._parameters, module._buffers):
                for value in registry.values():
                    if value is not None:
                        value.data = convert(value.data)
                        value.grad = None
        return self

    def astype(self, dtype):
        """Convert every floating parameter and buffer to ``dtype`` (in place); returns self.

        Gradients are dropped. Used e.g. to run gradient checks in float64.
        """
        return self._apply(lambda data: data.astype(dtype) if data.dtype.kind == "f" else data)

    def double(self):
        return self.astype(np.float64)

    def float(self):
        return self.astype(np.float32)

    def to(self, device):
        """Move every parameter and buffer to 'cpu' or 'cuda:N' (in place); returns self."""
        return self._apply(lambda data: backend.to_device(data, device))

    # --- printing -------------------------------------------------------------------------
    def extra_repr(self):
        """The arguments shown between the parentheses of this module's repr."""
        return ""

    def __repr__(self):
        lines = []
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"({name}): {child}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers) | set(self._modules))


def dotted(prefix, name):
    """The dotted name of ``name`` inside ``prefix`` ("features.0" + "weight"); a top-level
    name has no prefix. These names are the state-dict and parameter-server keys."""
    return f"{prefix}.{name}" if prefix else name


def _as_buffer(name, value):
    """Buffers are non-trainable Tensors (or None); arrays are wrapped."""
    if value is None or isinstance(value, Tensor):
        if isinstance(value, Parameter):
            raise TypeError(f"buffer {name!r}: got a Parameter; register it with register_parameter")
        return value
    return Tensor(np.asarray(value))


class _ModuleSequence(Module):
    """What Sequential and ModuleList share: sub-modules in order, numbered "0", "1", ..."""

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        self.add_module(str(len(self)), module)
        return self


class Sequential(_ModuleSequence):
    """Modules applied one after another; sub-modules are named "0", "1", ... (or by an OrderedDict)."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, module in modules[0].items():
                self.add_module(name, module)
        else:
            for index, module in enumerate(modules):
                self.add_module(str(index), module)

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def __getitem__(self, index):
        modules = list(self._modules.items())
        if isinstance(index, slice):
            return Sequential(OrderedDict(modules[index]))
        return modules[_checked_index(index, len(modules), "Sequential")][1]


class ModuleList(_ModuleSequence):
    """A list of modules whose parameters are registered (named "0", "1", ...); no forward()."""

    def __init__(self, modules=()):
        super().__init__()
        self.extend(modules)

    def __getitem__(self, index):
        modules = list(self._modules.values())
        if isinstance(index, slice):
            return ModuleList(modules[index])
        return modules[_checked_index(index, len(modules), "ModuleList")]

    def __setitem__(self, index, module):
        index = _checked_index(index, len(self), "ModuleList")
        self.add_module(str(index), module)


    def extend(self, modules):
        for module in modules:
            self.append(module)
        return self

    def insert(self, index, module):
        modules = list(self._modules.values())
        modules.insert(index, module)
        self._modules.clear()
        for position, item in enumerate(modules):
            self.add_module(str(position), item)


def _checked_index(index, length, owner):
    if not -length <= index < length:
        raise IndexError(f"{owner} index {index} is out of range for {length} modules")
    return index % length
