"""harness.Batches in an elastic job: when the workers change at a step boundary, each one
re-splits the rest of the epoch from the global position over the new count, so across a
leave and a join every sample of every epoch is dealt exactly once."""
import collections
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "workers"))
import harness  # noqa: E402
import disttrain as dt  # noqa: E402
from disttrain.data import DataLoader, TensorDataset  # noqa: E402

SAMPLES, BATCH = 48, 2


class FakeElastic:
    """What harness.elastic reads of a trainer's WorkerElastic."""

    def __init__(self, rank, active):
        self.rank, self.active = rank, list(active)
        self.callbacks, self.position_source, self.left = [], None, False

    def shard(self):
        return len(self.active), self.active.index(self.rank)

    def change(self, active):
        old, self.active = len(self.active), list(active)
        for callback in self.callbacks:
            callback(old, len(self.active))


class Worker:
    def __init__(self, rank, active, epochs, position=None, first=0, schedule=None):
        self.elastic = FakeElastic(rank, active)
        trainer = SimpleNamespace(elastic=self.elastic, rank=rank)
        shards, index = harness.shard_of(trainer)
        self.loader = DataLoader(TensorDataset(np.arange(SAMPLES)), batch_size=BATCH,
                                 shuffle=True, drop_last=True, seed=3, num_shards=shards,
                                 shard_index=index, prefetch=0)
        self.batches = harness.Batches(self.loader, first, math.inf, position)
        harness.elastic(trainer, self.loader, self.batches, SimpleNamespace(epochs=epochs),
                        schedule)
        self.steps = iter(self.batches)


def run(script, epochs=3):
    """Workers in lockstep; script: {step: ("leave", rank) | ("join", rank)} applied after
    that step (a join waits until the marker's position source allows it). Returns
    {epoch: sorted samples dealt}."""
    workers = {0: Worker(0, [0, 1], epochs), 1: Worker(1, [0, 1], epochs)}
    seen, waiting, step = collections.defaultdict(list), [], 0
    while workers:
        dealt = {}
        for rank, worker in list(workers.items()):
            got = next(worker.steps, None)
            if got is None:
                del workers[rank]
                continue
            dealt[rank] = got
            position = worker.batches.position
            seen[position["epoch"] - position["epoch_end"]] += list(got[1][0])
        if not workers:
            break
        assert len({s for s, _ in dealt.values()}) == 1, "workers out of lockstep"
        action = script.get(step)
        active = sorted(workers)
        if action and action[0] == "leave":
            workers[action[1]].elastic.left = True
            del workers[action[1]]
            active.remove(action[1])
        elif action:
            waiting.append(action[1])
        marker = workers[active[0]]
        boundary = marker.elastic.position_source(len(active) + len(waiting))
        if waiting and boundary is not None:
            active = sorted(active + waiting)
            for rank in waiting:
                workers[rank] = Worker(rank, active, epochs, boundary, boundary["step"])
            waiting = []
        for worker in workers.values():
            if worker.elastic.active != active:
                worker.elastic.change(active)
        step += 1
    return {epoch: sorted(samples) for epoch, samples in seen.items()}


@pytest.mark.parametrize("script", [{}, {5: ("leave", 1)}, {3: ("join", 2)},
                                    {2: ("join", 2), 20: ("leave", 0)}])
def test_across_leaves_and_joins_every_sample_of_every_epoch_is_dealt_once(script):
    """(The last: 3 workers from step 3; after step 20, 24 samples into epoch 2, the 24
    left split evenly over 2 workers of batch 2.)"""
    seen = run(script)
    assert sorted(seen) == [0, 1, 2]
    for epoch, samples in seen.items():
        assert samples == list(range(SAMPLES)), (epoch, script)


def test_a_leave_where_the_rest_of_the_epoch_does_not_split_evenly_drops_less_than_a_step():
    """After step 21, 30 samples into epoch 2, 18 left for 2 workers of batch 2: the last
    2 (less than one global batch) are left out, as DataLoader.set_epoch says; none is
    dealt twice."""
    seen = run({2: ("join", 2), 21: ("leave", 0)})
    assert seen[0] == seen[1] == list(range(SAMPLES))
    assert len(set(seen[2])) == len(seen[2]) == SAMPLES - 2


def test_a_joiner_is_let_in_at_the_first_step_from_which_the_rest_splits_evenly():
    """48 samples, batch 2, 2 -> 3 workers: after 3 steps 36 samples are left, 6 steps of 6."""
    worker = Worker(0, [0, 1], epochs=2)
    for _ in range(2):
        next(worker.steps)
        assert worker.elastic.position_source(3) is None
    next(worker.steps)
    assert worker.elastic.position_source(3) == {"step": 3, "epoch": 0, "start": 12}
    assert worker.elastic.position_source(2) is not None   # the same count: always


def test_where_no_step_splits_evenly_a_joiner_waits_for_the_epoch_end():
    worker = Worker(0, [0, 1], epochs=2)   # 48 samples never split into batches of 5 x 2
    for _ in range(SAMPLES // (2 * BATCH) - 1):
        next(worker.steps)
        assert worker.elastic.position_source(5) is None
    next(worker.steps)
    assert worker.elastic.position_source(5) == {"step": SAMPLES // (2 * BATCH), "epoch": 1,
                                                 "start": 0}


def test_no_joiner_is_let_in_after_the_last_epoch():
    worker = Worker(0, [0, 1], epochs=1)
    for _ in range(SAMPLES // (2 * BATCH)):
        next(worker.steps)
    assert worker.elastic.position_source(3) is None
    assert next(worker.steps, None) is None


def cosine():
    model = dt.nn.Linear(1, 1)
    optimizer = dt.optim.SGD(model.parameters(), lr=1.0)
    # T_max as the program plans it with 2 workers: 3 epochs of 12 steps.
    return optimizer, dt.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=36)


def test_a_cosine_schedule_follows_the_samples_dealt_so_a_joiner_has_the_others_rate():
    (first_optimizer, first_schedule), (joiner_optimizer, joiner_schedule) = cosine(), cosine()
    first = Worker(0, [0, 1], epochs=3, schedule=first_schedule)
    for _ in range(3):
        next(first.steps)
        first_schedule.step()
    position = first.elastic.position_source(3)       # 12 of 144 samples dealt
    first.elastic.change([0, 1, 2])
    joiner = Worker(2, [0, 1, 2], 3, position, position["step"], schedule=joiner_schedule)
    rates = []
    for _ in range(5):
        next(first.steps), next(joiner.steps)
        first_schedule.step(), joiner_schedule.step()
        rates.append((first_optimizer.param_groups[0]["lr"], joiner_optimizer.param_groups[0]["lr"]))
    assert all(a == b for a, b in rates)
    # After 3 + 5 steps, 12 + 5 x 6 = 42 of the 144 samples: cos of that share, not of 8/36.
    assert rates[-1][0] == pytest.approx((1 + math.cos(math.pi * 42 / 144)) / 2)
