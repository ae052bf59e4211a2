"""Scaling benchmark: samples/s of `workers/mnist.py --model lenet` with 1 and 2 workers
through the launcher, beside PyTorch DistributedDataParallel (gloo) with 1 and 2 processes
on the same LeNet-5, batch and optimizer, in the same run; and the ceiling: two independent
single processes with no communication at all. Last line: one JSON object.

Each round measures every run once, and the two runs of a ratio back to back; the ratios
quoted (JSON "vs_ceiling", "scaling_2w", "ddp_scaling_2p") are medians over the rounds of
these paired ratios. On a shared machine a run's speed moves by 10-30% over minutes; the
table's best-of-rounds figures are shown too, but their ratio can pair one run's lucky round
with another's unlucky one (two consecutive runs here gave 0.90 and 0.99 that way).

    python scripts/bench_scaling.py [--steps 300] [--batch-size 64] [--repeats 5] [--no-bind]
    python scripts/bench_scaling.py --observe     # the cost of --metrics-dir, --tensorboard, --timeline

By default every run pins its k-th process to the k-th core: ours through `launch --bind`
(which also runs the server at real-time priority where permitted), PyTorch's processes
and the independent ones directly. --no-bind leaves placement to the OS everywhere.
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.local import core_for  # noqa: E402
MNIST = os.path.join(ROOT, "workers", "mnist.py")
RUN_DEADLINE_S = 600.0
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def clean_env():
    """Our environment without any DISTTRAIN_ variable, so a lone run trains locally."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("DISTTRAIN_")}
    return {**env, **ONE_THREAD}


def last_json(stdout, prefix=""):
    lines = [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix + "{")]
    if not lines:
        raise RuntimeError(f"no JSON summary line in:\n{stdout[-2000:]}")
    return json.loads(lines[-1])


def run(argv, env):
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=RUN_DEADLINE_S)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def mnist_flags(args):
    # SGD with momentum 0.9, as the PyTorch runs (mnist.py's default is Adam).
    return ["--model", "lenet", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--optimizer", "sgd", "--momentum", "0.9", "--lr", str(args.lr), "--seed", "0",
            "--no-progress"]


def ours_launched(workers, args, observe_dir=None):
    """Total samples/s of `workers` workers (+ scheduler and one server) via the launcher;
    with observe_dir, with every observer on (metrics files, TensorBoard, timeline) there."""
    argv = [sys.executable, "-m", "launch", "-n", str(workers), "-s", "1"]
    if args.bind:
        argv.append("--bind")
    flags = mnist_flags(args)
    if observe_dir:
        argv += ["--timeline", os.path.join(observe_dir, "timeline.json")]
        flags += ["--metrics-dir", os.path.join(observe_dir, "metrics"),
                  "--tensorboard", os.path.join(observe_dir, "tensorboard")]
    stdout = run(argv + ["--", sys.executable, MNIST] + flags, clean_env())
    return last_json(stdout, "[worker 0] ")["samples_per_s"]


def observer_cost(rounds=5, steps=40):
    """CPU seconds of the observers' work per step (a worker's metrics line, TensorBoard
    means, six trace spans, and the server's bookkeeping of the two requests of a 2-worker
    LeNet step), against one local LeNet step (forward, backward, SGD) of this process;
    measured alternately, in rounds. Returns (step s, observers s, their ratio) medians."""
    from types import SimpleNamespace

    import numpy as np

    import disttrain as dt
    from disttrain.nn import functional as F
    from disttrain.observe import jsonl, tensorboard, trace
    from disttrain.observe.server import ServerObserver
    from disttrain.ps.protocol import Message, Payload
    sys.path.insert(0, os.path.join(ROOT, "workers"))
    import mnist

    model = mnist.lenet()
    optimizer = dt.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = dt.tensor(rng.standard_normal((64, 1, 28, 28)).astype(np.float32))
    y = rng.integers(0, 10, 64)

    def train_step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    weights = np.zeros(61706, np.float32)   # LeNet's parameters, one packed frame
    request = Message("pushpull", 1, "worker-0", ["p"] * 10, [Payload(0, "dense", 0, weights)],
                      {"clock": 0, "rank": 0, "lr": 0.01})
    replies = [(b"worker-0", Message("reply", 1, "server-0", ["p"] * 10,
                                     [Payload(0, "dense", 0, weights)]))]
    record = {"step": 0, "time": 0.0, "loss": 0.5, "lr": 0.01, "samples_per_s": 3000.0,
              "accuracy": 0.5, "compute_s": 0.01, "push_s": 0.001, "pull_s": 0.002,
              "apply_s": 0.0001, "step_s": 0.0131, "bytes_sent": 246824, "bytes_received": 246824}
    saved_stderr = os.dup(2)
    with tempfile.TemporaryDirectory(prefix="bench-observe-") as scratch:
        lines = jsonl.JsonLines(os.path.join(scratch, "worker-0.jsonl"))
        board = tensorboard.Board(os.path.join(scratch, "tb"), 10, scratch)
        tracer = trace.Tracer()
        server = ServerObserver(0, SimpleNamespace(keys={("p", 0): None}, num_workers=2,
                                                   waiting_pulls=[]), metrics_dir=scratch)
        clock = [0]

        def observe_step():
            record["step"] = record["step"] + 1
            record["time"] = time.time()
            lines.write(record)
            board.step(record)
            now = time.perf_counter()
            for name in ("push", "pull wait", "apply", "apply", "compute", "step"):
                tracer.span(name, now, now)
            for rank in (0, 1):
                request.meta.update(clock=clock[0], rank=rank)
                server.handled(request, replies, now)
            clock[0] += 1

        def cpu_per_step(work):
            start = time.process_time()
            for _ in range(steps):
                work()
            return (time.process_time() - start) / steps

        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)   # the trace batches would go to the launcher
        try:
            train_step()
            step_s, observe_s = [], []
            for _ in range(rounds):
                step_s.append(cpu_per_step(train_step))
                observe_s.append(cpu_per_step(observe_step))
        finally:
            os.dup2(saved_stderr, 2)
            os.close(null)
            lines.close()
            board.close()
    step, observers = statistics.median(step_s), statistics.median(observe_s)
    return step, observers, step / (step + observers)


def children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def observe_overhead(args):
    """The same 2-worker run with every observer on and off, in pairs back to back (order
    alternating): the median of the paired ratios is `observe_ratio` (target >= 0.97).
    Beside it, the CPU seconds of each whole job (every process, start-up included), which
    other load on a shared machine moves much less than samples/s."""
    on, off, cpu_on, cpu_off = [], [], [], []

    def measure(samples, cpu, directory=None):
        before = children_cpu_s()
        samples.append(ours_launched(2, args, directory))
        cpu.append(children_cpu_s() - before)

    with tempfile.TemporaryDirectory(prefix="bench-observe-") as scratch:
        for round_index in range(args.repeats):
            directory = os.path.join(scratch, str(round_index))
            pair = [lambda: measure(off, cpu_off), lambda: measure(on, cpu_on, directory)]
            for run_one in (pair if round_index % 2 == 0 else pair[::-1]):
                run_one()
    ratios = paired(on, off)
    cpu_ratios = paired(cpu_off, cpu_on)
    step_cpu, observers_cpu, cost_ratio = observer_cost()
    print(f"LeNet-5 on MNIST, 2 workers, 1 server, batch {args.batch_size}, {args.steps} steps, "
          f"{len(os.sched_getaffinity(0))} cores, {args.repeats} rounds")
    print(f"{'observers off, samples/s':32s} " + " ".join(f"{value:.0f}" for value in off))
    print(f"{'observers on, samples/s':32s} " + " ".join(f"{value:.0f}" for value in on))
    print(f"{'on / off, per round':32s} " + " ".join(f"{ratio:.3f}" for ratio in ratios))
    print(f"{'job CPU s off':32s} " + " ".join(f"{value:.1f}" for value in cpu_off))
    print(f"{'job CPU s on':32s} " + " ".join(f"{value:.1f}" for value in cpu_on))
    print(f"observers on / off: {statistics.median(ratios):.3f} of the samples/s (median of "
          f"{args.repeats} paired rounds), {statistics.median(cpu_ratios):.3f} of the CPU "
          f"efficiency (off / on CPU seconds of the whole job)")
    print(f"observers' CPU per step {1e6 * observers_cpu:.0f} us against a local LeNet step's "
          f"{1e3 * step_cpu:.1f} ms: {cost_ratio:.3f} of the speed if nothing else moved")
    print(json.dumps({"observe_ratio": round(statistics.median(ratios), 3),
                      "observe_cost_ratio": round(cost_ratio, 4),
                      "observe_cost_us_per_step": round(1e6 * observers_cpu, 1),
                      "observe_ratio_rounds": [round(ratio, 3) for ratio in ratios],
                      "observe_cpu_ratio": round(statistics.median(cpu_ratios), 3),
                      "samples_per_s": {"off": [round(v, 1) for v in off],
                                        "on": [round(v, 1) for v in on]}}))


def pinned(index, bind):
    """A preexec_fn pinning a child to the index-th allowed core (None without --bind)."""
    if not bind:
        return None
    core = core_for(index, os.sched_getaffinity(0))   # the core launch --bind gives worker k
    return lambda: os.sched_setaffinity(0, {core})


def concurrently(argvs, env, bind):
    """Runs the commands at the same time (the k-th pinned to core k with bind); returns
    their stdouts."""
    popens = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=pinned(k, bind)) for k, argv in enumerate(argvs)]
    try:
        outputs = [popen.communicate(timeout=RUN_DEADLINE_S) for popen in popens]
    finally:
        for popen in popens:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
    for popen, (stdout, stderr) in zip(popens, outputs):
        if popen.returncode != 0:
            raise RuntimeError(f"{' '.join(popen.args)} exited {popen.returncode}:\n{stderr[-3000:]}")
    return [stdout for stdout, _ in outputs]


def ours_independent(copies, args):
    """The ceiling: `copies` lone mnist.py processes at once, no parameter server."""
    argvs = [[sys.executable, MNIST] + mnist_flags(args)] * copies
    summaries = [last_json(stdout) for stdout in concurrently(argvs, clean_env(), args.bind)]
    return together([(s["samples_per_s"] * s["wall_s"], s["wall_s"]) for s in summaries])


def together(runs):
    """Throughput of runs (samples, seconds) that started together: all their samples
    over the longest time, so a run that happened to finish alone does not count twice."""
    return sum(samples for samples, _ in runs) / max(seconds for _, seconds in runs)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torch_run(processes, args, ddp):
    """Total samples/s of `processes` PyTorch processes: DDP over gloo, or independent."""
    for attempt in range(3):
        port = str(free_port())
        argvs = [[sys.executable, os.path.abspath(__file__), "--torch-rank", str(rank),
                  "--torch-world", str(processes), "--torch-port", port, "--steps", str(args.steps),
                  "--batch-size", str(args.batch_size), "--lr", str(args.lr)] + ([] if ddp else ["--no-ddp"])
                 for rank in range(processes)]
        try:
            reports = [last_json(stdout) for stdout in concurrently(argvs, clean_env(), args.bind)]
            return together([(report["samples"], report["seconds"]) for report in reports])
        except RuntimeError as error:
            # gloo now and then aborts a process ("terminate called without an active
            # exception"); that says nothing about speed, so the run is repeated.
            if "exited -" not in str(error) or attempt == 2:
                raise
            print(f"bench_scaling: a PyTorch process died of a signal, running again: "
                  f"{str(error).splitlines()[0][-120:]}", file=sys.stderr)


def torch_worker(args):
    """One PyTorch process: LeNet-5 as in workers/mnist.py, SGD with momentum, its shard."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn

    sys.path.insert(0, ROOT)
    from disttrain.data import load_mnist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = args.torch_world if not args.no_ddp else 1
    rank = args.torch_rank if not args.no_ddp else 0
    x, y = load_mnist(os.path.join(ROOT, "data", "mnist"), "train")
    x = torch.from_numpy(((x.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[rank::world, None])
    y = torch.from_numpy(y.astype(np.int64)[rank::world])
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    if not args.no_ddp:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=args.torch_port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    batches_per_epoch = len(x) // args.batch_size
    start = time.perf_counter()
    for step in range(args.steps):
        index = order[(step % batches_per_epoch) * args.batch_size:][:args.batch_size]
        optimizer.zero_grad()
        loss = loss_fn(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    if not args.no_ddp:
        dist.destroy_process_group()
    print(json.dumps({"samples": args.steps * args.batch_size, "seconds": seconds, "loss": loss.item()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per worker and run")
    parser.add_argument("--batch-size", type=int, default=64, help="per-worker / per-process batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--no-bind", dest="bind", action="store_false",
                        help="do not pin processes to cores (launch without --bind)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each run keeps its best")
    parser.add_argument("--observe", action="store_true",
                        help="measure only the cost of the observers (JSON key observe_ratio)")
    parser.add_argument("--torch-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--torch-world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--torch-port", help=argparse.SUPPRESS)
    parser.add_argument("--no-ddp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_rank is not None:
        return torch_worker(args)
    if not os.path.exists(MNIST):
        sys.exit(f"bench_scaling: {MNIST} does not exist")
    if args.observe:
        return observe_overhead(args)

    runs = {
        "disttrain, 1 worker (launch)": lambda: ours_launched(1, args),
        "disttrain, 2 workers (launch)": lambda: ours_launched(2, args),
        "disttrain, 2 independent processes": lambda: ours_independent(2, args),
        "PyTorch DDP gloo, 1 process": lambda: torch_run(1, args, ddp=True),
        "PyTorch DDP gloo, 2 processes": lambda: torch_run(2, args, ddp=True),
        "PyTorch, 2 independent processes": lambda: torch_run(2, args, ddp=False),
    }
    names = list(runs)
    samples = {name: [] for name in runs}
    for round_index in range(args.repeats):
        for name in round_order(names, round_index):
            samples[name].append(runs[name]())
    report(args, samples)


def round_order(names, round_index):
    """The runs of one round. The cores are shared with work from outside that comes and
    goes over seconds to minutes, so the two runs a ratio compares are measured back to back
    (a slow spell then hits both alike), first one then the other in alternate rounds (a
    drift favours neither)."""
    ours_1, ours_2, ours_free, torch_1, torch_2, torch_free = names
    pairs = [(ours_2, ours_free), (torch_2, torch_free)]
    if round_index % 2:
        pairs = [(b, a) for a, b in pairs]
    return [ours_1, *pairs[0], torch_1, *pairs[1]]


def paired(numerators, denominators):
    """Per-round ratios of two runs measured in the same round."""
    return [n / d for n, d in zip(numerators, denominators)]


def report(args, samples):
    """The table (each run's best round beside all its rounds), then the ratios: per round,
    and their median, which is the figure to quote (a best-of-rounds ratio can pair one
    run's lucky round with the other's unlucky one)."""
    ours_1, ours_2, ours_free, torch_1, torch_2, torch_free = samples.values()
    ratios = {   # JSON name: (label, per-round ratios)
        "vs_ceiling": ("disttrain 2 workers / 2 independent", paired(ours_2, ours_free)),
        "scaling_2w": ("disttrain 2 workers / 2x 1 worker", paired(ours_2, [2 * v for v in ours_1])),
        "ddp_vs_ceiling": ("DDP 2 processes / 2 independent", paired(torch_2, torch_free)),
        "ddp_scaling_2p": ("DDP 2 processes / 2x 1 process", paired(torch_2, [2 * v for v in torch_1])),
    }
    medians = {name: statistics.median(per_round) for name, (_, per_round) in ratios.items()}
    best = {name: max(rounds) for name, rounds in samples.items()}
    b = list(best.values())
    efficiencies = [None, b[1] / (2 * b[0]), b[2] / (2 * b[0]), None, b[4] / (2 * b[3]), b[5] / (2 * b[3])]
    print(f"LeNet-5 on MNIST, batch {args.batch_size} per process, {args.steps} steps, "
          f"{len(os.sched_getaffinity(0))} cores, {args.repeats} rounds")
    print(f"{'run':40s} {'best':>10s} {'vs 2x one':>10s}  samples/s in every round")
    for (name, value), efficiency in zip(best.items(), efficiencies):
        shown = " ".join(f"{sample:.0f}" for sample in samples[name])
        print(f"{name:40s} {value:10.0f} {'' if efficiency is None else f'{efficiency:10.2f}':>10s}  {shown}")
    print(f"{'ratio within each round':40s} {'median':>10s} {'':10s}  every round")
    for name, (label, per_round) in ratios.items():
        shown = " ".join(f"{ratio:.3f}" for ratio in per_round)
        print(f"{label:40s} {medians[name]:10.3f} {'':10s}  {shown}")
    print(f"disttrain 2 workers vs the no-communication ceiling: {medians['vs_ceiling']:.2f} "
          f"(median of {args.repeats} rounds; best round of each: {b[1] / b[2]:.2f}); "
          f"PyTorch DDP 2 vs its ceiling: {medians['ddp_vs_ceiling']:.2f}")
    print(json.dumps({"scaling_2w": round(medians["scaling_2w"], 3),
                      "ddp_scaling_2p": round(medians["ddp_scaling_2p"], 3),
                      "vs_ceiling": round(medians["vs_ceiling"], 3),
                      "vs_ceiling_rounds": [round(r, 3) for r in ratios["vs_ceiling"][1]],
                      "vs_ceiling_best_rounds": round(b[1] / b[2], 3),
                      "samples_per_s": {name: round(value, 1) for name, value in best.items()}}))


if __name__ == "__main__":
    main()
