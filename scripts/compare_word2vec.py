"""Train workers/word2vec.py's skip-gram model in disttrain and in PyTorch side by side on the same pairs.

Same initial tables (copied from ours), the same subsampled pairs and negatives in the same
order, `sparse=True` embeddings in both, SGD with the same cosine schedule; both validation
losses (the worker's held-out pairs) are printed every --eval-every steps, then one JSON line
with the final pair, their relative difference and ms/step of each.

    python scripts/compare_word2vec.py [--epochs 1] [--batch-size 128] [--lr 10]
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "workers"))

import disttrain as dt  # noqa: E402
import word2vec as w2v  # noqa: E402
from disttrain.data import load_text  # noqa: E402

import torch  # noqa: E402  (the `bench` extra)


class TorchSkipGram(torch.nn.Module):
    def __init__(self, vocab_size, dim):
        super().__init__()
        self.centre = torch.nn.Embedding(vocab_size, dim, sparse=True)
        self.context = torch.nn.Embedding(vocab_size, dim, sparse=True)

    def forward(self, centres, rows):
        return (self.context(rows) * self.centre(centres)[:, None, :]).sum(-1)


def torch_loss(scores, num_negatives):
    labels = torch.from_numpy(w2v.labels(scores.shape[0], num_negatives))
    return torch.nn.functional.binary_cross_entropy_with_logits(
        scores, labels, reduction="sum") / max(scores.shape[0], 1)


def torch_val_loss(model, val_pairs, val_negatives, batch_size=2000):
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(val_pairs), batch_size):
            pairs = val_pairs[i:i + batch_size]
            scores = model(torch.from_numpy(pairs[:, 0]),
                           torch.from_numpy(w2v.targets(pairs, val_negatives[i:i + batch_size])))
            total += torch_loss(scores, val_negatives.shape[1]).item() * len(pairs)
    return total / len(val_pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=10.0)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--min-count", type=int, default=3)
    p.add_argument("--subsample", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    dt.manual_seed(args.seed)
    dt.backend.keep_freed_memory()

    vocab = w2v.Words(load_text(os.path.join(ROOT, "data", "tinyshakespeare", "input.txt")),
                      args.min_count)
    cut = int(0.9 * len(vocab.ids))
    train_ids, val_ids = vocab.ids[:cut], vocab.ids[cut:]
    keep, cdf = w2v.keep_probabilities(vocab.counts, args.subsample), w2v.noise_cdf(vocab.counts)
    val_pairs, val_negatives = w2v.validation_set(val_ids, cdf, args.window, args.negatives)

    ours = w2v.SkipGram(len(vocab), args.dim)
    theirs = TorchSkipGram(len(vocab), args.dim)
    with torch.no_grad():   # identical start: the parameter names are the same
        for name, value in ours.state_dict().items():
            theirs.state_dict()[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    per_epoch = len(w2v.epoch_pairs(train_ids, keep, args.window, args.seed, 0)) // args.batch_size
    steps = max(1, int(np.ceil(args.epochs * per_epoch)))
    ours_opt = dt.optim.SGD(ours.parameters(), lr=args.lr)
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=args.lr)
    ours_schedule = dt.optim.lr_scheduler.CosineAnnealingLR(ours_opt, T_max=steps)
    theirs_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(theirs_opt, T_max=steps)

    seconds = {"ours": 0.0, "torch": 0.0}
    pairs, pairs_epoch = None, None
    print(f"{'step':>6} {'ours val':>9} {'torch val':>9} {'ours ms':>8} {'torch ms':>8}")
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        if pairs_epoch != epoch:
            pairs, pairs_epoch = w2v.epoch_pairs(train_ids, keep, args.window, args.seed, epoch), epoch
        batch = pairs[index * args.batch_size:(index + 1) * args.batch_size]
        noise = w2v.negatives(cdf, (len(batch), args.negatives),
                              np.random.default_rng([args.seed, epoch, index, 0]))
        rows = w2v.targets(batch, noise)

        start = time.perf_counter()
        loss = w2v.loss_of(ours(batch[:, 0], rows), args.negatives)
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()
        ours_schedule.step()
        seconds["ours"] += time.perf_counter() - start

        start = time.perf_counter()
        loss = torch_loss(theirs(torch.from_numpy(batch[:, 0]), torch.from_numpy(rows)), args.negatives)
        theirs_opt.zero_grad()
        loss.backward()
        theirs_opt.step()
        theirs_schedule.step()
        seconds["torch"] += time.perf_counter() - start

        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            ours_val = w2v.evaluate(ours, val_pairs, val_negatives)
            torch_val = torch_val_loss(theirs, val_pairs, val_negatives)
            print(f"{step + 1:6d} {ours_val:9.4f} {torch_val:9.4f} "
                  f"{1000 * seconds['ours'] / (step + 1):8.2f} "
                  f"{1000 * seconds['torch'] / (step + 1):8.2f}", flush=True)
    print(json.dumps({"steps": steps, "ours_val_loss": round(ours_val, 4),
                      "torch_val_loss": round(torch_val, 4),
                      "relative_difference": round((ours_val - torch_val) / torch_val, 5),
                      "ours_ms_per_step": round(1000 * seconds["ours"] / steps, 2),
                      "torch_ms_per_step": round(1000 * seconds["torch"] / steps, 2)}))


if __name__ == "__main__":
    main()
