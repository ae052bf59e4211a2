"""Gradient check of a whole layer: its inputs and every parameter, in float64."""
import numpy as np

from disttrain import ops
from tests.gradcheck import gradcheck


def flat_outputs(result):
    """A layer's output (a tensor or nested tuples of tensors, None skipped) as one 1-D tensor."""
    parts = []

    def collect(item):
        if item is None:
            return
        if isinstance(item, (tuple, list)):
            for sub in item:
                collect(sub)
        else:
            parts.append(item.reshape(-1))
    collect(result)
    return parts[0] if len(parts) == 1 else ops.concat(parts)


def check_layer(module, *inputs, call=None, atol=1e-6, rtol=1e-5):
    """gradcheck of ``call(module, *inputs)`` (default ``module(*inputs)``) with respect to the
    float inputs and every parameter of ``module``, which is converted to float64 first.

    Parameters are swapped for the checker's tensors in the owning modules' registries for
    the duration of each call, so the layer's own forward() is what gets differentiated.
    """
    module.double()
    call = call or (lambda m, *xs: m(*xs))
    owners = []
    for prefix, owner in module.named_modules():
        for name, parameter in owner._parameters.items():
            if parameter is not None:
                owners.append((owner, name, parameter))
    arrays = [p.numpy().copy() for _, _, p in owners]
    assert arrays, f"{type(module).__name__} has no parameters to check"

    def op(*args):
        xs, params = args[:len(inputs)], args[len(inputs):]
        for (owner, name, _), tensor in zip(owners, params):
            owner._parameters[name] = tensor
        try:
            return flat_outputs(call(module, *xs))
        finally:
            for owner, name, original in owners:
                owner._parameters[name] = original

    inputs = [np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x
              for x in inputs]
    return gradcheck(op, *inputs, *arrays, atol=atol, rtol=rtol)
