"""Forward + backward time of an MLP and LeNet-5 in disttrain, beside the same models in PyTorch.

Both run on one thread with the same weights and data. Prints ms/step (median of --steps steps
after warm-up) and ends with one JSON line: {"mlp_ratio": ..., "lenet_ratio": ...} (ours / PyTorch).

    python scripts/bench_engine.py [--steps 50] [--warmup 5] [--default-malloc]

By default glibc's malloc is told to keep freed memory for reuse (mallopt, applied once to
the whole process, so to both engines): numpy allocates a fresh array per op result, and
with glibc's default each array over its mmap threshold comes from fresh pages whose first
touch page-faults (a large part of a LeNet step, see docs/performance.md). --default-malloc
skips this.
"""
import os

# One BLAS/OpenMP thread for both engines; must be set before numpy or torch load their BLAS.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import disttrain as dt  # noqa: E402
import disttrain.nn.functional as F  # noqa: E402

try:
    import torch
    import torch.nn.functional as torch_F
    torch.set_num_threads(1)
except ImportError:  # the `bench` extra is not installed: time disttrain alone
    torch = None


def init_weights(shapes, seed):
    """PyTorch-style uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) float32 weights, by name."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in shapes.items():
        weight_shape = shapes[name.replace("bias", "weight")]
        bound = 1 / np.sqrt(int(np.prod(weight_shape[1:])))
        weights[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return weights


MLP_SHAPES = {"fc1.weight": (256, 784), "fc1.bias": (256,), "fc2.weight": (256, 256), "fc2.bias": (256,),
              "fc3.weight": (10, 256), "fc3.bias": (10,)}
LENET_SHAPES = {"conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,), "conv2.weight": (16, 6, 5, 5),
                "conv2.bias": (16,), "fc1.weight": (120, 400), "fc1.bias": (120,),
                "fc2.weight": (84, 120), "fc2.bias": (84,), "fc3.weight": (10, 84), "fc3.bias": (10,)}


def mlp(F, p, x):
    h = F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    return F.linear(h, p["fc3.weight"], p["fc3.bias"])


def lenet(F, p, x):
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])), 2)
    h = h.reshape(h.shape[0], -1)
    h = F.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    return F.linear(h, p["fc3.weight"], p["fc3.bias"])


def time_steps(step, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def bench_disttrain(model, weights, x, y, steps, warmup):
    params = {name: dt.tensor(w, requires_grad=True) for name, w in weights.items()}
    inputs = dt.tensor(x)

    def step():
        for p in params.values():
            p.grad = None
        F.cross_entropy(model(F, params, inputs), y).backward()
    step()
    with dt.no_grad():
        loss = float(F.cross_entropy(model(F, params, inputs), y).data)
    return time_steps(step, steps, warmup), loss, {n: p.grad for n, p in params.items()}


def bench_torch(model, weights, x, y, steps, warmup):
    params = {name: torch.tensor(w, requires_grad=True) for name, w in weights.items()}
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        for p in params.values():
            p.grad = None
        torch_F.cross_entropy(model(torch_F, params, inputs), labels).backward()
    step()
    with torch.no_grad():
        loss = float(torch_F.cross_entropy(model(torch_F, params, inputs), labels))
    return time_steps(step, steps, warmup), loss, {n: p.grad.numpy() for n, p in params.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc malloc's settings alone")
    args = parser.parse_args()
    if args.steps < 20:
        parser.error("--steps must be at least 20")
    tuned = not args.default_malloc and dt.backend.keep_freed_memory()

    rng = np.random.default_rng(0)
    cases = {
        "mlp": (mlp, init_weights(MLP_SHAPES, 1), rng.standard_normal((128, 784)).astype(np.float32),
                rng.integers(0, 10, 128)),
        "lenet": (lenet, init_weights(LENET_SHAPES, 2), rng.standard_normal((64, 1, 28, 28)).astype(np.float32),
                  rng.integers(0, 10, 64)),
    }
    ratios = {}
    print(f"forward+backward, 1 thread, median of {args.steps} steps after {args.warmup} warm-up, "
          f"malloc {'keeps freed memory' if tuned else 'default'}")
    for name, (model, weights, x, y) in cases.items():
        ours, our_loss, our_grads = bench_disttrain(model, weights, x, y, args.steps, args.warmup)
        line = f"{name:6s} disttrain {ours:8.2f} ms/step"
        if torch is not None:
            theirs, their_loss, their_grads = bench_torch(model, weights, x, y, args.steps, args.warmup)
            # Same weights and data must give the same loss and gradients, or the timing is moot.
            worst = max(float(np.abs(our_grads[n] - their_grads[n]).max()) for n in our_grads)
            ratios[f"{name}_ratio"] = round(ours / theirs, 3)
            line += (f"   pytorch {theirs:8.2f} ms/step   ratio {ours / theirs:5.2f}"
                     f"   (loss {our_loss:.5f} vs {their_loss:.5f}, max grad diff {worst:.1e})")
        print(line)
    print(json.dumps({"mlp_ratio": ratios.get("mlp_ratio"), "lenet_ratio": ratios.get("lenet_ratio")}))


if __name__ == "__main__":
    main()
