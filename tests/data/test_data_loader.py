"""DataLoader: sharding (disjoint, covering, equal counts), per-epoch determinism, prefetch thread."""
import gc
import threading
import time

import numpy as np
import pytest

from disttrain.data import DataLoader, Dataset, TensorDataset


def _ids(loader):
    return np.concatenate([batch[0] for batch in loader]) if len(loader) else np.array([], np.int64)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "disttrain-prefetch"]


def _wait_for_no_prefetch_threads():
    deadline = time.monotonic() + 5
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _prefetch_threads()


@pytest.mark.parametrize("samples,shards,batch", [(12, 3, 2), (10, 3, 3), (7, 4, 5), (9, 1, 4)])
def test_shards_together_cover_the_epoch_with_equal_batch_counts(samples, shards, batch):
    dataset = TensorDataset(np.arange(samples))
    loaders = [DataLoader(dataset, batch, shuffle=True, seed=5, num_shards=shards, shard_index=k)
               for k in range(shards)]
    counts = {len(list(loader)) for loader in loaders}
    assert counts == {len(loaders[0])}
    for loader in loaders:
        loader.set_epoch(0)
    seen = np.concatenate([_ids(loader) for loader in loaders])
    assert set(seen.tolist()) == set(range(samples))
    # padding repeats the fewest samples possible: ceil(N / S) * S - N of them
    assert len(seen) == -(-samples // shards) * shards


def test_shards_are_disjoint_when_samples_divide_evenly():
    dataset = TensorDataset(np.arange(24))
    per_shard = [set(_ids(DataLoader(dataset, 5, shuffle=True, num_shards=4, shard_index=k)).tolist())
                 for k in range(4)]
    assert sum(len(s) for s in per_shard) == 24 and set().union(*per_shard) == set(range(24))


def test_drop_last_shards_are_disjoint_with_equal_full_batches():
    dataset = TensorDataset(np.arange(23))
    loaders = [DataLoader(dataset, 2, shuffle=True, drop_last=True, num_shards=3, shard_index=k) for k in range(3)]
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [3, 3, 3] == [len(loader) for loader in loaders]
    assert all(len(batch[0]) == 2 for shard in batches for batch in shard)
    seen = np.concatenate([batch[0] for shard in batches for batch in shard])
    assert len(set(seen.tolist())) == len(seen)


def test_shard_batches_joined_are_the_single_process_global_batch():
    dataset = TensorDataset(np.arange(40))
    single = list(DataLoader(dataset, 8, shuffle=True, seed=3))
    shards = [list(DataLoader(dataset, 2, shuffle=True, seed=3, num_shards=4, shard_index=k)) for k in range(4)]
    for step, global_batch in enumerate(single):
        joined = np.concatenate([shard[step][0] for shard in shards])
        assert sorted(joined.tolist()) == sorted(global_batch[0].tolist())


def test_order_is_deterministic_from_seed_and_epoch_and_changes_per_epoch():
    dataset = TensorDataset(np.arange(50))
    a, b = DataLoader(dataset, 7, shuffle=True, seed=1), DataLoader(dataset, 7, shuffle=True, seed=1)
    epoch0, epoch1 = _ids(a), _ids(a)  # each iteration starts the next epoch
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(_ids(b), epoch0)
    b.set_epoch(1)
    np.testing.assert_array_equal(_ids(b), epoch1)
    assert not np.array_equal(_ids(DataLoader(dataset, 7, shuffle=True, seed=2)), epoch0)


def test_without_shuffle_batches_are_in_order_and_keep_every_field():
    x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
    batches = list(DataLoader(TensorDataset(x, y), 2, prefetch=0))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[0][0], x[:2])
    np.testing.assert_array_equal(batches[2][1], [4])


def test_plain_dataset_items_are_stacked_per_field():
    class Squares(Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return np.array([i, i]), i * i

    (first, *_) = DataLoader(Squares(), 3)
    np.testing.assert_array_equal(first[0], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(first[1], [0, 1, 4])


def test_exception_in_prefetch_thread_reaches_the_consumer_at_its_batch():
    class Broken(Dataset):
        def __len__(self):
            return 10

        def get_batch(self, indices):
            if indices[0] >= 4:
                raise OSError(f"disk error at sample {indices[0]}")
            return (indices,)

    loader = DataLoader(Broken(), 2)
    received = []
    with pytest.raises(OSError, match="sample 4"):
        for batch in loader:
            received.append(batch)
    assert len(received) == 2
    assert _wait_for_no_prefetch_threads() == []


def test_abandoned_iteration_stops_the_prefetch_thread():
    loader = DataLoader(TensorDataset(np.arange(1000)), 1, prefetch=2)
    for i, _ in enumerate(loader):
        if i == 3:
            break  # the iterator is dropped here, with the thread blocked on a full queue
    gc.collect()
    assert _wait_for_no_prefetch_threads() == []


def test_prefetch_runs_ahead_of_the_consumer():
    produced = []

    class Recording(Dataset):
        def __len__(self):
            return 6

        def get_batch(self, indices):
            produced.append(int(indices[0]))
            return (indices,)

    iterator = iter(DataLoader(Recording(), 1, prefetch=3))
    next(iterator)
    deadline = time.monotonic() + 5
    while len(produced) < 5 and time.monotonic() < deadline:  # 1 consumed + 3 queued + 1 waiting
        time.sleep(0.01)
    assert len(produced) == 5
    assert [int(b[0][0]) for b in iterator] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size.*0"),
    ({"batch_size": 2, "num_shards": 2, "shard_index": 2}, r"shard_index=2.*\[0, 2\)"),
    ({"batch_size": 2, "num_shards": 20}, "20 shards"),
])
def test_invalid_arguments_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataLoader(TensorDataset(np.arange(10)), **kwargs)


def test_tensor_dataset_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        TensorDataset(np.zeros(3), np.zeros(4))
