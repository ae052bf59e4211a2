"""What every worker program shares: the common flags, a progress bar, per-step metrics,
checkpoints and the JSON summary."""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import disttrain as dt
from disttrain import config
from disttrain.observe import jsonl, tensorboard
from disttrain.checkpoint_dist import PREEMPTED_EXIT, Checkpoints  # noqa: F401 (PREEMPTED_EXIT: for workers)

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


def parser(description, *, epochs, batch_size, lr):
    """An ArgumentParser holding the common worker flags of DESIGN.md, with per-model defaults."""
    try:
        settings = config.from_env()
    except config.ConfigError as error:
        sys.exit(f"error: {error}")
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=float, default=epochs, help="passes over the training data (fractions allowed)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="per-worker batch size")
    p.add_argument("--lr", type=float, default=lr, help="learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(REPO_DATA), help="folder holding the datasets")
    p.add_argument("--mode", choices=["sync", "async", "ssp"], default="sync",
                   help="parameter-server consistency when launched with several workers")
    p.add_argument("--staleness", type=int, default=2, help="clock bound for --mode ssp")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save here after every epoch, the last step and on SIGTERM; a rerun resumes from here")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="also save every STEPS steps")
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                   help="keep the K newest checkpoints (default 3)")
    p.add_argument("--metrics", default=None, help="also write the JSON summary line to this file")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this step of the job, counted from its start across resumes")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--device", default=settings.device,
                   help="cpu or cuda:N (default: $DISTTRAIN_DEVICE, which the launcher sets, else cpu)")
    p.add_argument("--loss-log", default=None, help="append 'step loss' lines to this file (rank 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (also: DISTTRAIN_PROGRESS=0)")
    p.add_argument("--metrics-dir", default=settings.metrics_dir,
                   help="append per-step JSON lines to DIR/worker-RANK.jsonl; the servers "
                        "write DIR/server-RANK.jsonl (see `python -m disttrain.plot`; "
                        "default: $DISTTRAIN_METRICS_DIR, which the servers read too)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="rank 0 writes TensorBoard scalars to a new run directory in DIR "
                        "(needs tensorboardX: pip install 'disttrain[observe]')")
    p.add_argument("--tensorboard-every", type=int, default=10, metavar="STEPS",
                   help="one TensorBoard point per this many steps (their mean)")
    p.add_argument("--slow-ms", type=float, default=0.0,
                   help="sleep this long every step on --slow-rank: a straggler, for tests")
    p.add_argument("--slow-rank", type=int, default=0, help="the rank that --slow-ms slows down")
    return p


def prepare(args):
    """Validate the common flags, seed the library's RNG and tune the allocator for numpy."""
    for name in ("epochs", "batch_size", "lr"):
        if getattr(args, name) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        sys.exit(f"error: --checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.keep_checkpoints < 1:
        sys.exit(f"error: --keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.staleness < 0:
        sys.exit(f"error: --staleness must be >= 0, got {args.staleness}")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        sys.exit(f"error: --device must be cpu or cuda:N, got {args.device!r}")
    if args.slow_ms < 0 or args.tensorboard_every < 1:
        sys.exit(f"error: --slow-ms must be >= 0 and --tensorboard-every >= 1, got "
                 f"{args.slow_ms} and {args.tensorboard_every}")
    args.tensorboard_run = None
    if args.tensorboard:
        tensorboard.require()
        args.tensorboard_run = tensorboard.run_directory(args.tensorboard, Path(sys.argv[0]).stem or "run")
    # The servers learn it from rank 0's init (pass it to DataParallel(metrics_dir=)): its
    # own, or its TensorBoard run directory, where rank 0 reads their throughput.
    args.servers_metrics_dir = args.metrics_dir or args.tensorboard_run
    dt.manual_seed(args.seed)
    dt.backend.keep_freed_memory()


class Progress:
    """A one-line progress bar on stderr, as tqdm does it: redrawn in place on a terminal; a
    plain line every 10 s when stderr is a pipe or a file (batch logs, the launcher); off with
    --no-progress or DISTTRAIN_PROGRESS=0. (tqdm itself would add a dependency for these
    forty lines.)"""

    def __init__(self, total, label, enabled=True):
        enabled = enabled and config.from_env().progress   # DISTTRAIN_PROGRESS=0: off
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last_draw = time.perf_counter()
        self.samples = 0

    def update(self, step, samples, **values):
        self.samples += samples
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < (0.2 if self.tty else 10.0) and step < self.total):
            return
        self.last_draw = now
        width = 24
        filled = int(width * step / max(self.total, 1))
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        rate = self.samples / max(now - self.start, 1e-9)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
                f"{shown} {rate:.0f} samples/s {now - self.start:.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


class Monitor:
    """What a worker program reports each step: the progress bar, --loss-log, --metrics-dir
    (one JSON line per step: loss, lr, samples/s and the step's time split from
    DataParallel), --tensorboard (rank 0) and the --slow-ms straggler.

        monitor = harness.Monitor(args, trainer, last, f"lenet rank {trainer.rank}")
        for step, batch in ...:
            ... trainer.step()
            monitor.step(step + 1, loss.item(), len(x), shown_loss=..., accuracy=...)
        monitor.close()
    """

    def __init__(self, args, trainer, total, label):
        self.trainer = trainer
        self.progress = Progress(total, label, not args.no_progress)
        self.loss_log = LossLog(args, trainer)
        self.file = jsonl.JsonLines(jsonl.worker_path(args.metrics_dir, trainer.rank)) \
            if args.metrics_dir else None
        self.board = None
        if args.tensorboard and trainer.rank == 0:
            self.board = tensorboard.Board(args.tensorboard_run, args.tensorboard_every,
                                           args.metrics_dir or args.tensorboard_run)
            print(f"tensorboard: writing {args.tensorboard_run} "
                  f"(tensorboard --logdir {args.tensorboard})", file=sys.stderr)
        self.slow_s = args.slow_ms / 1000 if trainer.rank == args.slow_rank else 0.0
        trainer.timer.restart()   # what came before the first step is not a step
        self.last = time.perf_counter()

    def step(self, step, loss, samples, shown_loss=None, **values):
        """After trainer.step(): `loss` of this step, `samples` this worker trained on,
        `shown_loss` for the bar (a running mean), `values` more per-step figures (accuracy)."""
        now = time.perf_counter()
        step_s, self.last = now - self.last, now
        self.loss_log.write(step, loss)
        self.progress.update(step, samples, loss=loss if shown_loss is None else shown_loss)
        if self.file is not None or self.board is not None:
            # DataParallel's split of the step: compute_s + push_s + pull_s + apply_s, and
            # step_s, measured from the end of the previous step() to the end of this one.
            split = self.trainer.timer.last or {"step_s": step_s}
            record = {"step": step, "time": round(time.time(), 6), "loss": loss,
                      "lr": self.trainer.optimizer.param_groups[0]["lr"],
                      "samples_per_s": samples / split["step_s"] if split["step_s"] > 0 else None,
                      **values, **split}
            if self.file is not None:
                self.file.write(record)
            if self.board is not None:
                self.board.step(record)
        if self.slow_s:
            time.sleep(self.slow_s)

    def evaluation(self, step, **values):
        """Figures measured now and then (a validation loss, a test accuracy)."""
        if self.file is not None:
            self.file.write({"step": step, "time": round(time.time(), 4), "eval": values})
        if self.board is not None:
            for name, value in values.items():
                if value is not None:
                    self.board.scalar(f"eval/{name}", value, step)

    def close(self):
        self.progress.close()
        self.loss_log.close()
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def on_device(array, args):
    """A batch array as a Tensor on --device (no copy on the CPU)."""
    return dt.tensor(array).to(args.device) if args.device != "cpu" else dt.tensor(array)


def planned_steps(loader, args):
    """Steps in --epochs: what learning-rate schedules span, whatever --max-steps stops at."""
    return math.ceil(args.epochs * len(loader))


def total_steps(loader, args):
    steps = planned_steps(loader, args)
    return min(steps, args.max_steps) if args.max_steps else steps


class LossLog:
    """--loss-log: one 'step loss' line per step from rank 0, flushed as it goes."""

    def __init__(self, args, trainer):
        # Line-buffered: what a crashed run logged is on disk.
        self.file = open(args.loss_log, "a", buffering=1) if args.loss_log and trainer.rank == 0 else None

    def write(self, step, loss):
        if self.file:
            self.file.write(f"{step} {loss!r}\n")

    def close(self):
        if self.file:
            self.file.close()


def checkpoints(args):
    """The job's checkpoints in --checkpoint-dir (None without one); hand it to DataParallel.
    From here on SIGTERM (preemption) means: write a checkpoint at the next step, then stop."""
    if not args.checkpoint_dir:
        return None
    saved = Checkpoints(args.checkpoint_dir, args.checkpoint_every, args.keep_checkpoints)
    saved.stop_on_sigterm()
    return saved


def resume(saved, trainer, model, optimizer, schedule=None, loader=None):
    """Where to start: {"step", "epoch", "start"} of the checkpoint resumed (None: afresh).

    A replacement of a dead worker (trainer.recovered_clock = c) starts c steps after the
    start of this launch (the checkpoint the job resumed from, else step 0): at the data
    position of that step in `loader` (the DataLoader that Batches deals from; programs whose
    data depends on the step alone leave it out) and with `schedule` stepped c times, so it
    sees exactly the samples its predecessor would have. The library RNG is not recovered:
    it starts from the seed (or the checkpoint's state) again."""
    position = saved.resume(trainer, model, optimizer, schedule) if saved is not None else None
    joined = getattr(trainer, "elastic", None) and trainer.elastic.position
    if joined:   # a worker that joined an elastic job: where the worker letting it in was
        if schedule is not None:
            for _ in range(joined["step"]):
                schedule.step()
        print(f"disttrain: worker {trainer.rank} joins at step {joined['step']} (epoch "
              f"{joined['epoch']}, sample {joined['start']} of it)", file=sys.stderr, flush=True)
        return dict(joined)
    clock = getattr(trainer, "recovered_clock", None)
    if clock is None:
        return position
    position = position or {"step": 0, "epoch": 0, "start": 0}
    if loader is not None:
        position = advance(loader, position, clock)
    else:
        position = dict(position, step=position["step"] + clock)
    if schedule is not None:   # where the rate of step `position["step"]` is
        for _ in range(clock):
            schedule.step()
    print(f"disttrain: worker {trainer.rank} continues at step {position['step']} "
          f"(epoch {position['epoch']}, sample {position['start']} of it)", file=sys.stderr,
          flush=True)
    return position


def advance(loader, position, steps):
    """`position` ({"step", "epoch", "start"}) moved on by `steps` steps of `loader`, as
    Batches would deal them."""
    epoch, start = position["epoch"], position["start"]
    per_batch = loader.batch_size * loader.num_shards
    left_steps = steps
    while left_steps:
        left = len(loader.shard_indices(epoch, start))
        count = left // loader.batch_size if loader.drop_last else -(-left // loader.batch_size)
        if count == 0 and start == 0:
            raise ValueError(f"an epoch of {len(loader.dataset)} samples holds no batch")
        if left_steps < count:
            start += left_steps * per_batch
            break
        left_steps -= count
        epoch, start = epoch + 1, 0
    return {"step": position["step"] + steps, "epoch": epoch, "start": start}


def after_step(saved, step, batches, model, optimizer, schedule=None, last=None):
    """Checkpoint if one is due after `step`; True when preempted: stop and return PREEMPTED_EXIT."""
    if saved is None:
        return False
    return saved.after_step(step, batches.position, model, optimizer, schedule, last=step == last)


class Batches:
    """(step, batch) pairs from first_step to last_step, across epochs of a deterministic loader.

    Each epoch's order depends only on (seed, epoch), so a resumed run starts at the global
    sample position its checkpoint recorded ("start" samples into "epoch") and then sees
    exactly what the interrupted run would have seen, even with another number of workers.
    `position` is where a checkpoint taken after the last yielded batch resumes.
    """

    def __init__(self, loader, first_step, last_step, position=None):
        self.loader, self.first, self.last = loader, first_step, last_step
        # Elastic jobs (see `elastic` below): stop at this epoch rather than at a step
        # count (steps per epoch change with the workers), or when `until()` says so.
        self.end_epoch, self.until = None, None
        self.next_step = first_step   # the step after the last yielded one
        if position is None:
            epoch, skip = divmod(first_step, len(loader))
            position = {"epoch": epoch, "start": skip * loader.batch_size * loader.num_shards}
        self.position = {"epoch": position["epoch"], "start": position["start"], "epoch_end": False}

    def _done(self):
        return (self.until is not None and self.until()) or \
            (self.end_epoch is not None and self.position["epoch"] >= self.end_epoch)

    def __iter__(self):
        loader, step = self.loader, self.first
        while step < self.last and not self._done():
            # Elastic: the loader is re-split when the workers change; the rest of the
            # epoch is dealt over the new ones from the global position reached.
            split = (loader.num_shards, loader.shard_index)
            per_batch = loader.batch_size * loader.num_shards
            epoch, start = self.position["epoch"], self.position["start"]
            left = len(loader.shard_indices(epoch, start))
            count = left // loader.batch_size if loader.drop_last else -(-left // loader.batch_size)
            if count == 0 and start == 0:
                raise ValueError(f"an epoch of {len(loader.dataset)} samples holds no batch")
            loader.set_epoch(epoch, start)
            for index, batch in enumerate(loader):
                if step >= self.last:
                    break
                end = index == count - 1
                self.position = {"epoch": epoch + 1 if end else epoch,
                                 "start": 0 if end else start + (index + 1) * per_batch,
                                 "epoch_end": end}
                self.next_step = step + 1
                yield step, batch
                step += 1
                if self._done() or split != (loader.num_shards, loader.shard_index):
                    break
            if count == 0:
                self.position = {"epoch": epoch + 1, "start": 0, "epoch_end": False}


def shard_of(trainer):
    """(num_shards, shard_index) of this worker's part of the data: its rank among the
    workers, or in an elastic job its place among those in the job now."""
    if getattr(trainer, "elastic", None) is not None:
        return trainer.elastic.shard()
    return trainer.num_workers, trainer.rank


def elastic(trainer, loader, batches, args, schedule=None):
    """Hooks an elastic job's worker (launch -n MIN:MAX) to its data: the loader is re-split
    whenever workers join or leave; the run stops at the end of epoch ceil(--epochs) (steps
    per epoch change with the workers) or when this worker has left (SIGTERM); a worker that
    is first in the job lets waiting joiners in at the next step from which the rest of the
    epoch splits evenly over the new count (else at the epoch's end), handing them the data
    position, so a join leaves no sample out. A `schedule` with a T_max (cosine) follows the
    share of the run's samples dealt rather than the step count, which changes with the
    workers: every worker, joiners included, then has the same rate at the same clock.
    Nothing happens outside an elastic job."""
    if getattr(trainer, "elastic", None) is None:
        return
    state = trainer.elastic

    def reshard(old, new):
        loader.num_shards, loader.shard_index = state.shard()

    def boundary(workers):   # the position after this step, if `workers` can start there
        position = batches.position
        if position["epoch"] >= batches.end_epoch:
            return None
        if position["epoch_end"] or splits_evenly(loader, position["epoch"], position["start"],
                                                  workers):
            return {"step": batches.next_step, "epoch": position["epoch"],
                    "start": position["start"]}
        return None

    state.callbacks.append(reshard)
    state.position_source = boundary
    batches.end_epoch = math.ceil(args.epochs)
    batches.last = math.inf
    batches.until = lambda: state.left
    if schedule is not None and hasattr(schedule, "T_max"):
        by_steps = schedule.step

        def by_samples():
            position = batches.position
            done = (position["epoch"] + position["start"] / len(loader.dataset)) / batches.end_epoch
            schedule.last_epoch = done * schedule.T_max - 1
            by_steps()
        schedule.step = by_samples
        by_samples()   # the rate of the first step from here (a joiner's, mid-run)


def splits_evenly(loader, epoch, start, shards):
    """True when the rest of `epoch` from global position `start` deals into whole batches
    over `shards` workers with no sample left out."""
    saved = loader.num_shards, loader.shard_index
    loader.num_shards, loader.shard_index = shards, 0
    try:
        left = len(loader.shard_indices(epoch, start))
    finally:
        loader.num_shards, loader.shard_index = saved
    return left % loader.batch_size == 0 and left * shards == len(loader.dataset) - start


def summary(args, trainer, model_name, **fields):
    """Rank 0 prints the JSON summary as its last stdout line, and writes it to --metrics
    (in an elastic job: the first worker still in the job; none from one that left)."""
    state = getattr(trainer, "elastic", None)
    if (trainer.rank != 0 if state is None else (state.left or trainer.rank != state.active[0])):
        return None
    line = {"model": model_name, "epochs": args.epochs, "workers": trainer.num_workers,
            "servers": trainer.num_servers,
            "mode": args.mode if trainer.is_distributed else "local"}
    line.update(fields)
    text = json.dumps(line)
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(text + "\n")
    print(text, flush=True)
    return line
