"""Command line of the launcher (`python -m launch`, `disttrain-launch`): parses the
options, places the processes on hosts and runs the job with the chosen back end."""

import argparse
import dataclasses
import os
import shlex
import sys

from launch import elastic, keys, local, slurm, ssh
from launch.observe import Collector
from launch.hosts import parse_host_list, read_hostfile
from launch.lifecycle import STOP_GRACE_S, Job
from launch.placement import assign_environment, parse_env_assignments, place

DEFAULT_RESTART_TIMEOUT_S = 60.0

EPILOG = """\
examples:
  python -m launch -n 2 -s 1 -- python workers/mnist.py --epochs 1
  python -m launch -H a:4,b:4 -n 8 -- python workers/mnist.py
  python -m launch --hostfile hosts -- python workers/mnist.py     # lines: host slots=N
  python -m launch -H ns0:0@10.77.0.1,ns1:1@10.77.0.2 --remote-cmd 'ip netns exec {host}' -- ...
  python -m launch -n 2 -s 2 --max-restarts 1 --server-replicas 1 -- python workers/mnist.py
  python -m launch keys DIR -n 8 -s 2     # a job's keys, for processes another launcher starts
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m launch", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-workers",
                        help="workers (default: one per CPU core, per GPU with --device gpu, "
                             "or the hosts' slots); MIN:MAX: an elastic job of MIN to MAX "
                             "workers, started with as many as the slots allow")
    parser.add_argument("--host-discovery-script", metavar="FILE",
                        help="elastic (-n MIN:MAX): a program printing `host:slots` lines, run "
                             "every few seconds; workers start on new slots (a local job puts "
                             "all the slots on this host)")
    parser.add_argument("-s", "--num-servers", type=int, default=1, help="servers (default 1)")
    hosts = parser.add_mutually_exclusive_group()
    hosts.add_argument("-H", "--hosts", help="host[:slots][@address],... (implies --launcher ssh)")
    hosts.add_argument("--hostfile", help="file of `host slots=N [addr=ADDRESS]` lines (implies ssh)")
    parser.add_argument("--launcher", choices=("local", "ssh", "slurm"),
                        help="back end (default: ssh with -H/--hostfile, else local)")
    parser.add_argument("--remote-cmd", default=ssh.DEFAULT_REMOTE_COMMAND,
                        help="how to run a command on {host} (default: %(default)r)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for every process (repeatable)")
    parser.add_argument("--log-dir", help="also write each process's output to DIR/worker-3.log etc.")
    parser.add_argument("--bind", action="store_true",
                        help="pin worker k of a host to its k-th core, and run servers at "
                             "real-time priority where permitted (DISTTRAIN_REALTIME=1)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="gpu gives worker k of a host DISTTRAIN_DEVICE=cuda:k")
    parser.add_argument("--port", type=int, help="scheduler port (default: a free one)")
    parser.add_argument("--ps-command", default=f"{shlex.quote(sys.executable)} -m disttrain.ps",
                        help="program run as scheduler and servers (default: %(default)s)")
    parser.add_argument("--timeline", metavar="FILE",
                        help="write a Chrome trace-event timeline of every worker and server "
                             "(Perfetto, chrome://tracing) to FILE")
    parser.add_argument("--insecure", action="store_true",
                        help="no authentication or encryption (DISTTRAIN_INSECURE=1): anyone who "
                             "can reach the job's ports can read and change the model")
    parser.add_argument("--grace", type=float, default=STOP_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL when stopping (default %(default)g)")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="restart a process that dies or stops answering, with the same "
                             "role and rank, up to N times in all (default 0: the first "
                             "failure ends the job)")
    parser.add_argument("--restart-timeout", type=float, default=DEFAULT_RESTART_TIMEOUT_S,
                        metavar="S", help="with --max-restarts: how long the job waits for a "
                                          "replacement (DISTTRAIN_RESTART_TIMEOUT, "
                                          "default %(default)g)")
    parser.add_argument("--server-replicas", type=int, choices=(0, 1), default=0,
                        help="1: each server keeps a replica of the next one's shard, so a "
                             "restarted server loses no optimizer state (needs -s 2 or more)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... run by every worker")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no worker command given (put it after --)")
    args.min_workers = args.max_workers = None
    if args.num_workers is not None:
        try:
            low, high, kind = elastic.parse_worker_range(args.num_workers)
        except ValueError as error:
            parser.error(str(error))
        args.num_workers = low
        if kind:
            args.min_workers, args.max_workers = low, high
    if args.num_workers is not None and args.num_workers < 1:
        parser.error(f"-n {args.num_workers}: need at least one worker")
    if args.host_discovery_script and args.max_workers is None:
        parser.error("--host-discovery-script is for elastic jobs: give -n MIN:MAX")
    if args.num_servers < 1:
        parser.error(f"-s {args.num_servers}: need at least one server")
    if args.max_restarts < 0:
        parser.error(f"--max-restarts {args.max_restarts}: give 0 (no restarts) or more")
    if not args.restart_timeout > 0:
        parser.error(f"--restart-timeout {args.restart_timeout:g}: must be a positive number "
                     f"of seconds")
    if args.server_replicas and args.num_servers < 2:
        parser.error(f"--server-replicas 1 with -s {args.num_servers}: a server's replica lives "
                     f"on the next server, so give -s 2 or more")
    if args.launcher is None:
        args.launcher = "ssh" if (args.hosts or args.hostfile) else "local"
    if args.launcher == "ssh" and not (args.hosts or args.hostfile):
        parser.error("--launcher ssh needs -H or --hostfile")
    if args.launcher != "ssh" and (args.hosts or args.hostfile):
        parser.error(f"-H/--hostfile name hosts for --launcher ssh, not {args.launcher} "
                     "(slurm takes its hosts from the allocation)")
    return args


def plan(args, environ, job_keys=None):
    """(processes, their launch commands) for the chosen back end. `job_keys`, a
    keys.JobKeys, gets the job's fresh keys (its directory is the caller's to remove);
    without it processes get no keys, with --insecure DISTTRAIN_INSECURE=1."""
    ps_command = shlex.split(args.ps_command)
    if args.max_workers is not None:   # elastic: start with what the slots allow
        slots = sum(n for _, n in elastic.host_reader(args, "localhost")())
        if not slots and args.launcher == "local":   # no hosts named: this machine's
            slots = local.gpu_count() if args.device == "gpu" else local.cpu_count()
        args.num_workers = max(args.min_workers, min(args.max_workers, slots or args.min_workers))
    if args.launcher == "local":
        default = local.gpu_count() if args.device == "gpu" else local.cpu_count()
        num_workers = args.num_workers or default
        if num_workers < 1:
            raise ValueError("launch: --device gpu found no GPU; give -n")
        processes = place([local.local_host(num_workers)], num_workers, args.num_servers,
                          args.command, ps_command)
        port = args.port or local.free_port()
        scheduler = f"{local.LOCAL_ADDRESS}:{port}"
    else:
        if args.launcher == "slurm":
            hosts = slurm.slurm_hosts(environ)
            template = slurm.SRUN_TEMPLATE
            default = slurm.slurm_worker_count(environ, hosts)
        elif args.host_discovery_script and not (args.hosts or args.hostfile):
            hosts = elastic.discover(args.host_discovery_script)
            template = args.remote_cmd
            default = sum(host.slots for host in hosts)
        else:
            hosts = parse_host_list(args.hosts) if args.hosts else read_hostfile(args.hostfile)
            template = args.remote_cmd
            default = sum(host.slots for host in hosts)
        num_workers = args.num_workers or default
        processes = place(hosts, num_workers, args.num_servers, args.command, ps_command)
        port = args.port or ssh.probe_free_port(template, hosts[0].name)
        scheduler = f"{hosts[0].address}:{port}"
    assign_environment(processes, scheduler, args.device,
                       parse_env_assignments(args.env), environ)
    for process in processes:
        # Every process reports at its end (the straggler report); with --timeline it
        # sends its trace events too, both as marked lines of its output.
        process.env["DISTTRAIN_OBSERVE"] = "report,trace" if args.timeline else "report"
        process.env.update(recovery_environment(args))
        if args.max_workers is not None:
            process.env.update(DISTTRAIN_MIN_WORKERS=str(args.min_workers),
                               DISTTRAIN_MAX_WORKERS=str(args.max_workers))
    if args.bind:
        # Pinned workers cannot step aside for a server thread woken on their core; a
        # real-time server preempts them at once (see use_realtime_priority, disttrain/ps/__main__.py).
        for process in processes:
            if process.role == "server":
                process.env["DISTTRAIN_REALTIME"] = "1"
    keys_lines = give_keys(args, processes, job_keys)
    def command_for(process, keys_line=b""):
        if args.launcher == "local":
            return local.local_command(process, args.bind)
        return ssh.ssh_command(process, template, args.grace, args.bind, keys_line=keys_line)

    commands = [command_for(process, keys_lines.get(process.name, b"")) for process in processes]
    if args.max_workers is not None:
        args.start_worker = new_worker_starter(args, processes, command_for, job_keys)
    return processes, commands


def new_worker_starter(args, processes, command_for, job_keys):
    """Elastic: start_worker(job, rank, host, local_index) for launch.elastic.Elastic, a
    worker like the first ones (same command and contract environment) on a new slot."""
    template = next(p for p in processes if p.role == "worker")

    def start_worker(job, rank, host, local_index):
        process = dataclasses.replace(template, rank=rank, host=host, local_index=local_index,
                                      env=dict(template.env, DISTTRAIN_RANK=str(rank),
                                               DISTTRAIN_HOST=host.address))
        if args.device == "gpu":
            process.env["DISTTRAIN_DEVICE"] = f"cuda:{local_index}"
        keys_line = job_keys.stdin_line(process) if (args.launcher == "ssh" and job_keys
                                                     and not args.insecure) else b""
        return job.add_child(process, command_for(process, keys_line))
    return start_worker


def recovery_environment(args):
    """What every process learns of --max-restarts and --server-replicas; nothing at the
    defaults, so that a job without them runs exactly as before they existed."""
    env = {}
    if args.max_restarts > 0:
        env["DISTTRAIN_RESTART_TIMEOUT"] = str(args.restart_timeout)
        env["DISTTRAIN_INCARNATION"] = "0"
    if args.server_replicas:
        env["DISTTRAIN_SERVER_REPLICAS"] = str(args.server_replicas)
    return env


def give_keys(args, processes, job_keys):
    """Makes the job's keys and says how each process gets them: DISTTRAIN_KEYS naming a
    private directory (local; under Slurm in the job's own directory, which every node
    sees), or {process name: line for its guard's stdin} over ssh."""
    if args.insecure:
        for process in processes:
            process.env["DISTTRAIN_INSECURE"] = "1"
        return {}
    if job_keys is None:
        return {}
    job_keys.make(args.max_workers or sum(p.role == "worker" for p in processes),
                  sum(p.role == "server" for p in processes))
    if args.launcher == "ssh":
        return {process.name: job_keys.stdin_line(process) for process in processes}
    directory = job_keys.write_directory(os.getcwd() if args.launcher == "slurm" else None)
    for process in processes:
        process.env["DISTTRAIN_KEYS"] = os.path.abspath(directory)
    return {}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys.main(argv[1:])
    args = parse_args(argv)
    if args.insecure:
        print("launch: WARNING: --insecure: no authentication or encryption; anyone who can "
              "reach this job's ports can read and change the model", file=sys.stderr)
    job_keys = keys.JobKeys()
    try:
        try:
            processes, commands = plan(args, os.environ, job_keys)
        except (ValueError, RuntimeError, OSError) as error:
            print(error if str(error).startswith("launch:") else f"launch: {error}",
                  file=sys.stderr)
            return 2
        watcher = None
        if args.max_workers is not None:
            watcher = elastic.Elastic(args.min_workers, args.max_workers,
                                      elastic.host_reader(args, "localhost" if args.launcher ==
                                                          "local" else None),
                                      args.start_worker, args.restart_timeout)
        return Job(processes, commands, log_dir=args.log_dir, grace_s=args.grace,
                   collector=Collector(args.timeline), max_restarts=args.max_restarts,
                   elastic=watcher).run()
    finally:
        job_keys.remove()


if __name__ == "__main__":
    sys.exit(main())
