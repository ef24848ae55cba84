"""Launchers that plug pxfabric into ipyparallel's ``Cluster`` and ``ipcluster``.

* :class:`PxControllerLauncher` -- the stock local controller launcher running ``pxcontroller``
  (``$PXF_CONTROLLER`` or ``<repo>/build/bin/pxcontroller``).
* :class:`PxMPIEngineSetLauncher` -- the stock MPI engine-set launcher running one
  ``mpiexec -n N pxengine --mpi ...`` job (``$PXF_ENGINE`` or ``<repo>/build/bin/pxengine``),
  on this host or, with a hostfile, across hosts.
* :class:`PxSlurmEngineSetLauncher` -- the stock Slurm engine-set launcher submitting one
  batch job whose ranks are one MPI job of pxengine (``slurm/pxfabric.sbatch`` with
  ``PXF_CONTROLLER_HERE=0``: ``srun --mpi=pmix`` or ``mpirun`` over the allocation), for a
  controller outside the job (ipcluster's own, on the login node).
* :class:`PxSlurmControllerLauncher` -- the stock Slurm controller launcher running
  ``pxcontroller`` in a batch job of its own.

Select them by class path (works with ``PYTHONPATH=<repo>/python``)::

    ipcluster start -n 4 --controller=pxfabric.launchers.PxControllerLauncher \\
                         --engines=pxfabric.launchers.PxMPIEngineSetLauncher

or, where the ``pxfabric`` entry points are visible (an installed package, or
``<repo>/python/pxfabric.egg-info`` on ``sys.path``), by name: ``--controller=pxfabric
--engines=pxfabric``; from Python, ``ipp.Cluster(controller="pxfabric", engines="pxfabric")``.

Both launchers keep every knob of their stock parents (``controller_args``, ``mpi_cmd``,
``mpi_args``, ``engine_args`` ...). Open MPI run as root needs ``OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`` in the environment of ``ipcluster`` (the 7.1 launchers pass
their own environment on unchanged).

Across hosts (``hostfiles/IPCLUSTER.md``): ``c.PxMPIEngineSetLauncher.hostfile = 'FILE'`` (or
``--hostfile FILE`` / ``--host``/``-H`` in ``mpi_args``) makes one MPI job over the hosts.
The job then exports, Open MPI style (``-x VAR``), what ranks started over ssh do not inherit:
``PYTHONPATH`` (with pxfabric's python directory), ``PYTHONUNBUFFERED=1`` and
``IPP_CONNECTION_INFO`` (the engine connection file's text, read here once the controller
wrote it: no shared filesystem needed). The controller must listen where rank 0 reaches it:
``c.PxControllerLauncher.controller_args = ['--ip=*']`` (or ``--engine-ip=ADDR``); this
launcher does not guess it, it warns when the engine file says 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import time
from subprocess import PIPE, STDOUT, Popen
from typing import Dict, List as TList, Optional

import psutil
from ipyparallel.cluster.launcher import (
    LauncherError,
    LocalControllerLauncher,
    MPIEngineSetLauncher,
    ProcessStateError,
    SlurmControllerLauncher,
    SlurmEngineSetLauncher,
)
from traitlets import Bool, Float, List, Unicode, default

from pxfabric.cluster import DEFAULT_CONTROLLER, DEFAULT_PXENGINE, PYTHON_DIR, REPO
from pxfabric.paths import SLURM_DIR

__all__ = ["PxControllerLauncher", "PxMPIEngineSetLauncher", "PxSlurmEngineSetLauncher",
           "PxSlurmControllerLauncher"]
JOB_SCRIPT = SLURM_DIR / "pxfabric.sbatch"

# mpirun options that place ranks on other hosts (Open MPI spellings; MPICH's hydra shares
# -hostfile/-machinefile/-host). With one of them the job gets the remote-rank environment.
HOST_OPTIONS = ("--hostfile", "-hostfile", "--machinefile", "-machinefile", "--host", "-host",
                "-H")
HOSTFILE_OPTIONS = ("--hostfile", "-hostfile", "--machinefile", "-machinefile")
# What ranks started over ssh need from here (Open MPI passes nothing else but OMPI_*).
EXPORTED = ("PYTHONPATH", "PYTHONUNBUFFERED", "IPP_CONNECTION_INFO")


def _default_cmd(env_var: str, fallback) -> list:
    value = os.environ.get(env_var)
    return shlex.split(value) if value else [str(fallback)]


def _check_program(cmd: list, what: str, hint: str) -> None:
    if not cmd or not shutil.which(cmd[0]):
        raise LauncherError(
            f"{what} not found: {cmd[0] if cmd else '(empty command)'} does not exist or is not "
            f"executable. {hint}"
        )


def _has_option(args, names) -> bool:
    """``--opt VALUE`` or ``--opt=VALUE`` for one of ``names`` in ``args``."""
    return any(a in names or a.split("=", 1)[0] in names for a in args)


def _exported(args) -> set:
    """Variables ``args`` already exports (``-x VAR`` / ``-x VAR=value``)."""
    out = set()
    for flag, value in zip(args, args[1:]):
        if flag == "-x":
            out.add(value.split("=", 1)[0])
    return out


class PxControllerLauncher(LocalControllerLauncher):
    """Run ``pxcontroller`` as a local process (a drop-in for ``ipcontroller``)."""

    controller_cmd = List(
        config=True,
        help="Command that runs pxcontroller (default: $PXF_CONTROLLER or "
             "<repo>/build/bin/pxcontroller).",
    )

    # wall-clock time of start(): connection files older than this are a previous run's
    started_at = Float(0.0)

    @default("controller_cmd")
    def _controller_cmd_default(self):
        return _default_cmd("PXF_CONTROLLER", DEFAULT_CONTROLLER)

    def start(self):
        _check_program(self.controller_cmd, "pxcontroller",
                       "Build it with `bash scripts/build.sh` or set PXF_CONTROLLER / "
                       "PxControllerLauncher.controller_cmd.")
        self.started_at = time.time()
        return super().start()


class PxMPIEngineSetLauncher(MPIEngineSetLauncher):
    """Run N pxfabric engines as **one** MPI job: ``mpiexec -n N pxengine --mpi ...``."""

    engine_cmd = List(
        config=True,
        help="Command that runs pxengine on every rank (default: $PXF_ENGINE or "
             "<repo>/build/bin/pxengine). The stock launcher appends --mpi.",
    )

    hostfile = Unicode(
        "",
        config=True,
        help="MPI hostfile (Open MPI format: `nodeA slots=2` per line): adds `--hostfile "
             "FILE` to the mpiexec command, so the job's ranks run on those hosts. A relative "
             "path is taken from ipcluster's working directory.",
    )

    export_env = Bool(
        True,
        config=True,
        help="When ranks run on other hosts (hostfile, or --hostfile/--host/-H in mpi_args), "
             "export PYTHONPATH, PYTHONUNBUFFERED and IPP_CONNECTION_INFO (the engine "
             "connection file's text) to them with Open MPI's `-x VAR`. Set False for an "
             "mpiexec that forwards the environment another way (MPICH's hydra forwards all).",
    )

    connection_info_timeout = Float(
        30.0,
        config=True,
        help="Seconds to wait for the controller's engine connection file before starting a "
             "job across hosts (its text goes to the ranks as IPP_CONNECTION_INFO).",
    )

    @default("engine_cmd")
    def _engine_cmd_default(self):
        return _default_cmd("PXF_ENGINE", DEFAULT_PXENGINE)

    # --- the command line -------------------------------------------------------------------
    def _hostfile_args(self) -> TList[str]:
        if not self.hostfile:
            return []
        path = os.path.abspath(os.path.expanduser(self.hostfile))
        return ["--hostfile", path]

    @property
    def across_hosts(self) -> bool:
        """True when the job's ranks may run on other hosts (a hostfile or host list)."""
        return bool(self.hostfile) or _has_option(self.mpi_args, HOST_OPTIONS)

    def _export_args(self) -> TList[str]:
        if not (self.export_env and self.across_hosts):
            return []
        have = _exported(self.mpi_args)
        out: TList[str] = []
        for name in EXPORTED:
            if name not in have:
                out += ["-x", name]
        return out

    def find_args(self):
        return (
            self.mpi_cmd
            + ["-n", str(self.n)]
            + self._hostfile_args()
            + self._export_args()
            + self.mpi_args
            + self.program
            + self.program_args
        )

    # --- the environment of a job across hosts ------------------------------------------
    def _controller_started_at(self) -> Optional[float]:
        """When the controller launcher of our own Cluster started, if it is ours."""
        ctl = getattr(self.parent, "controller", None)
        return getattr(ctl, "started_at", None) or None

    def _controller_exit(self):
        """The exit status of our Cluster's controller process, if it has exited."""
        ctl = getattr(self.parent, "controller", None)
        proc = getattr(ctl, "process", None)
        if proc is None:
            return None
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            pass
        return getattr(ctl, "stop_data", None) or "exited"

    def read_connection_info(self) -> str:
        """The engine connection file's text, once the controller wrote it (bounded wait)."""
        path = self.connection_files["engine"]
        since = self._controller_started_at()
        deadline = time.monotonic() + self.connection_info_timeout
        said = False
        while True:
            try:
                st = os.stat(path)
                # A file from before our controller started is a previous run's (stale).
                if since is None or st.st_mtime >= since - 0.05:
                    with open(path) as f:
                        text = f.read()
                    json.loads(text)           # complete (written atomically by pxcontroller)
                    return text
            except (OSError, ValueError):
                pass
            status = self._controller_exit()
            if status is not None:
                raise LauncherError(f"the controller stopped ({status}) before writing {path}")
            if time.monotonic() >= deadline:
                raise LauncherError(
                    f"engine connection file {path} not written within "
                    f"{self.connection_info_timeout:g} s: is the controller running for this "
                    f"profile and cluster id? (PxMPIEngineSetLauncher.connection_info_timeout)")
            if not said:
                self.log.info("waiting for %s to pass it to the ranks", path)
                said = True
            time.sleep(0.05)

    def job_env(self) -> Dict[str, str]:
        """The environment of mpiexec: ours, plus what remote ranks need when across hosts."""
        env = dict(os.environ)
        if not (self.export_env and self.across_hosts):
            return env
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(PYTHON_DIR) not in paths:
            paths.insert(0, str(PYTHON_DIR))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        text = self.read_connection_info()
        env["IPP_CONNECTION_INFO"] = text
        try:
            iface = str(json.loads(text).get("interface", ""))
        except (ValueError, AttributeError):
            iface = ""
        if iface.startswith(("tcp://127.", "tcp://localhost", "tcp://[::1]")):
            self.log.warning(
                "the controller listens on %s only, but the engines run across hosts: rank 0 "
                "can register only if it runs on the controller's host. Let the controller "
                "listen where the hosts reach it: c.PxControllerLauncher.controller_args = "
                "['--ip=*'] (or --engine-ip=ADDR).", iface)
        return env

    # --- start ----------------------------------------------------------------------------
    def start(self, n):
        _check_program(self.engine_cmd, "pxengine",
                       "Build it with `bash scripts/build.sh`, set PXF_ENGINE / "
                       "PxMPIEngineSetLauncher.engine_cmd, or use the stock MPI engines "
                       "(--engines=MPI).")
        if self.hostfile:
            if not os.path.isfile(os.path.expanduser(self.hostfile)):
                raise LauncherError(f"hostfile {self.hostfile} does not exist "
                                    "(PxMPIEngineSetLauncher.hostfile)")
            if _has_option(self.mpi_args, HOSTFILE_OPTIONS):
                raise LauncherError(
                    f"two hostfiles: PxMPIEngineSetLauncher.hostfile = {self.hostfile!r} and "
                    f"one in mpi_args {self.mpi_args}; keep one of them")
        if not (self.export_env and self.across_hosts):
            return super().start(n)
        self.n = n
        env = self.job_env()
        # LocalProcessLauncher.start of ipyparallel 7.1, with the job's environment.
        self.log.debug("Starting %s: %r", self.__class__.__name__, self.args)
        if self.state != "before":
            raise ProcessStateError(
                f"The process was already started and has state: {self.state}")
        with open(self.output_file, "ab") as f:
            proc = Popen(self.args, stdout=f.fileno(), stderr=STDOUT, stdin=PIPE, env=env,
                         cwd=self.work_dir, start_new_session=True)
        self.pid = proc.pid
        self.process = psutil.Process(proc.pid)
        self.notify_start(self.process.pid)
        self._start_waiting()
        if 1 <= self.log.getEffectiveLevel() <= logging.DEBUG:
            self._start_streaming()


class PxSlurmEngineSetLauncher(SlurmEngineSetLauncher):
    """N pxfabric engines as **one** Slurm batch job running one MPI job of pxengine.

    The batch script is the stock launcher's (``batch_template``/``batch_template_file``,
    ``queue``, ``account``, ``qos``, ``timelimit``, ``options``, ``namespace`` all work as
    for ``--engines=Slurm``); its default ends by running ``slurm/pxfabric.sbatch`` with
    ``PXF_CONTROLLER_HERE=0``, which starts ``srun --mpi=pmix pxengine`` (or ``mpirun``:
    ``PXF_LAUNCH``) over the allocation, reads the engine connection file from the shared
    profile, and on ``scancel`` stops the ranks so that they unregister from the controller.
    The controller must listen where the nodes reach it (``--ip=*`` or ``--engine-ip=ADDR``
    in ``PxControllerLauncher.controller_args``). A template of your own can use
    ``{job_script}`` and ``{pxf_home}`` besides the stock names.
    """

    default_template = Unicode(
        """#!/bin/bash
#SBATCH --job-name=pxfabric-engines-{cluster_id}
#SBATCH --ntasks={n}
export PXF_HOME={pxf_home} PXF_CONTROLLER_HERE=0
export IPP_PROFILE_DIR={profile_dir} IPP_CLUSTER_ID={cluster_id}
exec /bin/bash {job_script}
"""
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.context["pxf_home"] = shlex.quote(str(REPO))
        self.context["job_script"] = shlex.quote(str(JOB_SCRIPT))

    def start(self, n=1):
        if not os.path.isfile(JOB_SCRIPT):
            raise LauncherError(f"the pxfabric batch script {JOB_SCRIPT} is missing")
        _check_program(self.submit_command, "sbatch",
                       "Run ipcluster on a login node of a Slurm cluster (or load its module).")
        return super().start(n)


class PxSlurmControllerLauncher(SlurmControllerLauncher):
    """``pxcontroller`` in a Slurm batch job of its own (the stock Slurm controller launcher's
    traits and template), listening on all interfaces of its node so that the engines and
    the clients can reach it (``controller_args`` overrides, e.g. ``--ip=ADDR --curve``)."""

    controller_cmd = List(
        config=True,
        help="Command that runs pxcontroller (default: $PXF_CONTROLLER or "
             "<repo>/build/bin/pxcontroller).",
    )
    controller_args = List(["--ip=*"], config=True,
                           help="Arguments for pxcontroller in the batch job.")

    @default("controller_cmd")
    def _controller_cmd_default(self):
        return _default_cmd("PXF_CONTROLLER", DEFAULT_CONTROLLER)

    def start(self):
        _check_program(self.controller_cmd, "pxcontroller",
                       "Build it with `bash scripts/build.sh` or set PXF_CONTROLLER.")
        return super().start()
