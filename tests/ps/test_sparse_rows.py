"""Row-sparse keys as word2vec uses them, against a scheduler and servers on threads of the
test process: a push of no rows counts as "no gradient this clock", pulls and pushes name
rows in any order and repeated, and a sparse Embedding trains through DataParallel exactly
like the local optimizer for every batch shape (empty, one row, every row, a row twice)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.parallel import DataParallel
from disttrain.tensor import RowSparseGrad
from tests.ps.inprocess import job, run_workers

SGD1 = {"name": "sgd", "hyper": {"lr": 1.0}}
ROWS, DIM = 200, 128   # 100 KB: split over 2 servers, rows 0..99 and 100..199


def table():
    return np.arange(ROWS * DIM, dtype=np.float32).reshape(ROWS, DIM) / 100


def sparse(rows, values):
    return RowSparseGrad(np.asarray(rows, np.int64), values, (ROWS, DIM))


def two_workers_on_a_split_table(connect):
    stores = [store for _, store in connect()]
    for store in stores:
        store.declare("emb", (ROWS, DIM), np.float32, sparse=True)
    assert len({chunk.server for chunk in stores[0].specs["emb"][3]}) == 2
    stores[0].init({"emb": table()}, SGD1)
    return stores


def test_a_push_of_no_rows_counts_as_no_gradient_this_clock():
    with job(2, 2) as connect:
        stores = two_workers_on_a_split_table(connect)
        values = np.ones((3, DIM), np.float32)
        gradients = [sparse([], np.zeros((0, DIM), np.float32)), sparse([1, 50, 150], values)]
        run_workers(2, lambda rank: stores[rank].push({"emb": gradients[rank]}, 0, lr=1.0))
        # Clock 1 is complete only if both pushes counted: this pull waits for it.
        out = np.zeros((ROWS, DIM), np.float32)
        stores[0].pull({"emb": out}, 1)
        expected = table()
        expected[[1, 50, 150]] -= 0.5   # the mean over 2 workers of one push
        np.testing.assert_array_equal(out, expected)
        # A clock where no worker touches a row completes too and changes nothing.
        run_workers(2, lambda rank: stores[rank].push({"emb": gradients[0]}, 1, lr=1.0))
        stores[1].pull({"emb": out}, 2)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("rows", [[150, 3, 150, 99, 3, 100],   # unsorted, repeated, both servers
                                  [7],                          # one row
                                  list(range(ROWS))[::-1],      # every row, backwards
                                  []],                          # none
                         ids=["unsorted-repeated", "one-row", "every-row", "no-rows"])
def test_a_row_pull_writes_exactly_the_named_rows_in_any_order(rows):
    with job(1, 2) as connect:
        [(_, store)] = connect()
        store.declare("emb", (ROWS, DIM), np.float32, sparse=True)
        store.init({"emb": table()}, SGD1)
        out = np.full((ROWS, DIM), -1, np.float32)
        store.pull({"emb": out}, 0, rows={"emb": np.array(rows, np.int64)})
        named = np.zeros(ROWS, bool)
        named[rows] = True
        np.testing.assert_array_equal(out[named], table()[named])
        assert (out[~named] == -1).all()


def test_a_push_naming_a_row_twice_sums_its_values():
    with job(1, 2) as connect:
        [(_, store)] = connect()
        store.declare("emb", (ROWS, DIM), np.float32, sparse=True)
        store.init({"emb": table()}, SGD1)
        values = np.stack([np.full(DIM, v, np.float32) for v in (1, 2, 4, 8)])
        store.push({"emb": sparse([120, 5, 120, 0], values)}, 0, lr=1.0)
        out = np.zeros((ROWS, DIM), np.float32)
        store.pull({"emb": out}, 1)
        expected = table()
        expected[120] -= 1 + 4
        expected[5] -= 2
        expected[0] -= 8
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("rows, error", [([3, ROWS], "rows 3..200 outside the table's 0..199"),
                                         ([-1], "rows -1..-1 outside"),
                                         ([1.5], "row indices must be integers")])
def test_bad_row_ids_are_named_before_anything_is_sent(rows, error):
    with job(1, 1) as connect:
        [(_, store)] = connect()
        store.declare("emb", (ROWS, DIM), np.float32, sparse=True)
        with pytest.raises((ValueError, TypeError), match=error):
            store.pull({"emb": np.zeros((ROWS, DIM), np.float32)}, 0, rows={"emb": rows})


def test_values_that_do_not_match_the_rows_are_named():
    with job(1, 1) as connect:
        [(_, store)] = connect()
        store.declare("emb", (ROWS, DIM), np.float32, sparse=True)
        with pytest.raises(ValueError, match=r"2 rows but values of shape \(3, 128\)"):
            store.push({"emb": sparse([1, 2], np.zeros((3, DIM), np.float32))}, 0, lr=1.0)


class SkipGram(nn.Module):
    """word2vec's two sparse tables, scored by dot products of centre and context rows."""

    def __init__(self):
        super().__init__()
        dt.manual_seed(0)
        self.centre = nn.Embedding(12, 5, sparse=True)
        self.context = nn.Embedding(12, 5, sparse=True)

    def forward(self, centres, contexts):
        return (self.centre(centres) * self.context(contexts)).sum(axis=-1)


BATCHES = {"empty": ([], []), "one-row": ([4], [4]), "every-row": (list(range(12)), list(range(12))[::-1]),
           "a-row-twice": ([3, 3, 9], [1, 1, 3])}


def train(model, stepper):
    for centres, contexts in BATCHES.values():
        stepper.zero_grad()
        scores = model(np.array(centres, np.int64), np.array(contexts, np.int64))
        # sum, not mean: an empty batch has loss 0 and no gradient rows
        (scores * scores).sum().backward()
        stepper.step()


def test_sparse_tables_train_like_the_local_optimizer_on_every_batch_shape(one_worker_job):
    model, local = SkipGram(), SkipGram()
    with DataParallel(model, optim.SGD(model.parameters(), lr=0.05)) as parallel:
        assert set(parallel._sparse) == {"centre.weight", "context.weight"}
        train(model, parallel)
    train(local, optim.SGD(local.parameters(), lr=0.05))
    for name, expected in local.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[name], expected, rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    assert not np.array_equal(local.state_dict()["centre.weight"], SkipGram().state_dict()["centre.weight"])
