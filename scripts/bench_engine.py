"""Forward + backward time of the worker programs' models in disttrain, beside the same models in PyTorch.

MLP, LeNet-5 and softmax regression (functional forms below), and the modules of
workers/mnist.py --model resnet, workers/char_lstm.py and workers/word2vec.py (PyTorch twins
below, weights copied by name). Both run on one thread with the same weights and data, and the
batch of the worker program (MLP 128, LeNet-5 64). Prints ms/step (median of --steps steps
after warm-up) and ends with one JSON line: {"mlp_ratio": ..., "lenet_ratio": ...,
"softmax_ratio", "resnet_ratio", "lstm_ratio", "word2vec_ratio"} (ours / PyTorch).

    python scripts/bench_engine.py [--steps 50] [--warmup 5] [--models resnet,word2vec] [--default-malloc]

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "workers"))
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


SOFTMAX_SHAPES = {"fc.weight": (10, 784), "fc.bias": (10,)}


def softmax(F, p, x):
    return F.linear(x, p["fc.weight"], p["fc.bias"])


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


# --- the module cases: our worker's model beside a PyTorch twin with the same names ----------
def torch_twins():
    """{case: PyTorch module class} for the module cases, built only when torch is there."""
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, in_channels, out_channels, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            self.bn1 = nn.BatchNorm2d(out_channels)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride)
                             if stride != 1 or in_channels != out_channels else None)

        def forward(self, x):
            y = torch_F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch_F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.MaxPool2d(2))
            self.stages = nn.Sequential(Residual(16, 16), Residual(16, 32, stride=2),
                                        Residual(32, 64, stride=2))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.stages(self.stem(x)).mean((2, 3)))

    class CharLSTM(nn.Module):
        def __init__(self, vocab_size, embed_dim, hidden_size):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim)
            self.lstm = nn.LSTM(embed_dim, hidden_size, batch_first=True)
            self.head = nn.Linear(hidden_size, vocab_size)

        def forward(self, ids):
            out, _ = self.lstm(self.embed(ids))
            return self.head(out), None

    class SkipGram(nn.Module):
        def __init__(self, vocab_size, dim):
            super().__init__()
            self.centre = nn.Embedding(vocab_size, dim, sparse=True)
            self.context = nn.Embedding(vocab_size, dim, sparse=True)

        def forward(self, centres, rows):
            return (self.context(rows) * self.centre(centres)[:, None, :]).sum(-1)

    return {"resnet": ResNet, "lstm": CharLSTM, "word2vec": SkipGram}


def module_cases(rng):
    """{case: (our module, twin's constructor arguments, inputs, loss(F, output))}."""
    import char_lstm
    import mnist
    import word2vec
    vocab, embed, hidden, seq, batch = 65, 64, 256, 64, 32   # char_lstm.py's defaults
    words, dim, pairs, negatives = 5003, 100, 128, 5         # word2vec.py's defaults
    digits = rng.integers(0, 10, 32)
    next_chars = rng.integers(0, vocab, (batch, seq)).reshape(-1)
    labels = word2vec.labels(pairs, negatives)
    skipgram = word2vec.SkipGram(words, dim)
    # Trained-looking context rows (word2vec starts them at zero, which makes the scores trivial).
    skipgram.context.weight.data[...] = rng.standard_normal((words, dim)).astype(np.float32) * 0.1
    return {
        "resnet": (mnist.ResNet(), (), [rng.standard_normal((32, 1, 28, 28)).astype(np.float32)],
                   lambda F, out: F.cross_entropy(out, digits if F is not torch_F else torch.from_numpy(digits))),
        "lstm": (char_lstm.CharLSTM(vocab, embed, hidden), (vocab, embed, hidden),
                 [rng.integers(0, vocab, (batch, seq))],
                 lambda F, out: F.cross_entropy(out[0].reshape(-1, vocab), next_chars if F is not torch_F
                                                else torch.from_numpy(next_chars))),
        "word2vec": (skipgram, (words, dim),
                     [rng.integers(0, words, pairs), rng.integers(0, words, (pairs, 1 + negatives))],
                     lambda F, out: F.binary_cross_entropy_with_logits(
                         out, labels if F is not torch_F else torch.from_numpy(labels),
                         reduction="sum") / pairs),
    }


def bench_module(ours, twin, inputs, loss, steps, warmup):
    """ms/step of each engine, both losses and the largest gradient difference (None without torch)."""
    params = dict(ours.named_parameters())
    ours_inputs = [dt.tensor(x) for x in inputs]

    def our_step():
        for p in params.values():
            p.grad = None
        loss(F, ours(*ours_inputs)).backward()
    our_step()
    grads = {n: p.grad.to_dense() if hasattr(p.grad, "to_dense") else p.grad for n, p in params.items()}
    with dt.no_grad():
        our_loss = float(loss(F, ours(*ours_inputs)).data)
    ours_ms = time_steps(our_step, steps, warmup)
    if twin is None:
        return ours_ms, None, our_loss, None, None
    with torch.no_grad():
        for name, value in ours.state_dict().items():
            if np.asarray(value).dtype.kind == "f":   # weights and running statistics
                twin.state_dict()[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    twin_inputs = [torch.from_numpy(x) for x in inputs]
    twin_params = dict(twin.named_parameters())

    def their_step():
        for p in twin_params.values():
            p.grad = None
        loss(torch_F, twin(*twin_inputs)).backward()
    their_step()
    worst = max(float(np.abs(grads[n] - (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy()).max())
                for n, p in twin_params.items())
    with torch.no_grad():
        their_loss = float(loss(torch_F, twin(*twin_inputs)))
    return ours_ms, time_steps(their_step, steps, warmup), our_loss, their_loss, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default="mlp,lenet,softmax,resnet,lstm,word2vec",
                        help="comma-separated rows to run (default: all)")
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
        "softmax": (softmax, init_weights(SOFTMAX_SHAPES, 3),
                    rng.standard_normal((32, 784)).astype(np.float32), rng.integers(0, 10, 32)),
    }
    ratios = {}
    print(f"forward+backward, 1 thread, median of {args.steps} steps after {args.warmup} warm-up, "
          f"malloc {'keeps freed memory' if tuned else 'default'}")
    chosen = set(args.models.split(","))
    for name, (model, weights, x, y) in cases.items():
        if name not in chosen:
            continue
        ours, our_loss, our_grads = bench_disttrain(model, weights, x, y, args.steps, args.warmup)
        line = f"{name:8s} disttrain {ours:8.2f} ms/step"
        if torch is not None:
            theirs, their_loss, their_grads = bench_torch(model, weights, x, y, args.steps, args.warmup)
            # Same weights and data must give the same loss and gradients, or the timing is moot.
            worst = max(float(np.abs(our_grads[n] - their_grads[n]).max()) for n in our_grads)
            ratios[f"{name}_ratio"] = round(ours / theirs, 3)
            line += (f"   pytorch {theirs:8.2f} ms/step   ratio {ours / theirs:5.2f}"
                     f"   (loss {our_loss:.5f} vs {their_loss:.5f}, max grad diff {worst:.1e})")
        print(line)
    dt.manual_seed(0)
    twins = torch_twins() if torch is not None else {}
    for name, (ours, twin_args, inputs, loss) in module_cases(rng).items():
        if name not in chosen:
            continue
        twin = twins[name](*twin_args) if twins else None
        ours_ms, theirs, our_loss, their_loss, worst = bench_module(ours, twin, inputs, loss,
                                                                    args.steps, args.warmup)
        line = f"{name:8s} disttrain {ours_ms:8.2f} ms/step"
        if theirs is not None:
            ratios[f"{name}_ratio"] = round(ours_ms / theirs, 3)
            line += (f"   pytorch {theirs:8.2f} ms/step   ratio {ours_ms / theirs:5.2f}"
                     f"   (loss {our_loss:.5f} vs {their_loss:.5f}, max grad diff {worst:.1e})")
        print(line, flush=True)
    print(json.dumps({f"{name}_ratio": ratios.get(f"{name}_ratio")
                      for name in ("mlp", "lenet", "softmax", "resnet", "lstm", "word2vec")}))


if __name__ == "__main__":
    main()
