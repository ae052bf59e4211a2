"""Character-level LSTM language model on tiny-shakespeare; reports val_loss in nats/char and a sample."""
import os
import sys
import time

import numpy as np

import disttrain as dt
import harness
from disttrain import nn
from disttrain.data import Vocab, load_text, split_ids
from disttrain.nn import functional as F
from disttrain.parallel import DataParallel


class CharLSTM(nn.Module):
    def __init__(self, vocab_size, embed_dim=64, hidden_size=256, num_layers=1, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids, state=None):
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state


def random_windows(ids, batch_size, seq_len, rng):
    """(x, y) of shape (batch, seq_len): random windows of ids and the same shifted by one."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    offsets = starts[:, None] + np.arange(seq_len + 1)
    windows = ids[offsets]
    return windows[:, :-1], windows[:, 1:]


def evaluate(model, val_ids, seq_len, args, batches=16, batch_size=32):
    """Mean cross-entropy (nats/char) over fixed validation windows: the same for every run."""
    rng = np.random.default_rng(1234)
    model.eval()
    total = 0.0
    with dt.no_grad():
        for _ in range(batches):
            x, y = random_windows(val_ids, batch_size, seq_len, rng)
            logits, _ = model(harness.on_device(x, args))
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    model.train()
    return total / batches


def generate(model, vocab, prompt, length, args, temperature=0.8, seed=0):
    """Sample ``length`` characters after ``prompt``, one step at a time with carried state."""
    rng = np.random.default_rng(seed)
    model.eval()
    ids = vocab.encode(prompt)
    out = list(prompt)
    with dt.no_grad():
        logits, state = model(harness.on_device(np.asarray(ids, np.int64)[None], args))
        for _ in range(length):
            last = dt.backend.to_numpy(logits.data[0, -1]).astype(np.float64) / temperature
            p = np.exp(last - last.max())
            p /= p.sum()
            next_id = int(rng.choice(len(p), p=p))
            out.append(vocab.decode([next_id]))
            logits, state = model(harness.on_device(np.array([[next_id]], np.int64), args), state)
    model.train()
    return "".join(out)


def main(argv=None):
    p = harness.parser(__doc__, epochs=4, batch_size=32, lr=2e-3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation losses")
    p.add_argument("--clip", type=float, default=5.0, help="gradient-norm clipping threshold")
    args = p.parse_args(argv)
    harness.prepare(args)

    corpus = load_text(os.path.join(args.data_dir, "tinyshakespeare", "input.txt"))
    vocab = Vocab(corpus)
    train_ids, val_ids = split_ids(vocab.encode(corpus))
    if args.limit_train:
        train_ids = train_ids[:args.limit_train]

    model = CharLSTM(len(vocab), args.embed_dim, args.hidden_size, args.num_layers).to(args.device)
    optimizer = dt.optim.Adam(model.parameters(), lr=args.lr)
    saved = harness.checkpoints(args)
    # Clipping changes gradients after backward(), so they are pushed in step(), not from hooks.
    with DataParallel(model, optimizer, mode=args.mode, staleness=args.staleness, overlap=False,
                      metrics_dir=args.servers_metrics_dir, checkpoints=saved) as trainer:
        # One "epoch" is as many windows as it takes to cover the training text once.
        per_epoch = max(1, len(train_ids) // (args.batch_size * args.seq_len * trainer.num_workers))
        last = int(args.epochs * per_epoch)
        last = min(last, args.max_steps) if args.max_steps else last
        position = harness.resume(saved, trainer, model, optimizer)
        first = position["step"] if position else 0
        monitor = harness.Monitor(args, trainer, last, f"char_lstm rank {trainer.rank}")
        losses, curve, start = [], [], time.perf_counter()
        for step in range(first, last):
            # Windows drawn from (seed, rank, step) alone: a resumed run sees the same data.
            rng = np.random.default_rng([args.seed, trainer.rank, step])
            x, y = random_windows(train_ids, args.batch_size, args.seq_len, rng)
            logits, _ = model(harness.on_device(x, args))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            trainer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            trainer.step()
            losses.append(loss.item())
            monitor.step(step + 1, losses[-1], args.batch_size, shown_loss=np.mean(losses[-20:]))
            if trainer.rank == 0 and ((step + 1) % args.eval_every == 0 or step + 1 == last):
                curve.append((step + 1, round(evaluate(model, val_ids, args.seq_len, args), 4),
                              round(time.perf_counter() - start, 1)))
                print(f"step {step + 1} val_loss {curve[-1][1]:.4f} ({curve[-1][2]} s)", file=sys.stderr)
                monitor.evaluation(step + 1, val_loss=curve[-1][1])
            # Windows depend on the step alone: the position is the step (epoch 0, start 0).
            position = {"epoch": 0, "start": 0, "epoch_end": (step + 1) % per_epoch == 0}
            if saved is not None and saved.after_step(step + 1, position, model, optimizer,
                                                      last=step + 1 == last):
                monitor.close()
                return harness.PREEMPTED_EXIT
        monitor.close()
        wall = time.perf_counter() - start
        if trainer.rank == 0:
            print(generate(model, vocab, "ROMEO:", 200, args, seed=args.seed))
        harness.summary(args, trainer, "char_lstm",
                        train_loss=float(np.mean(losses[-50:])) if losses else None,
                        test_accuracy=None, val_loss=curve[-1][1] if curve else None,
                        val_perplexity=float(np.exp(curve[-1][1])) if curve else None,
                        val_curve=curve, samples_per_s=(last - first) * args.batch_size * trainer.num_workers / wall,
                        wall_s=round(wall, 2), steps=last - first)


if __name__ == "__main__":
    sys.exit(main())
