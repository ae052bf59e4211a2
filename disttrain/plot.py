"""`python -m disttrain.plot DIR -o run.png`: a picture of a run from the JSON lines that
--metrics-dir wrote: loss and accuracy per worker, throughput over time, and the stacked
split of each worker's step time. Needs matplotlib (an optional extra, imported here only)."""
import argparse
import glob
import os
import re
import sys

import numpy as np

from disttrain.observe import jsonl
from disttrain.observe.steps import PHASES

INSTALL = "pip install 'disttrain[observe]'   (or: pip install matplotlib)"
COLORS = {"compute": "#4c72b0", "push": "#dd8452", "pull": "#c44e52", "apply": "#55a868"}


def load(directory):
    """({rank: [step records]}, {rank: [evaluation records]}, {rank: [server lines]})."""
    def by_rank(pattern):
        found = {}
        for path in glob.glob(os.path.join(directory, pattern)):
            found[int(re.search(r"-(\d+)\.jsonl$", path).group(1))] = jsonl.read(path)
        return dict(sorted(found.items()))
    workers = by_rank("worker-*.jsonl")
    if not workers:
        raise SystemExit(f"disttrain.plot: no worker-*.jsonl in {directory!r} (run the workers "
                         f"with --metrics-dir {directory})")
    steps = {rank: [r for r in records if "eval" not in r] for rank, records in workers.items()}
    evaluations = {rank: [r for r in records if "eval" in r] for rank, records in workers.items()}
    return steps, evaluations, by_rank("server-*.jsonl")


def running_mean(values, window):
    values = np.asarray(values, dtype=float)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def per_second(times, values):
    """Sums of `values` in one-second bins since the first time: (bin middles, sums). The
    last bin, cut short by the end of the run, is left out when there are others."""
    times = np.asarray(times) - times[0]
    sums = np.bincount(np.floor(times).astype(int), weights=values)
    if len(sums) > 1:
        sums = sums[:-1]
    return np.arange(len(sums)) + 0.5, sums


def draw(directory, output, smooth=20):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"disttrain.plot needs matplotlib: {INSTALL}") from None
    steps, evaluations, servers = load(directory)
    start = min(records[0]["time"] for records in steps.values() if records)
    figure, ((loss_axes, accuracy_axes), (speed_axes, split_axes)) = plt.subplots(2, 2, figsize=(12, 8))
    figure.suptitle(f"{os.path.basename(os.path.normpath(directory))}: "
                    f"{len(steps)} worker(s), {len(servers)} server(s)")

    for rank, records in steps.items():
        x = [r["step"] for r in records]
        line, = loss_axes.plot(x, running_mean([r["loss"] for r in records], smooth),
                               label=f"worker {rank}")
        if any(r.get("accuracy") is not None for r in records):
            accuracy_axes.plot(x, running_mean([r.get("accuracy") or 0.0 for r in records], smooth),
                               color=line.get_color(), label=f"worker {rank} (training batches)")
        for record in evaluations.get(rank, []):
            for name, value in record["eval"].items():
                if value is None:
                    continue
                axes = accuracy_axes if "accuracy" in name else loss_axes
                axes.plot(record["step"], value, "o", color=line.get_color())
                axes.annotate(f"{name} {value:.4g}", (record["step"], value),
                              textcoords="offset points", xytext=(-6, 6), ha="right", fontsize=8)
        times = [r["time"] for r in records]
        if len(times) > 1:
            seconds, samples = per_second(times, [r["samples_per_s"] * r["step_s"] for r in records])
            speed_axes.plot(seconds + times[0] - start, samples, label=f"worker {rank}")
    loss_axes.set(title=f"training loss (mean of {smooth} steps)", xlabel="step", ylabel="loss")
    accuracy_axes.set(title=f"accuracy (mean of {smooth} steps)", xlabel="step", ylabel="accuracy")
    speed_axes.set(title="throughput", xlabel="seconds since the first step",
                   ylabel="samples/s (per worker)")
    if servers:
        traffic_axes = speed_axes.twinx()
        for rank, lines in servers.items():
            seconds = [line["time"] - line["interval_s"] / 2 - start for line in lines]
            traffic = [(line["bytes_in"] + line["bytes_out"]) / line["interval_s"] / 1e6 for line in lines]
            traffic_axes.plot(seconds, traffic, "--", color="gray", label=f"server {rank} in+out")
        traffic_axes.set_ylabel("server MB/s (dashed)")
        traffic_axes.legend(loc="lower right", fontsize=8)

    ranks = list(steps)
    bottom = np.zeros(len(ranks))
    for phase in PHASES:
        means = np.array([1e3 * np.mean([r.get(f"{phase}_s") or 0.0 for r in steps[rank]])
                          for rank in ranks])
        split_axes.bar([f"worker {rank}" for rank in ranks], means, bottom=bottom,
                       color=COLORS[phase], label=phase)
        bottom += means
    split_axes.set(title="mean step time, split (the bar is the whole step)", ylabel="ms per step")
    for axes in (loss_axes, accuracy_axes, speed_axes, split_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m disttrain.plot", description=__doc__)
    parser.add_argument("directory", help="the --metrics-dir of a run")
    parser.add_argument("-o", "--output", default="run.png", help="image file (default %(default)s)")
    parser.add_argument("--smooth", type=int, default=20, help="steps in the running means")
    args = parser.parse_args(argv)
    print(draw(args.directory, args.output, max(1, args.smooth)))


if __name__ == "__main__":
    sys.exit(main())
