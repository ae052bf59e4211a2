"""The Slurm back end against a real single-node Slurm (Debian's slurm-wlm): the test
writes a config, starts munged, slurmctld and slurmd on free ports, and runs the launcher
inside `salloc` and through launch/slurm.sbatch."""

import os
import shutil
import signal
import socket
import subprocess

import pytest

from tests.integration.conftest import (
    PROGRAMS, PYTHON, ROOT, TAG_VARIABLE, TOY_WORKER, kill_tagged, launcher_argv, new_tag, tagged_pids,
    wait_for_no_tagged, wait_for_program_pid)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "salloc", "sbatch", "srun")
CLUSTER_START_DEADLINE_S = 30.0
REQUEUE_DEADLINE_S = 480.0
INSTALL_HINT = "apt-get install -y slurm-wlm munge"
FAKE_PS_EXECUTABLE = os.path.join(PROGRAMS, "fake_ps.py")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_config(directory, node, cpus):
    return f"""\
ClusterName=disttrain-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={directory}/munge.sock
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def slurm_logs(directory):
    return "".join(open(os.path.join(directory, name)).read()[-2000:]
                   for name in ("slurmctld.log", "slurmd.log")
                   if os.path.exists(os.path.join(directory, name)))


def wait_for_idle_node(env, directory):
    def state():
        return subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    wait_until(lambda: state() == "idle", CLUSTER_START_DEADLINE_S,
               lambda: f"single-node Slurm idle (sinfo says {state()!r})\n{slurm_logs(directory)}")


def controller_up(env):
    ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=10)
    return "UP" in ping.stdout


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment (SLURM_CONF) of a private single-node Slurm, torn down after the module."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and
               not os.path.exists(f"/usr/sbin/{name}")]
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root (slurmd runs jobs as any user)")
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): {INSTALL_HINT}")
    directory = tmp_path_factory.mktemp("slurm")
    os.chmod(directory, 0o711)  # munged wants its socket's directory searchable by all
    for sub in ("state", "spool"):
        os.makedirs(directory / sub)
    with open(directory / "munge.key", "wb") as key:
        key.write(os.urandom(128))
    os.chmod(directory / "munge.key", 0o600)
    node = socket.gethostname()
    with open(directory / "slurm.conf", "w") as config:
        config.write(slurm_config(directory, node, len(os.sched_getaffinity(0))))
    cluster_tag = new_tag()  # slurmstepd and every step inherit it: cleanup finds them
    env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf"), TAG_VARIABLE: cluster_tag}
    sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"
    commands = [
        [sbin("munged"), "-F", "--force", f"--key-file={directory}/munge.key",
         f"--socket={directory}/munge.sock", f"--pid-file={directory}/munged.pid",
         f"--log-file={directory}/munged.log", f"--seed-file={directory}/munged.seed"],
        [sbin("slurmctld"), "-D", "-i", "-f", env["SLURM_CONF"]],
        [sbin("slurmd"), "-D", "-N", node, "-f", env["SLURM_CONF"]],
    ]
    # Each daemon needs the one before: munged's socket before slurmctld, a controller that
    # answers before slurmd.
    ready = [lambda: os.path.exists(f"{directory}/munge.sock"), lambda: controller_up(env),
             lambda: True]
    daemons = []
    try:
        for command, started in zip(commands, ready):
            daemons.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True))
            wait_until(started, CLUSTER_START_DEADLINE_S,
                       lambda: f"{os.path.basename(command[0])} ready\n{slurm_logs(directory)}")
        wait_for_idle_node(env, directory)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=20)
        for daemon in reversed(daemons):
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=10)
        kill_tagged(cluster_tag)


def salloc(tasks):
    return ["salloc", "--nodes=1", f"--ntasks={tasks}", "--quiet"]


def test_job_inside_salloc_gets_one_worker_per_task_and_exits_0(slurm_env, launch_run):
    tag = new_tag()
    argv = launcher_argv("--launcher", "slurm", command=TOY_WORKER + ["--greet-scheduler"], tag=tag)
    run = launch_run(argv, tag, prefix=salloc(2), env=slurm_env)
    assert run.finish() == 0, run.stderr
    assert run.stdout.count("greeting: hello from") == 2  # -n defaulted to SLURM_NTASKS
    assert "[worker 1] worker 1 done" in run.stdout
    assert "scheduler 0; servers 0; workers 0 0" in run.stderr.strip().splitlines()[-1]
    assert wait_for_no_tagged(tag) == []


def test_sigterm_to_the_launcher_stops_the_srun_steps(slurm_env, launch_run):
    tag = new_tag()
    argv = launcher_argv("--launcher", "slurm", "--grace", "2",
                         command=TOY_WORKER + ["--sleep", "60"], tag=tag)
    run = launch_run(argv, tag, prefix=salloc(2), env=slurm_env)
    for rank in (0, 1):
        wait_for_program_pid(tag, "worker", rank, "toy_worker.py", deadline_s=15.0)
    os.kill(launcher_pid(tag), signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM
    assert "launch: got SIGTERM, stopping every process" in run.stderr
    assert wait_for_no_tagged(tag) == []


def launcher_pid(tag):
    """salloc runs the launcher as its child: find it by its argv."""
    pids = []
    for pid in tagged_pids(tag):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if argv[:3] == [PYTHON.encode(), b"-m", b"launch"]:
            pids.append(pid)
    assert len(pids) == 1, f"expected one launcher under salloc, found pids {pids}"
    return pids[0]


def test_srun_worker_killed_with_sigkill_fails_the_job_with_137(slurm_env, launch_run):
    tag = new_tag()
    argv = launcher_argv("--launcher", "slurm", "--grace", "2",
                         command=TOY_WORKER + ["--sleep", "60"], tag=tag)
    run = launch_run(argv, tag, prefix=salloc(2), env=slurm_env)
    os.kill(wait_for_program_pid(tag, "worker", 0, "toy_worker.py", deadline_s=15.0), signal.SIGKILL)
    assert run.finish() == 128 + signal.SIGKILL
    assert "launch: worker 0 exited with code 137 (SIGKILL on " in run.stderr
    assert wait_for_no_tagged(tag) == []


def test_shipped_sbatch_script_runs_the_job(slurm_env, tmp_path):
    tag = new_tag()
    output = tmp_path / "job.out"
    env = {**slurm_env, "PYTHON": PYTHON, TAG_VARIABLE: tag,
           # The script splits these options on spaces, so the stand-in PS runs by its shebang.
           "DISTTRAIN_LAUNCH_OPTIONS": f"--ps-command {FAKE_PS_EXECUTABLE} --env {TAG_VARIABLE}={tag}"}
    try:
        result = subprocess.run(
            ["sbatch", "--wait", "--nodes=1", "--ntasks=2", f"--output={output}",
             os.path.join(ROOT, "launch", "slurm.sbatch"), *TOY_WORKER, "--greet-scheduler"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        text = output.read_text() if output.exists() else ""
        assert result.returncode == 0, result.stderr + text
        assert "[worker 0] worker 0 done" in text and "[worker 1] worker 1 done" in text
        assert "exit 0; scheduler 0; servers 0; workers 0 0" in text
    finally:
        kill_tagged(tag)
    assert wait_for_no_tagged(tag) == []


def slurm_job_field(env, job_id, field):
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                           text=True, timeout=10).stdout
    words = dict(word.split("=", 1) for word in shown.split() if "=" in word)
    return words.get(field)


def test_a_preempted_requeue_job_checkpoints_and_resumes_by_itself(slurm_env, launch_run, tmp_path,
                                                                   tmp_path_factory):
    """sbatch --requeue; SIGTERM to the batch script mid-run (what --signal=B:TERM@N sends):
    the job checkpoints, exits 75, requeues itself, and the second run resumes and ends with
    the weights and Adam moments of an unbroken run."""
    from tests.integration import test_checkpoint_dist as checkpoints
    expected = checkpoints.unbroken(launch_run, tmp_path_factory, "adam", 1)
    tag, output = new_tag(), tmp_path / "job.out"
    directory, losses = tmp_path / "ckpt", tmp_path / "loss.txt"
    command = checkpoints.MNIST + checkpoints.flags("adam") + [
        "--max-steps", str(checkpoints.STEPS), "--checkpoint-dir", str(directory),
        "--loss-log", str(losses)]
    env = {**slurm_env, "PYTHON": PYTHON, TAG_VARIABLE: tag,
           "DISTTRAIN_LAUNCH_OPTIONS": f"--env {TAG_VARIABLE}={tag} --grace 60"}
    try:
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--requeue", "--open-mode=append", "--nodes=1", "--ntasks=2",
             f"--output={output}", os.path.join(ROOT, "launch", "slurm.sbatch"), *command],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().split(";")[0]
        checkpoints.wait_for(lambda: losses.exists() and len(losses.read_text().splitlines()) >= 3,
                             "three steps of the first run")
        subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], env=env, timeout=20,
                       check=True)
        # Slurm holds a requeued batch job for about two minutes before it is eligible again
        # (moving its start time earlier gets it killed: "Job credential revoked").
        def requeued_run_ended():
            state = slurm_job_field(env, job_id, "JobState")
            if state in ("FAILED", "CANCELLED", "TIMEOUT"):
                return state
            return state == "COMPLETED" and slurm_job_field(env, job_id, "Restarts") == "1"

        def report():
            shown = subprocess.run(["scontrol", "show", "job", job_id], env=env,
                                   capture_output=True, text=True, timeout=10).stdout
            return f"the requeued run\n{shown}\n{output.read_text()[-4000:] if output.exists() else ''}"
        assert wait_until(requeued_run_ended, REQUEUE_DEADLINE_S, report) is True, report()
        text = output.read_text()
        assert "exit 75;" in text and "at step " in text, text[-4000:]
        checkpoints.assert_same_state(expected, checkpoints.final_state(directory))
    finally:
        kill_tagged(tag)


def test_timeline_and_straggler_report_come_back_through_srun(slurm_env, launch_run, tmp_path):
    """Trace events and reports travel in the processes' output, which srun brings back."""
    from tests.integration.test_observe import MNIST, timeline_tracks
    tag = new_tag()
    timeline = tmp_path / "timeline.json"
    argv = [PYTHON, "-m", "launch", "--launcher", "slurm", "--env", f"{TAG_VARIABLE}={tag}",
            "-s", "1", "--timeline", str(timeline), "--", *MNIST, "--max-steps", "20",
            "--slow-ms", "60", "--slow-rank", "1"]
    run = launch_run(argv, tag, prefix=salloc(2), env=slurm_env)
    assert run.finish(300) == 0, run.stderr[-3000:]
    assert sorted(timeline_tracks(timeline).values()) == ["server 0", "worker 0", "worker 1"]
    report = [line for line in run.stderr.splitlines() if line.startswith("launch:   worker")]
    assert "<- straggler" in report[1] and "<- straggler" not in report[0], report
    assert wait_for_no_tagged(tag) == []
