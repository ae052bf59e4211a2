"""DataLoader: per-epoch shuffled, per-worker sharded batches, prefetched by a background thread."""
import functools
import queue
import threading

import numpy as np

from disttrain.data.dataset import Dataset

# How long a blocked producer or consumer sleeps before re-checking whether its peer is gone.
POLL_SECONDS = 0.1


class DataLoader:
    """Iterate over ``dataset`` in batches: each batch a tuple of numpy arrays (or one array).

    Each ``iter(loader)`` is one epoch. The epoch number starts at 0 and goes up by one every
    time an iteration starts; ``set_epoch(e)`` makes the next iteration epoch ``e``. The order
    depends only on (seed, epoch), so all workers agree on it and reruns repeat it.
    ``prefetch`` batches are prepared ahead by a background thread (0: no thread).

    Sharding rule (what every worker of a job can compute alone, with no communication):
    1. The epoch order is a permutation drawn from ``(seed, epoch)`` (or 0..N-1 without shuffle).
    2. Without drop_last, the order is padded with its own first samples up to a multiple of
       num_shards (torch's DistributedSampler does the same), so every shard gets ceil(N / S)
       samples; at most S - 1 samples are seen twice per epoch. With drop_last, the order is cut to
       a multiple of S instead, and each shard drops its last partial batch.
    3. Shard k takes every S-th sample starting at k: so shard batches at step t, joined, are the
       global batch t of a single loader with batch_size * num_shards, and sync-mode workers with
       batch b compute what one process with batch S * b computes.
    Every shard therefore yields the same number of batches, which sync-mode workers need.
    """

    def __init__(self, dataset, batch_size, shuffle=False, drop_last=False, seed=0, num_shards=1,
                 shard_index=0, prefetch=2):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive integer, got {batch_size}")
        if int(num_shards) != num_shards or num_shards < 1:
            raise ValueError(f"DataLoader: num_shards must be a positive integer, got {num_shards}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"DataLoader: shard_index={shard_index} is outside [0, {num_shards})")
        if prefetch < 0:
            raise ValueError(f"DataLoader: prefetch must be >= 0, got {prefetch}")
        if len(dataset) < num_shards:
            raise ValueError(f"DataLoader: {len(dataset)} samples cannot fill {num_shards} shards")
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, int(batch_size), shuffle, drop_last
        self.seed, self.num_shards, self.shard_index, self.prefetch = seed, int(num_shards), shard_index, prefetch
        self.epoch = 0
        self.start = 0  # where the next iteration starts in its epoch's order (a resumed epoch)

    def set_epoch(self, epoch, start=0):
        """Make the next iteration use epoch number ``epoch`` (and count on from there).

        ``start`` resumes that epoch at a position of its global order (samples that all
        shards together consumed before, see the sharding rule): the rest of the epoch is dealt
        to the shards as rule 3 says, so a job that changed its number of workers sees every
        remaining sample once. The shards then stop together at the shortest shard's last
        full batch (at most num_shards - 1 samples left out, and only when the worker count
        changed mid-epoch)."""
        if not 0 <= start <= self._shard_size() * self.num_shards:
            raise ValueError(f"DataLoader.set_epoch: start {start} is outside the epoch's "
                             f"{self._shard_size() * self.num_shards} samples")
        self.epoch, self.start = int(epoch), int(start)

    def _shard_size(self):
        samples, shards = len(self.dataset), self.num_shards
        return samples // shards if self.drop_last else -(-samples // shards)

    def __len__(self):
        """Batches per epoch, the same for every shard."""
        size = self._shard_size()
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    def shard_indices(self, epoch, start=0):
        """The sample indices this shard visits in ``epoch`` from global position ``start``, in
        order (the sharding rule above)."""
        samples = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(samples)
        else:
            order = np.arange(samples)
        total = self._shard_size() * self.num_shards
        if total > samples:
            order = np.concatenate([order, order[:total - samples]])
        common = (total - start) // self.num_shards   # every shard's count: sync needs equal ones
        return order[start + self.shard_index:total:self.num_shards][:common]

    def _batches(self, epoch, start=0):
        indices = self.shard_indices(epoch, start)
        # A plain indexable (e.g. a list of tuples) gets the Dataset base class's stacking.
        get_batch = getattr(self.dataset, "get_batch", None) or functools.partial(Dataset.get_batch, self.dataset)
        count = len(indices) // self.batch_size if self.drop_last else -(-len(indices) // self.batch_size)
        for batch in range(count):
            yield get_batch(indices[batch * self.batch_size:(batch + 1) * self.batch_size])

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        start, self.start = self.start, 0
        if self.prefetch == 0:
            return self._batches(epoch, start)
        return PrefetchIterator(self._batches(epoch, start), self.prefetch)


class PrefetchIterator:
    """Run a batch generator in a daemon thread, ``depth`` batches ahead.

    An exception in the thread is raised in the consumer at the batch where it happened.
    ``close()`` (also called when the iterator is garbage-collected, e.g. after a ``break``)
    stops the thread: it only ever blocks on a bounded put that re-checks a stop flag.
    """

    def __init__(self, batches, depth):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        # The thread must not reference self, or an abandoned iterator could never be collected.
        self._thread = threading.Thread(target=_produce, args=(batches, self._queue, self._stop),
                                        name="disttrain-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        while True:
            try:
                kind, item = self._queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True
                    raise RuntimeError("DataLoader: the prefetch thread ended without finishing the epoch")
        if kind == "batch":
            return item
        self.close()
        if kind == "error":
            raise item
        raise StopIteration

    def close(self):
        """Stop the producer thread and wait (briefly) for it to exit."""
        self._finished = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * POLL_SECONDS)

    def __del__(self):
        if hasattr(self, "_thread"):
            self.close()


def _produce(batches, out, stop):
    """Producer loop: put ("batch", b) for each batch, then ("done", None) or ("error", exc)."""
    try:
        for batch in batches:
            if not _put(out, ("batch", batch), stop):
                return
        _put(out, ("done", None), stop)
    except BaseException as error:  # handed to the consumer, who re-raises it
        _put(out, ("error", error), stop)
    finally:
        batches.close()


def _put(out, item, stop):
    """Put into the bounded queue unless asked to stop; returns False if stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
