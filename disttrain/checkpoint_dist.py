"""Checkpoints of whole jobs: DIR/step-NNNNNN/ holds one safetensors file per server shard and
per worker and a manifest.json written last; DIR/latest names the newest complete one. Workers
write them at one consistent clock, resume from them (re-cut for other server and worker
counts), fall back past damaged ones; `python -m disttrain.checkpoint export` joins one into a file."""
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np

from disttrain import backend, checkpoint, random
from disttrain.ps import snapshot
from disttrain.ps.snapshot import MANIFEST, SnapshotError

FORMAT = 1
LATEST = "latest"
# A worker stopped by SIGTERM after writing its checkpoint exits with EX_TEMPFAIL (sysexits.h):
# "try again later" is what a rerun of the same command does; the launcher exits with it too.
PREEMPTED_EXIT = 75
PREEMPTING = ".preempting"   # where async/ssp workers write their files on preemption


def step_name(step):
    return f"step-{step:06d}"


def worker_file(rank):
    return f"worker-{rank}.safetensors"


def _say(text):
    print(f"disttrain: {text}", file=sys.stderr, flush=True)


# --- the directory ------------------------------------------------------------------
def atomic_write_text(path, text):
    """Write a small file so that readers see the old or the new content, never a mix:
    a temporary file, fsync, rename over, fsync of the folder (the rename itself)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    snapshot.fsync_directory(path.parent)


def _step_of(path):
    try:
        return int(path.name[len("step-"):])
    except ValueError:
        return None


def step_directories(directory):
    """(step, path) of every DIR/step-N folder, complete or not, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(_step_of(path), path) for path in directory.glob("step-*") if path.is_dir()]
    return sorted(((step, path) for step, path in found if step is not None), reverse=True)


def complete_checkpoints(directory):
    """Checkpoints whose manifest exists, the one DIR/latest names first, then newest first."""
    directory = Path(directory)
    complete = [path for _, path in step_directories(directory) if (path / MANIFEST).exists()]
    try:
        latest = directory / (directory / LATEST).read_text().strip()
    except OSError:
        latest = None
    if latest in complete:
        complete.remove(latest)
        complete.insert(0, latest)
    return complete


def verify(step_dir, roles=("worker",)):
    """The manifest of `step_dir`, after checking the size and sha256 of its files of these
    roles (servers check their own shards as they read them); CheckpointError naming the file."""
    try:
        manifest = snapshot.read_manifest(step_dir)
    except SnapshotError as error:
        raise checkpoint.CheckpointError(str(error)) from None
    if manifest.get("format") != FORMAT:
        raise checkpoint.CheckpointError(f"{step_dir}/{MANIFEST}: format {manifest.get('format')!r}, "
                                         f"this version reads {FORMAT}")
    for entry in manifest["files"]:
        if entry.get("role") in roles:
            _check_file(Path(step_dir) / entry["file"], entry["size"], entry["sha256"])
    return manifest


def _check_file(path, size, sha256):
    try:
        actual = path.stat().st_size
    except OSError as error:
        raise checkpoint.CheckpointError(f"{path} is missing ({error.strerror})") from None
    if actual != size:
        raise checkpoint.CheckpointError(f"{path} is {actual} bytes, but the manifest says {size} "
                                         f"(truncated or overwritten)")
    if file_digest(path) != sha256:
        raise checkpoint.CheckpointError(f"{path}: sha256 differs from the manifest's (corrupted)")


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(checkpoint.HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path, role, rank):
    path = Path(path)
    return {"file": path.name, "size": path.stat().st_size, "sha256": file_digest(path),
            "role": role, "rank": rank}


def prune(directory, keep):
    """Keep the `keep` newest complete checkpoints; drop older ones and older leftovers of
    interrupted writes (never anything newer than the newest complete one)."""
    complete = [(step, path) for step, path in step_directories(directory)
                if (path / MANIFEST).exists()]
    if not complete:
        return
    kept = {path for _, path in complete[:keep]}
    newest = complete[0][0]
    for step, path in step_directories(directory):
        if path not in kept and step <= newest:
            shutil.rmtree(path, ignore_errors=True)


def key_layout(store):
    """{key: {shape, dtype, sparse, average, chunks: [[index, server, row_start, row_stop],
    ...]}}; an average key holds buffers averaged over the workers, not a parameter."""
    return {name: {"shape": list(shape), "dtype": dtype.name, "sparse": bool(sparse),
                   "average": name in store.averaged,
                   "chunks": [[c.index, c.server, c.row_start, c.row_stop] for c in chunks]}
            for name, (shape, dtype, sparse, chunks) in store.specs.items()}


# --- the worker side ----------------------------------------------------------------
class Checkpoints:
    """A worker's checkpoints in `directory`: `every` steps (None: only at epoch ends, the
    last step and preemption), the `keep` newest kept. Pass it to DataParallel (which lets
    it restore the servers before anyone pulls), then call `resume(...)` for the step to
    start at and `after_step(...)` after each step."""

    def __init__(self, directory, every=None, keep=3):
        if every is not None and every < 1:
            raise ValueError(f"Checkpoints: every={every} must be >= 1 step (or None)")
        if keep < 1:
            raise ValueError(f"Checkpoints: keep={keep} must be >= 1")
        self.directory, self.every, self.keep = Path(directory), every, keep
        self.trainer = None
        self.restored = None      # (step dir, manifest) this job resumes from
        self.preempted = False    # SIGTERM arrived
        self.stopped = False      # wrote the preemption checkpoint: stop now

    # It drives DataParallel's KVStore (ops checkpoint / restore / restored, the preemption
    # flag) and Membership (barriers) directly: they are the job's own connections.
    def stop_on_sigterm(self):
        """SIGTERM (the launcher passing on a preemption) asks for a checkpoint at the next
        clock every worker agrees on, then a stop with PREEMPTED_EXIT."""
        def on_sigterm(signum, frame):
            self.preempted = True
            if self.trainer is not None and self.trainer.is_distributed:
                self.trainer._store.ask_checkpoint = True
        signal.signal(signal.SIGTERM, on_sigterm)

    # --- resuming -------------------------------------------------------------------
    def _newest_usable(self, load):
        """(step dir, manifest) of the first checkpoint, DIR/latest's then newest first, whose
        manifest and worker files check out and that `load(step_dir, manifest)` takes; says
        which were refused and why; None when there is none at all."""
        refused = []
        for step_dir in complete_checkpoints(self.directory):
            try:
                manifest = verify(step_dir)
                load(step_dir, manifest)
            except (checkpoint.CheckpointError, RuntimeError) as error:   # PSError: a server's
                _say(f"refusing checkpoint {step_dir.name}: {error}")
                refused.append(step_dir.name)
                continue
            if refused:
                _say(f"resuming from {step_dir.name}, the newest complete checkpoint "
                     f"(refused: {', '.join(refused)})")
            return step_dir, manifest
        if refused:
            raise RuntimeError(f"no usable checkpoint in {self.directory} (refused: "
                               f"{', '.join(refused)}); move it away to start afresh")
        return None

    def restore_servers(self, trainer):
        """Rank 0, after init and before any pull: load the newest usable checkpoint into
        the servers (each checks the shards it reads), falling back past damaged ones."""
        def load(step_dir, manifest):
            if not manifest["servers"]:
                raise checkpoint.CheckpointError(
                    f"{step_dir} was written by a single process (no servers); resume it "
                    f"without the launcher, or move it away to start afresh")
            trainer._store.request("restore", {"dir": str(step_dir),
                                               "step": manifest["step"]}).wait()
        self._newest_usable(load)

    def learn_restored(self, trainer):
        """Every worker, after the barrier that follows restore_servers: which checkpoint
        (if any) the servers hold, so that all workers resume from the same one."""
        self.trainer = trainer
        trainer._store.ask_checkpoint = self.preempted   # a SIGTERM during start-up
        handle = trainer._store.request("restored", {}, servers=[0])
        handle.wait()
        restored = next(iter(handle.replies.values()))["restored"]
        if restored is not None:
            step_dir = Path(restored["dir"])
            self.restored = (step_dir, verify(step_dir))

    def _restore_local(self):
        """One process: the newest usable checkpoint that a single process wrote."""
        def load(step_dir, manifest):
            if manifest["servers"]:
                raise checkpoint.CheckpointError(
                    f"{step_dir} was written by {manifest['servers']} servers; resume it with "
                    f"the launcher (python -m launch -s N ...)")
        self.restored = self._newest_usable(load)

    def resume(self, trainer, model, optimizer, schedule=None):
        """Restore this worker's own state; returns the position to start from as
        {"step", "epoch", "start"} (start: samples of that epoch's order already consumed by
        the whole job), or None for a fresh run."""
        self.trainer = trainer
        if not trainer.is_distributed:
            self._restore_local()
        if self.restored is None:
            return None
        step_dir, manifest = self.restored
        rank = trainer.rank if trainer.rank < manifest["workers"] else 0
        entry = next(e for e in manifest["files"]
                     if e["role"] == "worker" and e["rank"] == rank)
        state = checkpoint.load_verified(step_dir / entry["file"], entry["size"], entry["sha256"])
        if not trainer.is_distributed:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        elif state["buffers"]:
            model.load_state_dict(state["buffers"], strict=False)
        if schedule is not None and state.get("schedule") is not None:
            schedule.load_state_dict(state["schedule"])
        if rank == trainer.rank:   # a new worker draws its own numbers from its seed
            random.default_rng().bit_generator.state = state["rng"]
        position = {"step": manifest["step"], "epoch": manifest["epoch"],
                    "start": manifest["start"]}
        if trainer.num_workers == manifest["workers"] and manifest["mode"] in ("async", "ssp"):
            position = {name: state[name] for name in ("step", "epoch", "start")}
        _say(f"resumed from {step_dir} at step {position['step']} (written by "
             f"{manifest['workers']} workers, {manifest['servers']} servers)")
        return position

    # --- writing --------------------------------------------------------------------
    def after_step(self, step, position, model, optimizer, schedule=None, last=False):
        """Write a checkpoint after `step` if one is due (every N steps, an epoch's end, the
        last step, preemption); True when the worker must stop now (preempted)."""
        trainer = self.trainer
        asked = self._preemption_clock()
        due = asked or last or position["epoch_end"] or (self.every and step % self.every == 0)
        if due:
            # Async/ssp workers hear of a preemption at different steps: they meet in a
            # folder whose name they all know, which rank 0 then renames after its step.
            staging = asked and trainer.is_distributed and trainer.mode != "sync"
            self.write(step, position, model, optimizer, schedule,
                       folder=PREEMPTING if staging else None)
        self.stopped = bool(asked)
        return self.stopped

    def _preemption_clock(self):
        trainer = self.trainer
        if not trainer.is_distributed:
            return self.preempted
        clock = trainer._store.checkpoint_clock
        if clock is None:
            return False
        # Sync: every worker learns of the clock a preempted worker asked for in the
        # replies of that clock, and writes after it; async/ssp write once they hear.
        return trainer.mode != "sync" or clock <= trainer.clock - 1

    def write(self, step, position, model, optimizer, schedule=None, folder=None):
        """Every worker calls this at the same step (or, with `folder`, the same moment):
        its own file, then (rank 0) the servers' shards, the manifest and DIR/latest, between
        barriers so that no push of the next clock reaches a server before its shard is
        written."""
        trainer = self.trainer
        step_dir = self.directory / step_name(step)
        shared = self.directory / folder if folder else step_dir
        if trainer.rank == 0:
            for stale in {shared, step_dir}:
                if stale.exists():   # an interrupted or superseded write of this step
                    shutil.rmtree(stale)
            shared.mkdir(parents=True)
        self._barrier()
        state = {"rank": trainer.rank, "step": step, "epoch": position["epoch"],
                 "start": position["start"], "rng": random.default_rng().bit_generator.state,
                 "buffers": {name: backend.to_numpy(getattr(value, "data", value))
                             for name, value in model.named_buffers()},
                 "schedule": schedule.state_dict() if schedule is not None else None}
        if not trainer.is_distributed:
            state["model"] = model.state_dict()
            state["optimizer"] = optimizer.state_dict()
        checkpoint.save(state, shared / worker_file(trainer.rank))
        self._barrier()
        if trainer.rank == 0:
            if shared != step_dir:
                os.replace(shared, step_dir)
            self._write_manifest(step, step_dir, position)
        self._barrier()

    def _barrier(self):
        if self.trainer.is_distributed:
            self.trainer._membership.barrier("worker")

    def _write_manifest(self, step, step_dir, position):
        trainer = self.trainer
        files, layout, servers = [], {}, 0
        if trainer.is_distributed:
            handle = trainer._store.request("checkpoint", {"dir": str(step_dir), "step": step})
            handle.wait()
            files = [handle.replies[sender] for sender in sorted(handle.replies)]
            layout, servers = key_layout(trainer._store), len(trainer._store.connections)
        files += [file_entry(step_dir / worker_file(rank), "worker", rank)
                  for rank in range(trainer.num_workers)]
        manifest = {"format": FORMAT, "step": step, "epoch": position["epoch"],
                    "start": position["start"], "servers": servers,
                    "workers": trainer.num_workers,
                    "mode": trainer.mode if trainer.is_distributed else "local",
                    "optimizer": trainer.optimizer.config(), "layout": layout, "files": files}
        atomic_write_text(step_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        atomic_write_text(self.directory / LATEST, step_dir.name + "\n")
        prune(self.directory, self.keep)


# --- export -------------------------------------------------------------------------
def full_state(step_dir):
    """{key: {"param": full array, "step": int | per-row array | None, "state": {name:
    full array}}} of a verified checkpoint: the servers' chunks joined (or a single
    process's model and optimizer)."""
    step_dir = Path(step_dir)
    manifest = verify(step_dir, roles=("worker", "server"))
    if not manifest["servers"]:
        saved = checkpoint.load(step_dir / worker_file(0))
        names = list(saved["model"])
        result = {name: {"param": np.asarray(value), "step": None, "state": {}}
                  for name, value in saved["model"].items()}
        optimizer_state = saved["optimizer"]["state"]
        params = [index for group in saved["optimizer"]["param_groups"] for index in group["params"]]
        by_index = dict(zip(params, [n for n in names if n in result]))
        for index, state in optimizer_state.items():
            name = by_index.get(int(index))
            if name is not None:
                result[name]["step"] = state.get("step")
                result[name]["state"] = {k: np.asarray(v) for k, v in state.items() if k != "step"}
        return result
    shards = {}
    for entry in manifest["files"]:
        if entry["role"] == "server":
            shards[entry["rank"]] = checkpoint.load(step_dir / entry["file"])
    result = {}
    for name, spec in manifest["layout"].items():
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        rows = shape[0] if shape else 1
        param = np.empty((rows, int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1),
                         dtype)
        arrays, steps = {}, []
        for index, server, start, stop in spec["chunks"]:
            saved = shards[server]["chunks"][name][index]
            param[start:stop] = np.asarray(saved["param"]).reshape(stop - start, -1)
            steps.append(saved["step"])
            for state_name, value in saved["state"].items():
                arrays.setdefault(state_name, np.zeros_like(param))[start:stop] = \
                    np.asarray(value).reshape(stop - start, -1)
        step_count = steps[0] if steps and not isinstance(steps[0], np.ndarray) else \
            (np.concatenate(steps) if steps else None)
        result[name] = {"param": param.reshape(shape), "step": step_count,
                        "state": {k: v.reshape(shape) for k, v in arrays.items()}}
    return result


def resolve(path):
    """A step directory, or a checkpoint DIR (then the one DIR/latest names)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    candidates = complete_checkpoints(path)
    if not candidates:
        raise checkpoint.CheckpointError(f"{path} holds no complete checkpoint (no {MANIFEST})")
    return candidates[0]


def export(path, out):
    """Write the full weights of a checkpoint (and rank 0's buffers) to one safetensors file,
    named as in the model's state_dict(): loadable by dt.load, by `safetensors` (numpy or
    torch) and hence by PyTorch."""
    step_dir = resolve(path)
    layout = snapshot.read_manifest(step_dir)["layout"]
    weights = {name: entry["param"] for name, entry in full_state(step_dir).items()
               if not layout.get(name, {}).get("average")}
    if snapshot.read_manifest(step_dir)["servers"]:   # buffers (BatchNorm statistics): rank 0's
        weights.update(checkpoint.load(step_dir / worker_file(0))["buffers"])
    checkpoint.save(weights, out)
    return weights


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "export":
        print("usage: python -m disttrain.checkpoint export DIR out.safetensors\n"
              "  DIR: a checkpoint folder (its DIR/latest is used) or one step-NNNNNN folder",
              file=sys.stderr)
        return 2
    try:
        weights = export(argv[1], argv[2])
    except (OSError, checkpoint.CheckpointError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(weights)} tensors ({sum(w.nbytes for w in weights.values())} bytes) "
          f"to {argv[2]}")
    return 0
