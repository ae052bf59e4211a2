"""Linear regression by SGD on synthetic data, checked against the closed-form least-squares fit."""
import sys
import time

import numpy as np

import disttrain as dt
import harness
from disttrain import nn
from disttrain.data import DataLoader, TensorDataset
from disttrain.nn import functional as F
from disttrain.parallel import DataParallel


def make_data(n, features, seed):
    """y = x @ w + b + noise with fixed true weights; the same on every worker."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    w = rng.standard_normal((features, 1)).astype(np.float32)
    y = x @ w + 0.5 + 0.1 * rng.standard_normal((n, 1)).astype(np.float32)
    return x, y


def closed_form(x, y):
    """Least-squares weights and bias, solved in float64."""
    design = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
    return solution[:-1].T, solution[-1]


def main(argv=None):
    p = harness.parser(__doc__, epochs=5, batch_size=64, lr=0.05)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--features", type=int, default=16)
    args = p.parse_args(argv)
    harness.prepare(args)
    x, y = make_data(args.samples, args.features, args.seed)
    n_train = int(0.9 * len(x))

    model = nn.Linear(args.features, 1).to(args.device)
    optimizer = dt.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    saved = harness.checkpoints(args)
    with DataParallel(model, optimizer, mode=args.mode, staleness=args.staleness,
                      metrics_dir=args.servers_metrics_dir, checkpoints=saved) as trainer:
        loader = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=args.batch_size,
                            shuffle=True, drop_last=True, seed=args.seed,
                            num_shards=trainer.num_workers, shard_index=trainer.rank)
        # SGD with a constant rate hovers around the optimum; decaying it lands on the fit.
        schedule = dt.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=harness.planned_steps(loader, args))
        position = harness.resume(saved, trainer, model, optimizer, schedule, loader)
        first = position["step"] if position else 0
        last = harness.total_steps(loader, args)
        batches = harness.Batches(loader, first, last, position)
        monitor = harness.Monitor(args, trainer, last, f"linreg rank {trainer.rank}")
        losses, start = [], time.perf_counter()
        for step, (xb, yb) in batches:
            loss = F.mse_loss(model(harness.on_device(xb, args)), harness.on_device(yb, args))
            trainer.zero_grad()
            loss.backward()
            trainer.step()
            schedule.step()
            losses.append(loss.item())
            monitor.step(step + 1, losses[-1], len(xb), shown_loss=np.mean(losses[-20:]))
            if harness.after_step(saved, step + 1, batches, model, optimizer, schedule, last):
                monitor.close()
                return harness.PREEMPTED_EXIT
        monitor.close()
        wall = time.perf_counter() - start

        w_exact, b_exact = closed_form(x[:n_train], y[:n_train])
        with dt.no_grad():
            test_mse = float(F.mse_loss(model(harness.on_device(x[n_train:], args)),
                                        harness.on_device(y[n_train:], args)).item())
        exact_mse = float(np.mean((x[n_train:] @ w_exact.T + b_exact - y[n_train:]) ** 2))
        gap = max(float(np.abs(model.weight.numpy() - w_exact).max()),
                  float(np.abs(model.bias.numpy() - b_exact).max()))
        harness.summary(args, trainer, "linreg",
                        train_loss=float(np.mean(losses[-20:])) if losses else None,
                        test_accuracy=None, test_mse=test_mse, closed_form_test_mse=exact_mse,
                        closed_form_max_abs_gap=gap,
                        samples_per_s=(last - first) * args.batch_size * trainer.num_workers / wall,
                        wall_s=round(wall, 2), steps=last - first)


if __name__ == "__main__":
    sys.exit(main())
