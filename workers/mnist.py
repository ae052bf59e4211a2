"""Train softmax regression, an MLP (784-256-256-10), LeNet-5 or a small ResNet on MNIST; alone,
or as one worker of a launched job."""
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


def softmax():
    """Multinomial logistic regression: one linear layer, the softmax in the loss."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


class Residual(nn.Module):
    """D2L's residual block: two 3x3 convolutions with BatchNorm, the input added back before
    the last ReLU (through a 1x1 convolution where the shape changes)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet(nn.Module):
    """A small ResNet for 28x28 digits, D2L's layout scaled down:
    stem 3x3 conv 16 + BN + ReLU + 2x2 max-pool (28 -> 14), then one residual block per stage
    of 16 (14x14), 32 (stride 2, 7x7) and 64 (stride 2, 4x4) channels, global average pool,
    linear 64 -> 10. Pooling in the stem keeps a step ~4x cheaper than stages at 28x28."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.stages = nn.Sequential(Residual(16, 16), Residual(16, 32, stride=2),
                                    Residual(32, 64, stride=2))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean(axis=(2, 3)))


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def images(x):
    """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28)."""
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def shifted(x, rng, pixels=2):
    """Each image moved by a random whole-pixel offset in -pixels..pixels per axis, the border
    filled with the background value (data augmentation)."""
    n, _, h, w = x.shape
    background = -MEAN / STD
    padded = np.pad(x, ((0, 0), (0, 0), (pixels, pixels), (pixels, pixels)), constant_values=background)
    dy, dx = rng.integers(0, 2 * pixels + 1, size=(2, n))
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(n)[:, None, None], 0, rows, cols][:, None]


def accuracy(model, x, y, args, batch_size=1000):
    model.eval()
    correct = 0
    with dt.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(harness.on_device(x[i:i + batch_size], args))
            correct += int((dt.backend.to_numpy(logits.data).argmax(axis=1) == y[i:i + batch_size]).sum())
    model.train()
    return correct / len(x)


MODELS = {"softmax": softmax, "mlp": mlp, "lenet": lenet, "resnet": ResNet}
# Per-model (--shift pixels, --label-smoothing) defaults: what took LeNet-5 and the ResNet
# past their targets (README lists the runs with and without them).
REGULARISATION = {"lenet": (1, 0.1), "resnet": (1, 0.1)}


def main(argv=None):
    p = harness.parser(__doc__, epochs=1, batch_size=32, lr=0.002)
    p.add_argument("--model", choices=sorted(MODELS), default="mlp")
    p.add_argument("--shift", type=int, default=None,
                   help="augment: shift each training image by up to this many pixels "
                        "(default 1 for lenet and resnet, else 0)")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help="cross-entropy label smoothing (default 0.1 for lenet and resnet, else 0)")
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

    shift, smoothing = REGULARISATION.get(args.model, (0, 0.0))
    shift = shift if args.shift is None else args.shift
    smoothing = smoothing if args.label_smoothing is None else args.label_smoothing
    model = MODELS[args.model]().to(args.device)
    if args.optimizer == "adam":
        optimizer = dt.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = dt.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    saved = harness.checkpoints(args)
    with DataParallel(model, optimizer, mode=args.mode, staleness=args.staleness,
                      metrics_dir=args.servers_metrics_dir, checkpoints=saved) as trainer:
        shards, shard_index = harness.shard_of(trainer)
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True,
                            drop_last=True, seed=args.seed, num_shards=shards,
                            shard_index=shard_index)
        last = harness.total_steps(loader, args)
        # Decaying the rate to zero over the run is worth ~1% test accuracy after one epoch.
        schedule = dt.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=harness.planned_steps(loader, args))
        position = harness.resume(saved, trainer, model, optimizer, schedule, loader)
        first = position["step"] if position else 0
        batches = harness.Batches(loader, first, last, position)
        harness.elastic(trainer, loader, batches, args, schedule)   # -n MIN:MAX: workers come and go
        monitor = harness.Monitor(args, trainer, last, f"{args.model} rank {trainer.rank}")
        losses, start = [], time.perf_counter()
        for step, (x, y) in batches:
            if shift:   # offsets drawn from (seed, rank, step) alone: a resumed run sees the same
                x = shifted(x, np.random.default_rng([args.seed, trainer.rank, step]), shift)
            logits = model(harness.on_device(x, args))
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
            trainer.zero_grad()
            loss.backward()
            trainer.step()
            schedule.step()
            losses.append(loss.item())
            hits = dt.backend.to_numpy(logits.data).argmax(axis=1) == y
            monitor.step(step + 1, losses[-1], len(x), shown_loss=np.mean(losses[-50:]),
                         accuracy=float(hits.mean()))
            if harness.after_step(saved, step + 1, batches, model, optimizer, schedule, last):
                monitor.close()
                return harness.PREEMPTED_EXIT
        wall = time.perf_counter() - start
        last = batches.next_step   # an elastic job's run ends at an epoch, not a step count
        trained = (last - first) * args.batch_size * trainer.num_workers
        test_accuracy = accuracy(model, x_test, y_test, args)
        monitor.evaluation(last, test_accuracy=test_accuracy)
        monitor.close()
        harness.summary(args, trainer, args.model,
                        train_loss=float(np.mean(losses[-len(loader) // 10 or 1:])) if losses else None,
                        test_accuracy=test_accuracy,
                        samples_per_s=trained / wall if wall > 0 else None,
                        wall_s=round(wall, 2), steps=last - first)


if __name__ == "__main__":
    sys.exit(main())
