"""Model buffers averaged over the workers through the parameter server: BatchNorm's running
mean and variance, so that every worker, and so the saved model, holds statistics of all the
data rather than of its own shard."""
import numpy as np

from disttrain import backend

KEY = "buffers.average"   # not a parameter name: those never contain "average" as a part


class BufferAverage:
    """Every floating-point buffer of ``model`` (in ``named_buffers()`` order) travels as one
    flat key, declared with the servers' *average* rule: in sync mode a server stores the mean
    of the N workers' pushes of a round, in async / ssp modes each push moves the stored value
    1/N of the way towards it. Integer buffers (``num_batches_tracked``) are the same on every
    worker and stay local.

    DataParallel sends a round at every clock, in ``step()`` beside the parameters' messages
    (``send``), and writes the average into the buffers once it arrives (``receive``): after
    each step every worker's running statistics are the mean over workers. A running
    statistic is updated linearly (running = (1 - m) * running + m * batch), so averaging at
    every clock gives exactly what averaging the workers' final statistics of a run would, if
    they had all started from the same ones.
    """

    def __init__(self, model, store):
        self.store = store
        self.buffers = [buffer for _, buffer in model.named_buffers()
                        if buffer is not None and np.dtype(buffer.data.dtype).kind == "f"]
        self.active = bool(self.buffers)
        self.rounds = 0
        if not self.active:
            return
        dtype = np.result_type(*[buffer.data.dtype for buffer in self.buffers])
        self.sizes = [int(buffer.data.size) for buffer in self.buffers]
        self.flat = np.empty(sum(self.sizes), dtype)      # what this worker sends
        self.average = np.empty_like(self.flat)           # what the servers answer
        store.declare(KEY, self.flat.shape, dtype, average=True)

    def gather(self):
        """This worker's buffers, flattened into one host array."""
        offset = 0
        for buffer, size in zip(self.buffers, self.sizes):
            self.flat[offset:offset + size] = backend.to_numpy(buffer.data).reshape(-1)
            offset += size
        return self.flat

    def initial(self):
        """{key: values} for rank 0's init of the servers (empty without buffers)."""
        return {KEY: self.gather().copy()} if self.active else {}

    def send(self, handles):
        """Push this worker's buffers for this round and ask for the round's average; the
        request's handle joins ``handles``. The pushed array is not touched until
        ``receive()``, after the handle is done."""
        if self.active:
            handles.append(self.store.pushpull_async({KEY: self.gather()}, {KEY: self.average},
                                                     self.rounds, lr=0.0))
            self.rounds += 1

    def recover(self, clock, exact):
        """A replacement worker continuing at `clock`: the average every worker holds there."""
        if self.active:
            self.rounds = clock
            self.store.pull({KEY: self.average}, clock, exact=exact)
            self.receive()

    def receive(self):
        """Write the servers' average into the buffers (after the handle from send is done)."""
        if not self.active:
            return
        offset = 0
        for buffer, size in zip(self.buffers, self.sizes):
            values = self.average[offset:offset + size].reshape(buffer.data.shape)
            buffer.data[...] = backend.array_module(buffer.data).asarray(values)
            offset += size
