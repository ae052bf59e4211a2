"""Checkpoint speed: 2 servers write (and read back) the shards of a 256 MB model, against
numpy.save / numpy.load of the same bytes to the same disk, measured in the same run.

    PYTHONPATH=$PWD python scripts/bench_checkpoint.py [--mbytes 256] [--repeats 3] [--dir D]

Prints one JSON line: write_ratio = numpy.save time / checkpoint write time (and read_ratio
likewise for numpy.load / restore); 1.0 means as fast as numpy. The checkpoint write
includes what makes it safe: sha256 of every byte, fsync, rename, the manifest; so the line
also gives write_ratio_fsync, against numpy.save followed by fsync. The restore includes the
sha256 check and putting the values into the servers' arrays. Medians of --repeats rounds,
the two sides alternating within each round."""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from disttrain import checkpoint_dist  # noqa: E402
from scripts.bench_ps import Job  # noqa: E402

KEY_BYTES = 16 << 20   # a model of 16 MB tensors, like the big layers of a real one


def checkpoint_write(job, directory, step):
    step_dir = Path(directory) / checkpoint_dist.step_name(step)
    step_dir.mkdir(parents=True)
    os.sync()
    start = time.perf_counter()
    handle = job.store.request("checkpoint", {"dir": str(step_dir), "step": step})
    handle.wait()
    manifest = {"format": checkpoint_dist.FORMAT, "step": step, "servers": 2, "workers": 1,
                "files": list(handle.replies.values()),
                "layout": checkpoint_dist.key_layout(job.store)}
    checkpoint_dist.atomic_write_text(step_dir / "manifest.json", json.dumps(manifest))
    checkpoint_dist.atomic_write_text(Path(directory) / checkpoint_dist.LATEST, step_dir.name)
    elapsed = time.perf_counter() - start
    return elapsed, step_dir, sum(entry["size"] for entry in manifest["files"])


def checkpoint_read(job, step_dir, step):
    os.sync()
    start = time.perf_counter()
    job.store.request("restore", {"dir": str(step_dir), "step": step}).wait()
    return time.perf_counter() - start


def numpy_write(array, path, fsync):
    os.sync()   # every timing starts without dirty pages left by the one before
    start = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, array)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def numpy_read(path):
    os.sync()
    start = time.perf_counter()
    np.load(path)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mbytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    job = Job(2, "ipc")
    try:
        rng = np.random.default_rng(0)
        arrays = {f"layer{i}.weight": rng.standard_normal(KEY_BYTES // 4, dtype=np.float32)
                  for i in range(max(1, (args.mbytes << 20) // KEY_BYTES))}
        for name, array in arrays.items():
            job.store.declare(name, array.shape, array.dtype)
        job.store.init(arrays, {"name": "sgd", "hyper": {"lr": 0.1}})
        reference = np.concatenate(list(arrays.values()))
        times = {"write": [], "read": [], "np_write": [], "np_write_fsync": [], "np_read": []}
        shutil.rmtree(checkpoint_write(job, root, 0)[1])   # the same warm-up for our side
        for round_index in range(args.repeats):
            for side in (("ours", "numpy") if round_index % 2 == 0 else ("numpy", "ours")):
                if side == "ours":
                    elapsed, step_dir, nbytes = checkpoint_write(job, root, round_index + 1)
                    times["write"].append(elapsed)
                    times["read"].append(checkpoint_read(job, step_dir, round_index + 1))
                    shutil.rmtree(step_dir)
                else:
                    path = root / "reference.npy"
                    # The first write after other work pays for fresh page-cache pages
                    # (measured: 2.6 s against 0.25-0.33 s after it): warm up, then time.
                    numpy_write(reference, path, fsync=False)
                    path.unlink()
                    times["np_write"].append(numpy_write(reference, path, fsync=False))
                    times["np_read"].append(numpy_read(path))
                    path.unlink()
                    times["np_write_fsync"].append(numpy_write(reference, path, fsync=True))
                    path.unlink()
        median = {name: float(np.median(values)) for name, values in times.items()}
        print(json.dumps({
            "bench": "checkpoint", "servers": 2, "model_bytes": int(reference.nbytes),
            "checkpoint_bytes": nbytes, "repeats": args.repeats,
            "write_s": round(median["write"], 4), "read_s": round(median["read"], 4),
            "numpy_save_s": round(median["np_write"], 4),
            "numpy_save_fsync_s": round(median["np_write_fsync"], 4),
            "numpy_load_s": round(median["np_read"], 4),
            "write_ratio": round(median["np_write"] / median["write"], 3),
            "write_ratio_fsync": round(median["np_write_fsync"] / median["write"], 3),
            "read_ratio": round(median["np_read"] / median["read"], 3)}), flush=True)
    finally:
        job.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
