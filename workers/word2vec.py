"""word2vec, skip-gram with negative sampling (CS20's example), on the words of tiny-shakespeare:
two embedding tables kept as sparse parameter-server keys, of which each step pulls and pushes
only the rows its batch touches. Prints nearest neighbours of a few frequent words at the end."""
import collections
import functools
import os
import re
import sys
import time

import numpy as np

import disttrain as dt
import harness
from disttrain import nn
from disttrain.data import load_text
from disttrain.nn import functional as F
from disttrain.parallel import DataParallel
from disttrain.ps import protocol

PROBE_WORDS = ("king", "love", "good", "lord", "death", "father")
VAL_PAIRS = 20000


# --- data ---------------------------------------------------------------------------------
class Words:
    """The corpus as word ids: lower-cased runs of letters and apostrophes; words seen fewer
    than ``min_count`` times are dropped (as word2vec does); id 0 is the most frequent word."""

    def __init__(self, text, min_count):
        tokens = re.findall(r"[a-z']+", text.lower())
        counts = collections.Counter(tokens)
        self.words = sorted((w for w, c in counts.items() if c >= min_count),
                            key=lambda w: (-counts[w], w))
        self.index = {w: i for i, w in enumerate(self.words)}
        self.counts = np.array([counts[w] for w in self.words], np.int64)
        self.ids = np.array([self.index[t] for t in tokens if t in self.index], np.int64)

    def __len__(self):
        return len(self.words)


def keep_probabilities(counts, threshold):
    """Subsampling of frequent words (Mikolov et al. 2013, word2vec's C code): a word of
    frequency f is kept with probability (sqrt(f / t) + 1) * t / f, at most 1."""
    frequency = counts / counts.sum()
    return np.minimum(1.0, (np.sqrt(frequency / threshold) + 1) * threshold / frequency)


def noise_cdf(counts, power=0.75):
    """Cumulative unigram^0.75 distribution: negatives are np.searchsorted(cdf, uniform)."""
    weights = counts.astype(np.float64) ** power
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return cdf


def negatives(cdf, shape, rng):
    return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), len(cdf) - 1)


def skipgram_pairs(ids, window, rng):
    """(centre, context) pairs, shuffled: each centre uses a window drawn from 1..window (the
    dynamic window of word2vec, which weights near words more)."""
    n = len(ids)
    reach = rng.integers(1, window + 1, size=n)
    centres, contexts = [], []
    for d in range(1, window + 1):
        right = np.flatnonzero(reach[:n - d] >= d)          # context d words after
        left = np.flatnonzero(reach[d:] >= d) + d           # context d words before
        centres += [ids[right], ids[left]]
        contexts += [ids[right + d], ids[left - d]]
    pairs = np.stack([np.concatenate(centres), np.concatenate(contexts)], axis=1)
    return pairs[rng.permutation(len(pairs))]


def epoch_pairs(train_ids, keep, window, seed, epoch):
    """The pairs of one epoch after subsampling: the same on every worker for (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    kept = train_ids[rng.random(len(train_ids)) < keep[train_ids]]
    return skipgram_pairs(kept, window, rng)


def validation_set(val_ids, cdf, window, num_negatives, size=VAL_PAIRS):
    """Held-out pairs (no subsampling) with fixed negatives: the same for every run."""
    rng = np.random.default_rng(1234)
    pairs = skipgram_pairs(val_ids, window, rng)[:size]
    return pairs, negatives(cdf, (len(pairs), num_negatives), rng)


def targets(pairs, noise):
    """(B, 1 + K) output-table rows: the true context, then the K negatives."""
    return np.concatenate([pairs[:, 1:2], noise], axis=1)


@functools.lru_cache(maxsize=8)
def labels(batch, num_negatives):
    """1 for the true context, 0 for each negative (read-only: shared between calls)."""
    array = np.zeros((batch, 1 + num_negatives), np.float32)
    array[:, 0] = 1
    array.flags.writeable = False
    return array


# --- model --------------------------------------------------------------------------------
class SkipGram(nn.Module):
    """Centre-word table and context-word table, both sparse; the score of (centre, word) is
    the dot product of their rows. Initialised as word2vec: centre rows uniform in
    +-0.5/dim, context rows zero."""

    def __init__(self, vocab_size, dim):
        super().__init__()
        self.centre = nn.Embedding(vocab_size, dim, sparse=True)
        self.context = nn.Embedding(vocab_size, dim, sparse=True)
        rng = np.random.default_rng(int(dt.random.default_rng().integers(2 ** 31)))
        self.centre.weight.data[...] = rng.uniform(-0.5 / dim, 0.5 / dim, (vocab_size, dim))
        self.context.weight.data[...] = 0

    def forward(self, centres, rows):
        """centres (B,), rows (B, 1 + K) -> scores (B, 1 + K)."""
        v = self.centre(centres)                              # (B, D)
        u = self.context(rows)                                # (B, 1 + K, D)
        return (u * v.reshape(v.shape[0], 1, v.shape[1])).sum(axis=-1)


def loss_of(scores, num_negatives):
    """Negative-sampling loss: -log sigmoid(true score) - sum log sigmoid(-negative scores),
    averaged over the batch."""
    batch = scores.shape[0]
    return F.binary_cross_entropy_with_logits(scores, labels(batch, num_negatives),
                                              reduction="sum") / max(batch, 1)


def evaluate(model, val_pairs, val_negatives, batch_size=2000):
    num_negatives = val_negatives.shape[1]
    total = 0.0
    with dt.no_grad():
        for i in range(0, len(val_pairs), batch_size):
            pairs = val_pairs[i:i + batch_size]
            scores = model(pairs[:, 0], targets(pairs, val_negatives[i:i + batch_size]))
            total += loss_of(scores, num_negatives).item() * len(pairs)
    return total / len(val_pairs)


def nearest(model, vocab, words, k=5):
    """{word: its k nearest words by cosine similarity of the centre vectors}."""
    table = dt.backend.to_numpy(model.centre.weight.data)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-8)
    found = {}
    for word in words:
        if word in vocab.index:
            similarity = unit @ unit[vocab.index[word]]
            similarity[vocab.index[word]] = -np.inf
            found[word] = [vocab.words[i] for i in np.argsort(-similarity)[:k]]
    return found


# --- bytes on the wire ----------------------------------------------------------------------
class WireMeter:
    """Counts the bytes of every message a worker's KVStore sends and receives (header and
    payload frames, as encoded for the wire)."""

    def __init__(self, store):
        self.sent = self.received = 0
        for connection in store.connections:
            connection.send = self._counting_send(connection.send)
            connection.receive_nowait = self._counting_receive(connection.receive_nowait)

    @staticmethod
    def _size(message):
        return sum(memoryview(frame).nbytes for frame in protocol.encode(message))

    def _counting_send(self, send):
        def counted(message):
            self.sent += self._size(message)
            return send(message)
        return counted

    def _counting_receive(self, receive):
        def counted():
            reply = receive()
            if reply is not None:
                self.received += self._size(reply)
            return reply
        return counted

    @property
    def total(self):
        return self.sent + self.received


def main(argv=None):
    p = harness.parser(__doc__, epochs=3.0, batch_size=128, lr=10.0)
    p.add_argument("--dim", type=int, default=100, help="embedding size")
    p.add_argument("--window", type=int, default=5, help="largest distance of a context word")
    p.add_argument("--negatives", type=int, default=5, help="negative samples per pair")
    p.add_argument("--min-count", type=int, default=3, help="drop words seen fewer times")
    p.add_argument("--subsample", type=float, default=1e-3, help="subsampling threshold t")
    args = p.parse_args(argv)
    harness.prepare(args)

    text = load_text(os.path.join(args.data_dir, "tinyshakespeare", "input.txt"))
    vocab = Words(text, args.min_count)
    cut = int(0.9 * len(vocab.ids))
    train_ids, val_ids = vocab.ids[:cut], vocab.ids[cut:]
    if args.limit_train:
        train_ids = train_ids[:args.limit_train]
    keep = keep_probabilities(vocab.counts, args.subsample)
    cdf = noise_cdf(vocab.counts)
    val_pairs, val_negatives = validation_set(val_ids, cdf, args.window, args.negatives)

    model = SkipGram(len(vocab), args.dim).to(args.device)
    optimizer = dt.optim.SGD(model.parameters(), lr=args.lr)
    saved = harness.checkpoints(args)
    with DataParallel(model, optimizer, mode=args.mode, staleness=args.staleness,
                      checkpoints=saved) as trainer:
        # The meter wraps the connections of DataParallel's own KVStore (no public handle).
        meter = WireMeter(trainer._store) if trainer.is_distributed else None
        workers, batch = trainer.num_workers, args.batch_size
        # Pairs per epoch vary a little with the subsampling draw: the first epoch's count
        # sizes the run (and the schedule).
        per_epoch = len(epoch_pairs(train_ids, keep, args.window, args.seed, 0)) // (batch * workers)
        planned = max(1, int(np.ceil(args.epochs * per_epoch)))
        last = min(planned, args.max_steps) if args.max_steps else planned
        schedule = dt.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=planned)
        position = harness.resume(saved, trainer, model, optimizer, schedule)
        first = position["step"] if position else 0
        progress = harness.Progress(last, f"word2vec rank {trainer.rank}", not args.no_progress)
        losses, start, pairs, pairs_epoch = [], time.perf_counter(), None, None
        wire_steps = wire_bytes = 0
        for step in range(first, last):
            epoch, index = divmod(step, per_epoch)
            if pairs_epoch != epoch:
                pairs, pairs_epoch = epoch_pairs(train_ids, keep, args.window, args.seed, epoch), epoch
            # Worker r takes the r-th slice of each global batch: N workers compute what one
            # process computes with a batch N times larger.
            offset = (index * workers + trainer.rank) * batch
            batch_pairs = pairs[offset:offset + batch]
            noise = negatives(cdf, (len(batch_pairs), args.negatives),
                              np.random.default_rng([args.seed, epoch, index, trainer.rank]))
            before = meter.total if meter else 0
            loss = loss_of(model(batch_pairs[:, 0], targets(batch_pairs, noise)), args.negatives)
            trainer.zero_grad()
            loss.backward()
            trainer.step()
            schedule.step()
            if meter:
                wire_steps, wire_bytes = wire_steps + 1, wire_bytes + meter.total - before
            losses.append(loss.item())
            progress.update(step + 1, len(batch_pairs), loss=np.mean(losses[-100:]))
            # Pairs depend on (seed, epoch, step) alone: the position is the step.
            position = {"epoch": 0, "start": 0, "epoch_end": (step + 1) % per_epoch == 0}
            if saved is not None and saved.after_step(step + 1, position, model, optimizer,
                                                      schedule, last=step + 1 == last):
                return harness.PREEMPTED_EXIT
        progress.close()
        wall = time.perf_counter() - start
        dense_bytes = None
        if meter:
            # A dense step would push and pull both whole tables: measure one whole pull
            # (its reply carries exactly the bytes a dense push of the tables carries).
            before = meter.total
            trainer._pull(["centre.weight", "context.weight"])
            dense_bytes = 2 * (meter.total - before)
        val_loss = evaluate(model, val_pairs, val_negatives)
        if trainer.rank == 0:
            for word, neighbours in nearest(model, vocab, PROBE_WORDS).items():
                print(f"{word}: {' '.join(neighbours)}")
        harness.summary(args, trainer, "word2vec",
                        train_loss=float(np.mean(losses[-100:])) if losses else None,
                        test_accuracy=None, val_loss=round(val_loss, 5),
                        vocab_size=len(vocab), train_pairs_per_epoch=per_epoch * batch * workers,
                        bytes_per_step=round(wire_bytes / wire_steps) if wire_steps else None,
                        dense_bytes_per_step=dense_bytes,
                        samples_per_s=(last - first) * batch * workers / wall if wall > 0 else None,
                        wall_s=round(wall, 2), steps=last - first)


if __name__ == "__main__":
    sys.exit(main())
