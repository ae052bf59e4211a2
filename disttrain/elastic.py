"""A worker's side of elastic membership (launch -n MIN:MAX): leave on SIGTERM after a step,
let new workers in, follow who is in the job, and re-split the data when that changes.
DataParallel holds one `WorkerElastic`; ps/elastic.py describes the protocol.

Learning rate: in sync mode the servers average each clock's gradient over the workers
present at that clock, so the global batch is (workers present) x (per-worker batch). By
the linear scaling rule (Goyal et al. 2017) the learning rate should follow the global
batch: lr = base_lr x workers / base_workers. Pass a callback to do that (as Horovod's
elastic state callbacks do):

    def rescale(old, new):
        for group in optimizer.param_groups:
            group["lr"] *= new / old
    DataParallel(model, optimizer, on_membership_change=rescale)

Data: every worker holds the same global position in the epoch's order (workers/harness.py
Batches); when the workers present change at clock k + 1, each re-splits the rest of the
epoch from there over the new count (DataLoader.set_epoch). A worker joins at an epoch
step from which the rest of the epoch splits evenly over the new count (else at the
epoch's end; the marker waits for such a step), so a join leaves no sample out.
"""
import signal
import sys
import threading
import time

from disttrain.observe import channel


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


def active(spans, clock):
    """The worker ranks that count at `clock`, from the servers' spans
    ([rank, first clock, last clock or None] each), sorted."""
    return sorted(rank for rank, first, last in spans
                  if first <= clock and (last is None or clock <= last))


class JobEnded(SystemExit):
    """A joiner that the job never let in before it ended: nothing to do, exit 0."""


class WorkerElastic:
    """Who is in the job, as this worker knows it; the marks of its pushes; its leave."""

    def __init__(self, trainer, on_change=None, min_workers=1, wait_s=60.0):
        self.trainer = trainer
        # Below min_workers the workers pause after their step until joiners registered,
        # for at most wait_s (DISTTRAIN_RESTART_TIMEOUT, else DISTTRAIN_TIMEOUT).
        self.min_workers, self.wait_s = min_workers, wait_s
        self.callbacks = [on_change] if on_change is not None else []
        self.active = [r for r, entry in enumerate(trainer._membership.book["worker"]) if entry]
        self.spans = [[rank, 0, None] for rank in self.active]
        self.leaving = False       # SIGTERM came: leave after the next clock we mark
        self.leave_clock = None    # the clock our pushes marked "leave"
        self.left = False          # that clock is done: stop training, say goodbye
        self.waiting = []          # ranks that registered to join, not in the job yet
        self._seen_notices = 0
        self._marks_clock, self._marks = None, {}
        # Where a joiner starts: {"step", "epoch", "start"} (the harness hands it the
        # marker's), set by admit().
        self.position = None
        # position_source(workers): the harness's Batches position after the current step,
        # or None while `workers` cannot start there without leaving samples out (joiners
        # wait). Without one, joiners come in at once.
        self.position_source = None

    # --- leaving ------------------------------------------------------------------
    def leave_on_sigterm(self):
        """SIGTERM: finish this step (or the next, if this one's pushes already went) and
        leave the job; the others go on. Replaces the checkpoint-on-SIGTERM of
        harness.checkpoints: in an elastic job SIGTERM means "leave"."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        if not self.leaving:
            self.leaving = True
            _say(f"worker {self.trainer.rank} got SIGTERM: it leaves the job after its step")

    # --- marks --------------------------------------------------------------------
    def marks(self, clock):
        """The meta of this worker's pushes of `clock`: fixed at the first push of the
        clock, so that every push of it says the same."""
        if self._marks_clock == clock:
            return self._marks
        marks = {}
        if self.leaving and self.leave_clock is None:
            self.leave_clock = marks["leave"] = clock
        self._take_notices()
        if self.waiting and self.active and self.active[0] == self.trainer.rank:
            workers = len(self.active) + len(self.waiting)
            position = self.position_source(workers) if self.position_source is not None else {}
            if position is not None:
                marks["join"] = [[rank, clock + 1, position] for rank in self.waiting]
        self._marks_clock, self._marks = clock, marks
        return marks

    def _take_notices(self):
        joining = self.trainer._membership.joining
        for rank in joining[self._seen_notices:]:
            if rank not in self.waiting:
                self.waiting.append(rank)
        self._seen_notices = len(joining)

    # --- after each clock ----------------------------------------------------------
    def after_step(self, clock):
        """Clock `clock` is done: take the spans its replies brought; if the workers of
        clock + 1 differ, tell the callbacks (and the trainer's num_workers)."""
        spans = self.trainer._store.members
        if spans is not None:
            self.spans = spans
        now = active(self.spans, clock + 1)
        self.waiting = [rank for rank in self.waiting if rank not in now]
        if self.leave_clock == clock:
            self.left = True
            _say(f"worker {self.trainer.rank} left the job after clock {clock}")
            channel.send("left", {"rank": self.trainer.rank, "clock": clock})   # the launcher
            return
        if now != self.active:
            self._changed(now, clock + 1)
        if len(now) < self.min_workers:
            self._wait_for_workers(len(now))

    def _wait_for_workers(self, count):
        """Below MIN: pause until enough workers registered to join (the first worker lets
        them in at its next step), or fail after wait_s naming the cause."""
        membership = self.trainer._membership
        _say(f"worker {self.trainer.rank}: {count} worker(s) in the job, below the minimum of "
             f"{self.min_workers}; waiting up to {self.wait_s:g} s for workers to join")
        deadline = time.monotonic() + self.wait_s
        while True:
            self._take_notices()
            if count + len(self.waiting) >= self.min_workers or self.leaving:
                return
            membership.check()   # a dead peer ends the wait (PeerDied)
            if membership.shutdown.is_set():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.trainer.rank}: {count} worker(s) in the job, "
                                   f"below the minimum of {self.min_workers}, and none joined "
                                   f"within {self.wait_s:g} s")
            time.sleep(0.05)

    def _changed(self, now, clock):
        old, self.active = self.active, now
        came = sorted(set(now) - set(old))
        went = sorted(set(old) - set(now))
        _say(f"worker {self.trainer.rank}: workers {now} from clock {clock} "
             f"(joined {came or 'none'}, left {went or 'none'})")
        self.trainer.num_workers = len(now)
        for callback in self.callbacks:
            callback(len(old), len(now))

    def shard(self):
        """(num_shards, shard_index) of this worker's part of the data now."""
        return len(self.active), self.active.index(self.trainer.rank)

    # --- joining ------------------------------------------------------------------
    def admit(self, poll_s=0.05):
        """A joiner: wait (up to the timeout) until a worker's push marked our join; return
        the clock we start at, and keep the data position the marker sent (self.position)."""
        trainer, membership = self.trainer, self.trainer._membership
        deadline = time.monotonic() + membership.timeout
        _say(f"worker {trainer.rank} waits to be let into the job (at a step where the data "
             f"splits evenly)")
        while True:
            handle = trainer._store.request("joined", {"rank": trainer.rank})
            handle.wait()
            found = [reply for reply in handle.replies.values() if reply.get("clock") is not None]
            if found:
                break
            if membership.shutdown.is_set():
                _say(f"worker {trainer.rank}: the job ended before it could join; nothing to do")
                raise JobEnded(0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {trainer.rank} was not let into the job within "
                                   f"{membership.timeout:g} s (DISTTRAIN_TIMEOUT): no worker "
                                   f"marked its join")
            time.sleep(poll_s)
        clock, self.position = found[0]["clock"], found[0].get("position")
        self.spans = trainer._store.members or self.spans + [[trainer.rank, clock, None]]
        self.active = active(self.spans, clock)
        trainer.num_workers = len(self.active)
        membership.joined()
        _say(f"worker {trainer.rank} joined at clock {clock}; workers {self.active}")
        return clock
