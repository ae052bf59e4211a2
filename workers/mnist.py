"""Train an MLP (784-256-256-10) or LeNet-5 on MNIST; alone, or as one worker of a launched job."""
import os
import sys
import time

import numpy as np

import disttrain as dt
import harness
from disttrain import nn
from disttrain.data import DataLoader, TensorDataset, load_mnist
from disttrain.nn import functional as F
from disttrain.parallel import DataParallel

MEAN, STD = 0.1307, 0.3081


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def images(x):
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28)."""
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def accuracy(model, x, y, args, batch_size=1000):
    model.eval()
    correct = 0
    with dt.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(harness.on_device(x[i:i + batch_size], args))
            correct += int((dt.backend.to_numpy(logits.data).argmax(axis=1) == y[i:i + batch_size]).sum())
    model.train()
    return correct / len(x)


def main(argv=None):
    p = harness.parser(__doc__, epochs=1, batch_size=32, lr=0.002)
    p.add_argument("--model", choices=["mlp", "lenet"], default="mlp")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--momentum", type=float, default=0.9, help="for --optimizer sgd")
    args = p.parse_args(argv)
    harness.prepare(args)

    data_dir = os.path.join(args.data_dir, "mnist")
    x_train, y_train = load_mnist(data_dir, "train")
    x_test, y_test = load_mnist(data_dir, "test")
    if args.limit_train:
        x_train, y_train = x_train[:args.limit_train], y_train[:args.limit_train]
    x_train, x_test = images(x_train), images(x_test)
    y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)

    model = (mlp() if args.model == "mlp" else lenet()).to(args.device)
    if args.optimizer == "adam":
        optimizer = dt.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = dt.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    saved = harness.checkpoints(args)
    with DataParallel(model, optimizer, mode=args.mode, staleness=args.staleness,
                      checkpoints=saved) as trainer:
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True,
                            drop_last=True, seed=args.seed, num_shards=trainer.num_workers,
                            shard_index=trainer.rank)
        last = harness.total_steps(loader, args)
        # Decaying the rate to zero over the run is worth ~1% test accuracy after one epoch.
        schedule = dt.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=harness.planned_steps(loader, args))
        position = harness.resume(saved, trainer, model, optimizer, schedule)
        first = position["step"] if position else 0
        batches = harness.Batches(loader, first, last, position)
        progress = harness.Progress(last, f"{args.model} rank {trainer.rank}", not args.no_progress)
        losses, loss_log, start = [], harness.LossLog(args, trainer), time.perf_counter()
        for step, (x, y) in batches:
            loss = F.cross_entropy(model(harness.on_device(x, args)), y)
            trainer.zero_grad()
            loss.backward()
            trainer.step()
            schedule.step()
            losses.append(loss.item())
            loss_log.write(step + 1, losses[-1])
            progress.update(step + 1, len(x), loss=np.mean(losses[-50:]))
            if harness.after_step(saved, step + 1, batches, model, optimizer, schedule, last):
                return harness.PREEMPTED_EXIT
        progress.close()
        loss_log.close()
        wall = time.perf_counter() - start
        trained = (last - first) * args.batch_size * trainer.num_workers
        harness.summary(args, trainer, args.model,
                        train_loss=float(np.mean(losses[-len(loader) // 10 or 1:])) if losses else None,
                        test_accuracy=accuracy(model, x_test, y_test, args),
                        samples_per_s=trained / wall if wall > 0 else None,
                        wall_s=round(wall, 2), steps=last - first)


if __name__ == "__main__":
    sys.exit(main())
