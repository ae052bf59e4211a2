"""Command line of the launcher (`python -m launch`, `disttrain-launch`): parses the
options, places the processes on hosts and runs the job with the chosen back end."""

import argparse
import os
import shlex
import sys

from launch import local, slurm, ssh
from launch.observe import Collector
from launch.hosts import parse_host_list, read_hostfile
from launch.lifecycle import STOP_GRACE_S, Job
from launch.placement import assign_environment, parse_env_assignments, place

EPILOG = """\
examples:
  python -m launch -n 2 -s 1 -- python workers/mnist.py --epochs 1
  python -m launch -H a:4,b:4 -n 8 -- python workers/mnist.py
  python -m launch --hostfile hosts -- python workers/mnist.py     # lines: host slots=N
  python -m launch -H ns0:0@10.77.0.1,ns1:1@10.77.0.2 --remote-cmd 'ip netns exec {host}' -- ...
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m launch", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-workers", type=int,
                        help="workers (default: one per CPU core, per GPU with --device gpu, "
                             "or the hosts' slots)")
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
    parser.add_argument("--grace", type=float, default=STOP_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL when stopping (default %(default)g)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... run by every worker")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no worker command given (put it after --)")
    if args.num_workers is not None and args.num_workers < 1:
        parser.error(f"-n {args.num_workers}: need at least one worker")
    if args.num_servers < 1:
        parser.error(f"-s {args.num_servers}: need at least one server")
    if args.launcher is None:
        args.launcher = "ssh" if (args.hosts or args.hostfile) else "local"
    if args.launcher == "ssh" and not (args.hosts or args.hostfile):
        parser.error("--launcher ssh needs -H or --hostfile")
    if args.launcher != "ssh" and (args.hosts or args.hostfile):
        parser.error(f"-H/--hostfile name hosts for --launcher ssh, not {args.launcher} "
                     "(slurm takes its hosts from the allocation)")
    return args


def plan(args, environ):
    """(processes, their launch commands) for the chosen back end."""
    ps_command = shlex.split(args.ps_command)
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
    if args.bind:
        # Pinned workers cannot step aside for a server thread woken on their core; a
        # real-time server preempts them at once (see use_realtime_priority, disttrain/ps/__main__.py).
        for process in processes:
            if process.role == "server":
                process.env["DISTTRAIN_REALTIME"] = "1"
    if args.launcher == "local":
        commands = [local.local_command(process, args.bind) for process in processes]
    else:
        commands = [ssh.ssh_command(process, template, args.grace, args.bind) for process in processes]
    return processes, commands


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        processes, commands = plan(args, os.environ)
    except (ValueError, RuntimeError, OSError) as error:
        print(error if str(error).startswith("launch:") else f"launch: {error}", file=sys.stderr)
        return 2
    return Job(processes, commands, log_dir=args.log_dir, grace_s=args.grace,
               collector=Collector(args.timeline)).run()


if __name__ == "__main__":
    sys.exit(main())
