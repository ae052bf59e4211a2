"""ssh back end: each process runs on its host through a remote-command template
(default `ssh -o BatchMode=yes {host}`), under launch.guard so that it can be stopped."""

import os
import shlex
import subprocess
import sys

from launch.lifecycle import LaunchCommand

DEFAULT_REMOTE_COMMAND = "ssh -o BatchMode=yes {host}"
PORT_PROBE_DEADLINE_S = 30.0
# Commands that, like ssh, join their arguments into one line for the remote login
# shell. Any other template (`ip netns exec {host}`, `docker exec {host}`) runs an
# argv, so it gets `sh -c LINE`.
SHELL_LINE_COMMANDS = ("ssh", "rsh", "oarsh", "autossh")


def remote_argv(template, host, line):
    """The local argv that runs shell command `line` on `host` through `template`.

    `{host}` in the template is replaced by the host name; `{command}`, if present,
    by the shell line as one argument; otherwise the line is appended as ssh expects.
    """
    tokens = shlex.split(template)
    if not tokens:
        raise ValueError("launch: --remote-cmd is empty")
    if any("{command}" in token for token in tokens):
        return [token.replace("{host}", host).replace("{command}", line) for token in tokens]
    argv = [token.replace("{host}", host) for token in tokens]
    if os.path.basename(argv[0]) in SHELL_LINE_COMMANDS:
        return argv + [line]
    return argv + ["sh", "-c", line]


def shell_line(cwd, env, argv):
    """`cd CWD && exec env NAME=VALUE ... ARGV`, every word quoted for sh."""
    assignments = [f"{name}={value}" for name, value in sorted(env.items())]
    words = ["exec", "env"] + assignments + list(argv)
    return f"cd {shlex.quote(cwd)} && " + " ".join(shlex.quote(word) for word in words)


def guard_argv(python, command, grace_s, bind_index=None, keys_on_stdin=False):
    argv = [python, "-m", "launch.guard", "--grace", f"{grace_s:g}"]
    if bind_index is not None:
        argv += ["--bind-index", str(bind_index)]
    if keys_on_stdin:
        argv += ["--keys-on-stdin"]
    return argv + ["--"] + list(command)


def ssh_command(process, template, grace_s, bind, cwd=None, python=sys.executable,
                keys_line=b"", env_changes=None):
    """Runs `process` on its host: cd to our working directory, export the contract
    environment (only that: PATH and the rest stay the remote host's) with `env_changes`,
    run the guard. `keys_line` (launch.keys.JobKeys.stdin_line) reaches the guard through
    stdin. The command's `with_env` rebuilds the line for a restart (the keys go again)."""
    cwd = cwd or os.getcwd()
    env_changes = dict(env_changes or {})
    bind_index = process.local_index if bind and process.role == "worker" else None
    line = shell_line(cwd, {**process.env, **env_changes},
                      guard_argv(python, process.command, grace_s, bind_index, bool(keys_line)))

    def remake(changes):
        return ssh_command(process, template, grace_s, bind, cwd, python, keys_line,
                           {**env_changes, **changes})
    return LaunchCommand(remote_argv(template, process.host.name, line), dict(os.environ),
                         stopped_by_closing_stdin=True, stdin_data=keys_line, remake=remake)


def probe_free_port(template, host, python=sys.executable, deadline_s=PORT_PROBE_DEADLINE_S):
    """Asks `host` (through the template) for a TCP port free there, for the scheduler."""
    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    argv = remote_argv(template, host, " ".join(shlex.quote(word) for word in (python, "-c", code)))
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=deadline_s,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"launch: {' '.join(argv)} did not answer within {deadline_s:g} s") from None
    except OSError as error:
        raise RuntimeError(f"launch: cannot run {' '.join(argv)}: {error}") from None
    words = result.stdout.split()
    if result.returncode != 0 or not words or not words[-1].isdigit():
        raise RuntimeError(f"launch: asking {host} for a free port failed (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    return int(words[-1])
