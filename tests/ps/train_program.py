"""A tiny worker program for the parameter-server tests: a sparse embedding and a two-layer
net on a fixed synthetic data set, trained through DataParallel; it saves its final
parameters. Run alone it is the single-process reference; under the PS it is one worker."""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import disttrain as dt  # noqa: E402
from disttrain import optim  # noqa: E402
from disttrain.nn.module import Module  # noqa: E402
from disttrain.nn.parameter import Parameter  # noqa: E402
from disttrain.ops.nn import embedding  # noqa: E402
from disttrain.parallel import DataParallel  # noqa: E402

VOCAB, DIM, FEATURES, HIDDEN, OUT = 40, 4, 6, 12, 3


class SparseTable(Module):
    def __init__(self, weight):
        super().__init__()
        self.sparse = True
        self.weight = Parameter(weight)

    def forward(self, indices):
        return embedding(self.weight, indices, sparse=True)


class TinyNet(Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.table = SparseTable(rng.standard_normal((VOCAB, DIM)).astype(np.float32))
        self.w1 = Parameter((rng.standard_normal((DIM + FEATURES, HIDDEN)) * 0.4).astype(np.float32))
        self.b1 = Parameter(np.zeros(HIDDEN, np.float32))
        self.w2 = Parameter((rng.standard_normal((HIDDEN, OUT)) * 0.4).astype(np.float32))
        self.b2 = Parameter(np.zeros(OUT, np.float32))

    def forward(self, tokens, x):
        hidden = dt.tanh(dt.concat([self.table(tokens), x], axis=1) @ self.w1 + self.b1)
        return hidden @ self.w2 + self.b2


def dataset(n, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=n)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    y = np.tanh(x[:, :OUT] * 2 + (tokens[:, None] % 3 == np.arange(OUT))).astype(np.float32)
    return tokens, x, y


def make_optimizer(name, params):
    if name == "sgd":
        return optim.SGD(params, lr=0.1, momentum=0.9)
    return optim.Adam(params, lr=0.01)


def train(optimizer_name="sgd", steps=20, batch=8, mode="sync", staleness=0, sleep=0.0,
          fail=None):
    """Train and return (final parameters by name, losses). Worker r of N takes rows
    [t*N*batch + r*batch, ... + batch) at step t: together they see what one process with
    batch N*batch sees."""
    model = TinyNet()
    optimizer = make_optimizer(optimizer_name, model.parameters())
    losses = []
    with DataParallel(model, optimizer, mode=mode, staleness=staleness) as parallel:
        tokens, x, y = dataset(steps * parallel.num_workers * batch)
        for step in range(steps):
            start = (step * parallel.num_workers + parallel.rank) * batch
            rows = slice(start, start + batch)
            parallel.zero_grad()
            error = model(tokens[rows], dt.tensor(x[rows])) - dt.tensor(y[rows])
            loss = (error * error).mean()
            loss.backward()
            parallel.step()
            losses.append(float(loss.item()))
            print(f"step {step} loss {losses[-1]:.5f}", flush=True)
            if sleep:
                time.sleep(sleep)
            if fail == (parallel.rank, step):
                raise RuntimeError(f"worker {parallel.rank} fails on purpose at step {step}")
        parameters = parallel.state_dict()
    return parameters, losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", default="sync")
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail", help="RANK:STEP: that worker raises after that step")
    parser.add_argument("--out", required=True, help="directory for params-RANK.npz")
    args = parser.parse_args()
    parameters, losses = train(args.optimizer, args.steps, args.batch, args.mode,
                               args.staleness, args.sleep,
                               args.fail and tuple(map(int, args.fail.split(":"))))
    rank = os.environ.get("DISTTRAIN_RANK", "0")
    np.savez(os.path.join(args.out, f"params-{rank}.npz"), losses=np.array(losses), **parameters)


if __name__ == "__main__":
    main()
