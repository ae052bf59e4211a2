"""Train workers/char_lstm.py's model in disttrain and in PyTorch side by side on the same batches.

Same initial weights (copied from ours), same windows, Adam with the same hyper-parameters and
gradient clipping; both validation losses (nats/char) are printed every --eval-every steps, then
one JSON line with the final pair, their difference and ms/step of each.
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
from char_lstm import CharLSTM, random_windows  # noqa: E402
from disttrain.data import Vocab, load_text, split_ids  # noqa: E402
from disttrain.nn import functional as F  # noqa: E402

import torch  # noqa: E402  (the `bench` extra)


class TorchCharLSTM(torch.nn.Module):
    def __init__(self, vocab_size, embed_dim, hidden_size):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, embed_dim)
        self.lstm = torch.nn.LSTM(embed_dim, hidden_size, batch_first=True)
        self.head = torch.nn.Linear(hidden_size, vocab_size)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(out)


def validation_windows(val_ids, seq_len, batches=16, batch_size=32):
    rng = np.random.default_rng(1234)
    return [random_windows(val_ids, batch_size, seq_len, rng) for _ in range(batches)]


def val_loss_ours(model, windows):
    with dt.no_grad():
        losses = [F.cross_entropy(model(dt.tensor(x))[0].reshape(-1, model.head.out_features),
                                  y.reshape(-1)).item() for x, y in windows]
    return float(np.mean(losses))


def val_loss_torch(model, windows):
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(torch.from_numpy(x)).flatten(0, 1),
                                                    torch.from_numpy(y).flatten()).item() for x, y in windows]
    return float(np.mean(losses))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    dt.manual_seed(args.seed)
    dt.backend.keep_freed_memory()

    text = load_text(os.path.join(ROOT, "data", "tinyshakespeare", "input.txt"))
    vocab = Vocab(text)
    train_ids, val_ids = split_ids(vocab.encode(text))
    windows = validation_windows(val_ids, args.seq_len)

    ours = CharLSTM(len(vocab), args.embed_dim, args.hidden_size)
    theirs = TorchCharLSTM(len(vocab), args.embed_dim, args.hidden_size)
    with torch.no_grad():  # identical start: our names are PyTorch's names
        for name, value in ours.state_dict().items():
            theirs.state_dict()[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    ours_opt = dt.optim.Adam(ours.parameters(), lr=args.lr)
    theirs_opt = torch.optim.Adam(theirs.parameters(), lr=args.lr)

    rng = np.random.default_rng(args.seed)
    seconds = {"ours": 0.0, "torch": 0.0}
    print(f"{'step':>6} {'ours val':>9} {'torch val':>9} {'ours ms':>8} {'torch ms':>8}")
    for step in range(1, args.steps + 1):
        x, y = random_windows(train_ids, args.batch_size, args.seq_len, rng)

        start = time.perf_counter()
        logits, _ = ours(dt.tensor(x))
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        ours_opt.zero_grad()
        loss.backward()
        dt.nn.utils.clip_grad_norm_(ours.parameters(), args.clip)
        ours_opt.step()
        seconds["ours"] += time.perf_counter() - start

        start = time.perf_counter()
        torch_loss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)).flatten(0, 1),
                                                       torch.from_numpy(y).flatten())
        theirs_opt.zero_grad()
        torch_loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), args.clip)
        theirs_opt.step()
        seconds["torch"] += time.perf_counter() - start

        if step % args.eval_every == 0 or step == args.steps:
            ours_val, torch_val = val_loss_ours(ours, windows), val_loss_torch(theirs, windows)
            print(f"{step:6d} {ours_val:9.4f} {torch_val:9.4f} {1000 * seconds['ours'] / step:8.1f} "
                  f"{1000 * seconds['torch'] / step:8.1f}", flush=True)
    print(json.dumps({"steps": args.steps, "ours_val_loss": round(ours_val, 4),
                      "torch_val_loss": round(torch_val, 4), "difference": round(ours_val - torch_val, 4),
                      "ours_ms_per_step": round(1000 * seconds["ours"] / args.steps, 1),
                      "torch_ms_per_step": round(1000 * seconds["torch"] / args.steps, 1)}))


if __name__ == "__main__":
    main()
