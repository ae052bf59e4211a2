"""A worker program for elastic-membership tests: linear regression on a dataset whose
samples are their own indices, through workers/harness.py's Batches and `elastic` hook;
each step appends {"rank", "pid", "step", "epoch", "samples", "workers"} to
LOG_DIR/worker-PID.jsonl, so a test can count which samples were trained on."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "workers"))

import disttrain as dt   # noqa: E402
import harness           # noqa: E402
from disttrain import nn  # noqa: E402
from disttrain.data import DataLoader, TensorDataset   # noqa: E402
from disttrain.parallel import DataParallel   # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="pace each step, so that a test can act mid-run")
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--mode", choices=["sync", "async", "ssp"], default="sync")
    args = parser.parse_args()
    indices = np.arange(args.samples, dtype=np.int64)
    model = nn.Linear(1, 1)
    optimizer = dt.optim.SGD(model.parameters(), lr=0.001)
    changes = []
    with DataParallel(model, optimizer, mode=args.mode,
                      on_membership_change=lambda old, new: changes.append([old, new])) as trainer:
        shards, index = harness.shard_of(trainer)
        loader = DataLoader(TensorDataset(indices), batch_size=args.batch_size, shuffle=True,
                            drop_last=True, seed=1, num_shards=shards, shard_index=index)
        position = harness.resume(None, trainer, model, optimizer)
        first = position["step"] if position else 0
        batches = harness.Batches(loader, first, harness.total_steps(loader, args), position)
        harness.elastic(trainer, loader, batches, args)
        log = open(os.path.join(args.log_dir, f"worker-{os.getpid()}.jsonl"), "a", buffering=1)
        for step, batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            epoch = batches.position["epoch"] - batches.position["epoch_end"]
            workers = trainer.num_workers
            inputs = dt.tensor(x.astype(np.float32)[:, None] / args.samples)
            loss = ((model(inputs) - inputs) ** 2).mean()
            trainer.zero_grad()
            loss.backward()
            trainer.step()
            log.write(json.dumps({"rank": trainer.rank, "pid": os.getpid(), "step": step,
                                  "epoch": int(epoch), "samples": x.tolist(),
                                  "workers": workers}) + "\n")
            if args.step_sleep:
                time.sleep(args.step_sleep)
        log.close()
        if trainer.rank == min(trainer.elastic.active if trainer.elastic else [0]) \
                and not (trainer.elastic and trainer.elastic.left):
            print(json.dumps({"changes": changes, "workers": trainer.num_workers}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
