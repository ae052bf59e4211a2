"""Fused or composed? Forward + backward time of element-wise ops written both ways.

An op earns its own gradient rule only where it is measurably faster than the same function
composed from existing ops (STYLE.md). For each candidate this times the one-node fused form
(kept here as the reference, whichever form the library ships; cross_entropy's is the
library's) against the composed form,
in alternating rounds, and prints the median ratio composed / fused per input size.

    python scripts/bench_ops.py [--rounds 15] [--number 20]
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import timeit  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import disttrain as dt  # noqa: E402
from disttrain import ops  # noqa: E402
from disttrain.ops.operands import binary, xp_of  # noqa: E402
from disttrain.tensor import Tensor  # noqa: E402

# --- the fused forms: one graph node with a hand-written gradient -------------------------


def fused_minimum(a, b):
    a, b = binary("minimum", a, b)
    a_wins = a.data <= b.data
    return Tensor.from_op(np.where(a_wins, a.data, b.data), (a, b),
                          lambda g: (g * a_wins, g * ~a_wins))


def fused_leaky_relu(x, negative_slope=0.01):
    slope = np.where(x.data > 0, 1, negative_slope).astype(x.dtype)
    return Tensor.from_op(x.data * slope, (x,), lambda g: (g * slope,))


def fused_softplus(x):
    xp = xp_of(x)
    e = xp.exp(-xp.abs(x.data))
    out = xp.maximum(x.data, 0) + xp.log1p(e)
    return Tensor.from_op(out, (x,), lambda g: (g * (xp.maximum(e, x.data >= 0) / (1 + e)),))


def fused_clip(x, a_min=None, a_max=None):
    inside = np.ones(x.shape, bool)
    if a_min is not None:
        inside &= x.data >= a_min
    if a_max is not None:
        inside &= x.data <= a_max
    return Tensor.from_op(np.clip(x.data, a_min, a_max), (x,), lambda g: (g * inside,))


# --- the composed forms: built from ops that already have gradients -----------------------


def composed_minimum(a, b):
    return ops.where(ops.compare(a, b, "less_equal"), a, b)


def composed_leaky_relu(x, negative_slope=0.01):
    return ops.where(x.data > 0, x, x * negative_slope)


def composed_softplus(x):
    # log1p is not an op, so log(1 + e) stands in (less accurate for large |x|).
    return ops.relu(x) + ops.log(1 + ops.exp(-ops.abs(x)))


def composed_clip(x, a_min=None, a_max=None):
    if a_min is not None:
        x = ops.maximum(x, a_min)
    if a_max is not None:
        x = ops.minimum(x, a_max)
    return x


def composed_cross_entropy(logits, labels):
    """Mean negative log-likelihood picked from log_softmax: three graph nodes."""
    picked = ops.log_softmax(logits, axis=1)[np.arange(len(labels)), labels]
    return -ops.mean(picked)


ACTIVATIONS = {"mlp hidden (128, 256)": (128, 256), "lenet conv1 (64, 6, 28, 28)": (64, 6, 28, 28)}
LOGITS = {"mnist logits (32, 10)": (32, 10), "char-lstm logits (2048, 65)": (2048, 65)}
# name: (fused form, composed form, number of tensor inputs, the input shapes to time)
CANDIDATES = {
    "minimum": (fused_minimum, composed_minimum, 2, ACTIVATIONS),
    "leaky_relu": (fused_leaky_relu, composed_leaky_relu, 1, ACTIVATIONS),
    "softplus": (fused_softplus, composed_softplus, 1, ACTIVATIONS),
    "clip": (lambda x: fused_clip(x, -1.0, 1.0), lambda x: composed_clip(x, -1.0, 1.0), 1, ACTIVATIONS),
    "cross_entropy": (ops.cross_entropy, composed_cross_entropy, 1, LOGITS),
}


def step_of(function, inputs):
    def step():
        for t in inputs:
            t.grad = None
        function(*inputs).sum().backward()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating fused/composed rounds")
    parser.add_argument("--number", type=int, default=20, help="steps timed per round")
    args = parser.parse_args()
    dt.backend.keep_freed_memory()
    rng = np.random.default_rng(0)
    results = {}
    print(f"forward+backward, float32, 1 thread; median over {args.rounds} alternating rounds "
          f"of {args.number} steps")
    for op_name, (fused, composed, arity, shapes) in CANDIDATES.items():
        for shape_name, shape in shapes.items():
            inputs = [dt.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
                      for _ in range(arity)]
            if op_name == "cross_entropy":  # the labels are a constant second argument
                labels = rng.integers(0, shape[1], shape[0])
                fused, composed = (functools.partial(f, labels=labels) for f in CANDIDATES[op_name][:2])
            steps = {"fused": step_of(fused, inputs), "composed": step_of(composed, inputs)}
            times = {"fused": [], "composed": []}
            for step in steps.values():
                step()  # warm-up
            for round_ in range(args.rounds):
                order = ("fused", "composed") if round_ % 2 == 0 else ("composed", "fused")
                for form in order:
                    times[form].append(timeit.timeit(steps[form], number=args.number) / args.number)
            ratios = [c / f for c, f in zip(times["composed"], times["fused"])]
            ratio = statistics.median(ratios)
            fused_us = statistics.median(times["fused"]) * 1e6
            composed_us = statistics.median(times["composed"]) * 1e6
            print(f"{op_name:13s} {shape_name:28s} fused {fused_us:9.1f} us   composed {composed_us:9.1f} us"
                  f"   composed/fused {ratio:5.2f}")
            results[f"{op_name} {shape_name}"] = round(ratio, 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
