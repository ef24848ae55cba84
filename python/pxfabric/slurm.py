"""``pxcluster start --slurm``: a pxfabric cluster as one Slurm batch job.

The job runs ``slurm/pxfabric.sbatch``: ``pxcontroller`` on the job's first node and one MPI
job of ``pxengine`` over the allocation (``srun --mpi=pmix`` or ``mpirun``). Home directories
are shared on clusters, so the controller writes its connection files into the profile here
and the stock client connects with ``ipp.Client(profile=...)``. From the login node::

    pxcluster start -n 64 --slurm --nodes 2 --time 01:00:00 --partition debug [--account A]
                    [--qos Q] [--slurm-args "..."] [--slurm-template FILE]
    pxcluster list        # job id, state, nodes, walltime left, engines registered
    pxcluster stop        # scancel; the job stops its engines, then its controller

What it does:

1. renders the batch script from a template (``slurm/pxcluster.sbatch.template``, or
   ``--slurm-template FILE`` for a site's own) with ipyparallel's Slurm launcher's names --
   ``{n}``, ``{queue}``, ``{account}``, ``{qos}``, ``{timelimit}``, ``{nodes}``,
   ``{cluster_id}``, ``{profile_dir}`` -- plus ``{sbatch_options}`` (the ``#SBATCH`` lines
   for the options given), ``{output}``, ``{pxf_home}``, ``{job_script}`` and
   ``{job_name}``. ``{name}`` is replaced only for those names, and never in ``${name}``,
   so a template is an ordinary bash script;
2. submits it with ``sbatch --parsable`` (``--slurm-args`` go on that command line), keeps the
   rendered script next to the logs (``<profile>/log/pxslurm-<id>.sbatch``);
3. follows the job with ``squeue`` (``scontrol show job`` once it left the queue) and says
   what Slurm says: pending and why, running on which nodes, how many engines registered;
4. on a refusal, a job that ends or stays pending past ``--timeout``, or Ctrl-C: reports
   Slurm's own words, cancels the job, removes the files; nothing is left behind.

The state file (``<profile>/security/pxcluster-<id>.json``, as for local clusters) records the
job id instead of PIDs: ``pxcluster stop`` runs ``scancel`` and waits until Slurm reports the
job gone, ``pxcluster list`` asks ``squeue`` for the state, nodes and walltime left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import psutil

from pxfabric import cluster as cl
from pxfabric import paths

SLURM_DIR = paths.SLURM_DIR
JOB_SCRIPT = SLURM_DIR / "pxfabric.sbatch"
DEFAULT_TEMPLATE = SLURM_DIR / "pxcluster.sbatch.template"
COMMAND_TIMEOUT = 30.0      # seconds for one sbatch/squeue/scancel/scontrol call
RESTART_JOB_CHECK = 1.0    # seconds between squeue calls while a restart waits for the engines
STOP_TIMEOUT = 60.0         # seconds for a cancelled job to leave the queue
ENDED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT")
# Pending reasons that never clear by waiting (the job breaks a limit of the partition, the
# account or the QOS: sites without EnforcePartLimits accept such jobs and keep them pending).
HOPELESS = {
    "PartitionTimeLimit": "ask for less time (--time; `sinfo -o '%P %l'` shows each "
                          "partition's limit)",
    "PartitionNodeLimit": "ask for fewer nodes (--nodes), or another --partition",
    "InvalidAccount": "use an account you belong to (--account)",
    "AccountNotAllowed": "use an account this partition allows (--account, --partition)",
    "InvalidQOS": "use a QOS you have (--qos)",
    "QOSNotAllowed": "use a QOS this partition allows (--qos, --partition)",
    "BadConstraints": "fix --constraint/--gres in --slurm-args (no node has them)",
    "DependencyNeverSatisfied": "remove the --dependency from --slurm-args",
    "PartitionDown": "the partition is down: choose another --partition",
    "PartitionInactive": "the partition is inactive: choose another --partition",
}
_PLACEHOLDER = re.compile(r"(?<!\$)\{(\w+)\}")

# What to do about the refusals people meet most (matched on sbatch's own message).
_HINTS = (
    ("invalid partition", "choose one `sinfo -s` lists (--partition)"),
    ("time limit", "ask for less time (--time; `sinfo -o '%P %l'` shows each partition's limit)"),
    ("invalid account", "use an account you belong to (--account; `sacctmgr show assoc "
                        "user=$USER` lists them)"),
    ("user's group not permitted", "use a partition your group may use (--partition)"),
    ("node configuration is not available", "ask for fewer nodes or tasks per node "
                                            "(--nodes, -n)"),
    ("more processors requested than permitted", "ask for fewer ranks or more nodes"),
    ("qos", "use a QOS you have (--qos; `sacctmgr show assoc user=$USER format=qos`)"),
)


class SlurmError(cl.ClusterError):
    pass


# --------------------------------------------------------------------------------------------
# Slurm's commands
# --------------------------------------------------------------------------------------------

def _command(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SlurmError(f"Slurm's `{name}` is not on PATH: run pxcluster on a login node of a "
                         "Slurm cluster (or load its slurm module)")
    return path


def _run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT,
         env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None):
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(cwd) if cwd else None)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{shlex.join(argv)}` did not answer within {timeout:.0f}s: is "
                         "slurmctld reachable? (`scontrol ping`)") from None


def _slurm_words(text: str) -> str:
    """sbatch/squeue messages without their ``sbatch: error:`` prefixes, one line."""
    lines = [re.sub(r"^\w+: error: ", "", ln.strip()) for ln in text.strip().splitlines()]
    return "; ".join(ln for ln in lines if ln)


def hint_for(message: str) -> str:
    low = message.lower()
    for needle, hint in _HINTS:
        if needle in low:
            return hint
    return "check the options against `sinfo -s` and your site's documentation"


def job_info(job_id: str) -> Dict[str, str]:
    """What Slurm knows of a job: ``state``, ``reason``, ``nodes``, ``time_left``, ``end``
    (from ``squeue`` while queued or running, ``scontrol show job`` after); ``{}`` when Slurm
    no longer knows it."""
    r = _run([_command("squeue"), "-h", "-j", str(job_id), "-o", "%T|%r|%N|%L|%e|%M"])
    line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    if line:
        state, reason, nodes, left, end, used = (line.split("|") + [""] * 6)[:6]
        return {"state": state, "reason": "" if reason in ("None", "(null)") else reason,
                "nodes": nodes, "time_left": left, "end": end, "elapsed": used}
    r = _run([_command("scontrol"), "show", "job", "-o", str(job_id)])
    if r.returncode != 0 or "JobState=" not in r.stdout:
        return {}
    fields = dict(re.findall(r"(\w+)=(\S*)", r.stdout))
    reason = fields.get("Reason", "")
    return {"state": fields.get("JobState", ""), "reason": "" if reason == "None" else reason,
            "nodes": fields.get("NodeList", ""), "time_left": "", "end": fields.get("EndTime", ""),
            "elapsed": fields.get("RunTime", ""), "exit_code": fields.get("ExitCode", "")}


def cancel(job_id: str) -> None:
    r = _run([_command("scancel"), str(job_id)])
    if r.returncode != 0 and "already completing or completed" not in r.stderr \
            and "Invalid job id" not in r.stderr:
        raise SlurmError(f"scancel {job_id} failed: {_slurm_words(r.stderr or r.stdout)}")


def wait_gone(job_id: str, timeout: float = STOP_TIMEOUT) -> Dict[str, str]:
    """Wait until the job has left the queue (ended); return its last known info."""
    deadline = time.monotonic() + timeout
    info: Dict[str, str] = {}
    while True:
        info = job_info(job_id)
        if not info or info.get("state") in ENDED:
            return info
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} is still {info.get('state')} {timeout:.0f}s after "
                             "scancel (Slurm's KillWait, or an unresponsive node); "
                             f"`squeue -j {job_id}` shows it")
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# The batch script
# --------------------------------------------------------------------------------------------

def sbatch_options(n: int, *, nodes: Optional[str] = None, timelimit: Optional[str] = None,
                   queue: Optional[str] = None, account: Optional[str] = None,
                   qos: Optional[str] = None) -> str:
    lines = [f"#SBATCH --ntasks={n}"]
    for flag, value in (("--nodes", nodes), ("--time", timelimit), ("--partition", queue),
                        ("--account", account), ("--qos", qos)):
        if value:
            lines.append(f"#SBATCH {flag}={value}")
    return "\n".join(lines)


def render(template: str, context: Dict[str, object], source: str = "template") -> str:
    """``{name}`` -> ``context[name]`` for the names pxcluster knows; ``${name}`` untouched."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)
                      if m.group(1) not in context})
    if unknown:
        raise SlurmError(f"{source} uses {', '.join('{' + u + '}' for u in unknown)}, which "
                         f"pxcluster does not know; it knows {', '.join(sorted(context))} "
                         "(write ${VAR} for shell variables)")
    return _PLACEHOLDER.sub(lambda m: str(context[m.group(1)]), template)


def _time_left(info: Dict[str, str]) -> str:
    left = info.get("time_left", "")
    return "no limit" if left in ("UNLIMITED", "NOT_SET", "INVALID") else left


# --------------------------------------------------------------------------------------------
# start / stop / status
# --------------------------------------------------------------------------------------------

def start_slurm_cluster(n: int, *, profile: Optional[str] = None,
                        profile_dir: Optional[str] = None, cluster_id: str = "",
                        nodes: Optional[str] = None, timelimit: Optional[str] = None,
                        queue: Optional[str] = None, account: Optional[str] = None,
                        qos: Optional[str] = None, slurm_args: Sequence[str] = (),
                        template: Optional[str] = None, launch: Optional[str] = None,
                        controller_args: Sequence[str] = (), engine_args: Sequence[str] = (),
                        mpi_args: Sequence[str] = (), timeout: float = cl.DEFAULT_TIMEOUT,
                        quiet: bool = False) -> dict:
    """Submit the cluster as one batch job; return the state once all ``n`` engines
    registered. Any failure cancels the job and removes its files (:class:`SlurmError`)."""
    if n < 1:
        raise SlurmError(f"-n must be at least 1 (got {n})")
    if launch not in (None, "", "srun", "mpirun"):
        raise SlurmError(f"--slurm-launch must be srun or mpirun (got {launch!r})")
    say = (lambda m: None) if quiet else cl._say
    sbatch = _command("sbatch")
    _command("squeue")
    pdir = cl.resolve_profile_dir(profile, profile_dir)
    cluster_id = cluster_id or ""
    tag = cl._tag(cluster_id)
    spath = cl.state_path(pdir, cluster_id)
    cfiles = cl.connection_files(pdir, cluster_id)
    logdir = pdir / "log"
    logdir.mkdir(parents=True, exist_ok=True)
    # the programs must exist before anything is submitted (same checks as a local start)
    controller = cl.controller_program()
    engine = cl.pxengine_program()

    tpath = Path(template).expanduser() if template else DEFAULT_TEMPLATE
    try:
        text = tpath.read_text()
    except OSError as e:
        raise SlurmError(f"cannot read the batch template {tpath}: {e.strerror}") from None
    context: Dict[str, object] = {
        "n": n, "queue": queue or "", "account": account or "", "qos": qos or "",
        "timelimit": timelimit or "", "nodes": nodes or "", "cluster_id": cluster_id,
        "profile_dir": str(pdir),
        "sbatch_options": sbatch_options(n, nodes=nodes, timelimit=timelimit, queue=queue,
                                         account=account, qos=qos),
        "output": str(logdir / f"pxslurm-{tag}-%j.out"),
        "pxf_home": shlex.quote(str(cl.REPO)), "job_script": shlex.quote(str(JOB_SCRIPT)),
        "job_name": f"pxfabric-{tag}",
    }
    script = render(text, context, source=f"the batch template {tpath}")
    script_path = logdir / f"pxslurm-{tag}.sbatch"

    env = cl.process_env()
    env.update(PXF_HOME=str(cl.REPO), IPP_PROFILE_DIR=str(pdir), IPP_CLUSTER_ID=cluster_id,
               PXF_CONTROLLER=shlex.join(controller), PXF_ENGINE=shlex.join(engine),
               PXF_CONTROLLER_ARGS=" ".join(shlex.quote(a) for a in controller_args),
               PXF_ENGINE_ARGS=" ".join(shlex.quote(a) for a in engine_args),
               PXF_MPI_ARGS=" ".join(shlex.quote(a) for a in mpi_args))
    if launch:
        env["PXF_LAUNCH"] = launch
    # the job runs on a compute node: a local run's loopback-only MPI defaults do not apply
    for k in ("OMPI_MCA_btl", "OMPI_MCA_oob_tcp_if_include"):
        if k not in os.environ:
            env.pop(k, None)

    with cl._profile_lock(pdir):
        cl._refuse_running(spath, cfiles, say)
        script_path.write_text(script)
        argv = [sbatch, "--parsable", *slurm_args, str(script_path)]
        r = _run(argv, env=env, cwd=logdir)
        if r.returncode != 0:
            words = _slurm_words(r.stderr or r.stdout) or f"exit status {r.returncode}"
            raise SlurmError(f"sbatch refused the job: {words}\n  what to do: {hint_for(words)}"
                             f"\n  command: {shlex.join(argv)}")
        job_id = r.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"cannot read a job id in sbatch's answer {r.stdout.strip()!r}")
        state = {
            "version": cl.STATE_VERSION, "state_file": str(spath), "profile_dir": str(pdir),
            "profile": profile or (None if profile_dir else "default"),
            "cluster_id": cluster_id, "engine_kind": "pxengine", "n": n,
            "hostfile": None, "controller_address": None,
            "start_time": time.time(), "start_time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "starting", "pxcluster": cl._proc_record(psutil.Process()),
            "controller": None, "engines": None,
            "slurm": {"job_id": job_id, "script": str(script_path),
                      "output": context["output"].replace("%j", job_id),
                      "nodes": nodes, "timelimit": timelimit, "queue": queue},
            "connection_files": {k: str(v) for k, v in cfiles.items()},
            "logs": {"engines": str(logdir / f"pxengines{'-' + cluster_id if cluster_id else ''}"
                                    f"-{job_id}.log"),
                     "controller": str(logdir / f"pxcontroller{'-' + cluster_id if cluster_id else ''}"
                                       f"-{job_id}.log"),
                     "job": context["output"].replace("%j", job_id)},
        }
        cl.save_state(state)
    what = ", ".join(x for x in (f"{nodes} nodes" if nodes else "", f"{n} ranks",
                                 f"walltime {timelimit}" if timelimit else "",
                                 f"partition {queue}" if queue else "") if x)
    say(f"submitted job {job_id} ({what}); script {script_path}")
    try:
        with cl._signals_interrupt():
            _follow(state, n, timeout, say)
    except BaseException as e:
        say(f"start failed; cancelling job {job_id} (logs kept in {logdir})", stream=sys.stderr)
        with contextlib.suppress(Exception):
            stop_slurm(state, quiet=True)
        if isinstance(e, cl._Interrupted):
            raise SlurmError(str(e)) from None
        raise
    return state


def _job_output_tail(state: dict, lines: int = 15) -> str:
    out = []
    for key in ("job", "controller", "engines"):
        path = Path((state.get("logs") or {}).get(key, ""))
        if path.name and path.exists():
            out.append(f"--- {path} (last lines):\n{cl._log_tail(path, lines)}")
    return "\n".join(out)


def _follow(state: dict, n: int, timeout: float, say) -> None:
    job_id = state["slurm"]["job_id"]
    client_file = Path(state["connection_files"]["client"])
    t0 = time.monotonic()
    deadline = t0 + timeout
    last_said = ""
    have = 0
    t_running = None
    while True:
        info = job_info(job_id)
        st = info.get("state", "")
        if not info or st in ENDED or st == "COMPLETING":
            why = f"{st or 'gone'}" + (f" ({info['reason']})" if info.get("reason") else "")
            raise SlurmError(f"job {job_id} ended before its engines registered: {why}\n"
                             + _job_output_tail(state))
        if st == "PENDING":
            reason = info.get("reason", "")
            if reason in HOPELESS or reason.startswith("QOSMax"):
                raise SlurmError(
                    f"job {job_id} cannot start: Slurm keeps it pending with reason "
                    f"{reason}; cancelled it.\n  what to do: "
                    + HOPELESS.get(reason, "stay within your QOS limits (`sacctmgr show qos`)"))
            line = f"job {job_id} pending" + (f" ({reason})" if reason else "")
        elif st == "RUNNING":
            if t_running is None:
                t_running = time.monotonic()
                state["slurm"]["nodelist"] = info.get("nodes")
                cl.save_state(state)
            line = f"job {job_id} running on {info.get('nodes')}"
            if client_file.exists():
                got = cl.registered_engines(client_file, timeout=cl.QUERY_TIMEOUT)
                if got is not None:
                    have = len(got)
                    line += f"; {have}/{n} engines registered"
                    if have >= n:
                        break
            else:
                line += "; waiting for the controller"
        else:
            line = f"job {job_id} {st}" + (f" ({info['reason']})" if info.get("reason") else "")
        if line != last_said:
            say(line + " ...")
            last_said = line
        if time.monotonic() > deadline:
            where = ("still pending" if st == "PENDING" else f"{st.lower()}, {have} of {n} "
                     "engines registered")
            raise SlurmError(
                f"timed out after {timeout:.0f}s: job {job_id} {where}"
                + (f" (Slurm's reason: {info['reason']})" if info.get("reason") else "")
                + "; cancelled it. Use a longer --timeout, or another --partition / fewer "
                "--nodes for a job that starts sooner.\n" + _job_output_tail(state))
        # engines register within a few seconds of the job starting: look often then
        time.sleep(0.05 if client_file.exists() else 0.2 if st == "RUNNING" else 0.5)
    state["status"] = "running"
    state["ready_seconds"] = round(time.monotonic() - t0, 2)
    state["slurm"]["registered_seconds"] = round(time.monotonic() - (t_running or t0), 2)
    state["hosts"] = cl.engine_hosts(client_file)
    cl.save_state(state)
    say(f"job {job_id} running on {state['slurm'].get('nodelist')}; {n}/{n} engines "
        f"registered in {state['ready_seconds']:.1f} s")


def stop_slurm(state: dict, quiet: bool = False) -> dict:
    """scancel the job, wait until Slurm reports it ended, remove the files."""
    say = (lambda m: None) if quiet else cl._say
    job_id = state["slurm"]["job_id"]
    info = job_info(job_id)
    if info and info.get("state") not in ENDED:
        say(f"cancelling job {job_id} (scancel {job_id})")
        cancel(job_id)
        info = wait_gone(job_id)
    removed = [p for p in (state.get("connection_files") or {}).values() if cl._unlink(Path(p))]
    cl.remove_state(Path(state["state_file"]))
    return {"killed": [], "left": [], "removed": removed, "job": job_id,
            "job_state": (info or {}).get("state", "gone")}


def restart_slurm(state: dict, timeout: float, quiet: bool = False) -> dict:
    """``pxcluster restart`` of a Slurm cluster: the batch script (slurm/pxfabric.sbatch) ends
    its engine job and starts it again in the same allocation when its shell gets USR2
    (``scancel --batch --signal=USR2``); the controller inside the job stays, and the new ranks
    get the same ids. Returns the state once all ``n`` new engines registered."""
    from pxfabric import restart  # restart imports this module for Slurm clusters

    say = (lambda m: None) if quiet else cl._say
    job_id = state["slurm"]["job_id"]
    n = int(state["n"])
    client_file = Path((state.get("connection_files") or {}).get("client", ""))
    engine_log = (state.get("logs") or {}).get("engines") or ""
    info = job_info(job_id)
    if info.get("state") != "RUNNING":
        raise SlurmError(f"job {job_id} is {info.get('state') or 'gone'}, not running: nothing "
                         "to restart (`pxcluster list` says more; `pxcluster stop` removes it)")
    marker = Path(engine_log).with_suffix(".restart") if engine_log else None
    if marker is None or not marker.exists():
        raise SlurmError(
            f"job {job_id}'s batch script cannot restart its engines ({marker or 'no engine log recorded'} is missing: a "
            "site template that does not run slurm/pxfabric.sbatch, or a pxfabric older than "
            "restart); `pxcluster stop` and `pxcluster start --slurm ...` instead")
    before = cl.registered_engines(client_file)
    if before is None:
        raise SlurmError(f"the controller of job {job_id} does not answer ({client_file}); "
                         f"its log: {(state.get('logs') or {}).get('controller')}")
    old_uuids = set(before.values())
    t0 = time.monotonic()
    say(f"restarting the engines of job {job_id} (scancel --batch --signal=USR2 {job_id})")
    r = _run([_command("scancel"), "--batch", "--signal=USR2", str(job_id)])
    if r.returncode != 0:
        raise SlurmError(f"scancel --batch --signal=USR2 {job_id} failed: "
                         f"{_slurm_words(r.stderr or r.stdout)}")
    deadline = t0 + timeout
    have: Dict[int, str] = {}
    job_checked = time.monotonic()
    while True:
        got = cl.registered_engines(client_file)
        if got is not None:
            have = {i: u for i, u in got.items() if u not in old_uuids}
            if len(have) >= n and not old_uuids & set(got.values()):
                break
        if time.monotonic() - job_checked >= RESTART_JOB_CHECK:  # squeue is slurmctld's load
            job_checked = time.monotonic()
            info = job_info(job_id)
            if info.get("state") != "RUNNING":
                raise SlurmError(f"job {job_id} ended during the restart: "
                                 f"{info.get('state') or 'gone'}\n" + _job_output_tail(state))
        if time.monotonic() > deadline:
            raise SlurmError(
                f"timed out after {timeout:.0f}s: {len(have)} of {n} engines of the new engine "
                f"job registered; job {job_id} keeps running.\n" + _job_output_tail(state))
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    restart.record_restart(state, elapsed)
    state["hosts"] = cl.engine_hosts(client_file)
    cl.save_state(state)
    want = list(range(n))
    if sorted(have) != want:
        raise SlurmError(f"the new engine job of job {job_id} is running, but its engines got "
                         f"ids {restart._id_span(have)} instead of {restart._id_span(want)}")
    say(f"restarted {n} engines (ids {restart._id_span(want)}) in {elapsed:.1f} s")
    return state


def slurm_status(state: dict) -> dict:
    """``pxcluster list``'s row for a Slurm cluster."""
    job_id = state["slurm"]["job_id"]
    try:
        info = job_info(job_id)
    except cl.ClusterError as e:
        info = {"state": "unknown", "reason": str(e)}
    st = info.get("state", "")
    registered = None
    client_file = Path((state.get("connection_files") or {}).get("client", ""))
    if st == "RUNNING" and client_file.name and client_file.exists():
        got = cl.registered_engines(client_file)
        registered = len(got) if got is not None else None
    n = state.get("n")
    if not info:
        status = f"job {job_id} is gone (Slurm no longer knows it): `pxcluster stop` removes the state"
    elif st == "PENDING":
        status = f"job {job_id} pending ({info.get('reason') or '-'})"
    elif st == "RUNNING":
        left = _time_left(info)
        reg = "?" if registered is None else registered
        status = f"job {job_id} running, {left} left, {reg}/{n} engines registered"
    elif st in ENDED:
        status = (f"job {job_id} ended: {st}" + (f" ({info['reason']})" if info.get("reason")
                                                  else "")
                  + ": `pxcluster stop` removes the state")
    else:
        status = f"job {job_id} {st}"
    return {
        "profile_dir": state.get("profile_dir"), "cluster_id": state.get("cluster_id") or "",
        "engine_kind": "pxengine (slurm)", "engines_expected": n,
        "engines_registered": registered, "controller_pid": None, "controller_alive": False,
        "mpirun_pid": None, "mpirun_alive": False, "started": state.get("start_time_iso"),
        "hosts": state.get("hosts"), "hostfile": None, "status": status,
        "state_file": state.get("state_file"),
        "slurm_job": job_id, "slurm_state": st or "gone", "nodes": info.get("nodes"),
        "time_left": _time_left(info) if st == "RUNNING" else None,
        "end": info.get("end"),
    }
