"""Programs and command lines: which controller, engine and MPI launcher pxcluster runs, with
what arguments and environment."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pxfabric import paths

from .messages import ClusterError

PYTHON = "/usr/bin/python3"
# the checkout or the install prefix (pxfabric.paths): PXF_HOME of the batch script
REPO = paths.HOME
PYTHON_DIR = paths.PYTHON_DIR
DEFAULT_CONTROLLER = paths.program("pxcontroller")
DEFAULT_PXENGINE = paths.program("pxengine")
ENGINE_KINDS = ("pxengine", "ipengine")

# Open MPI: allow root, and run more ranks than cores without busy-waiting (2-core machines).
MPI_ENV_DEFAULTS = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}


def controller_program() -> List[str]:
    """``$PXF_CONTROLLER`` (a command line) or ``<repo>/build/bin/pxcontroller``."""
    env = os.environ.get("PXF_CONTROLLER")
    argv = shlex.split(env) if env else [str(DEFAULT_CONTROLLER)]
    exe = shutil.which(argv[0]) if argv else None
    if not exe:
        where = "$PXF_CONTROLLER" if env else "the build tree"
        raise ClusterError(
            f"controller program {argv[0] if argv else env!r} (from {where}) does not exist or "
            "is not executable; build it with `bash scripts/build.sh` or point PXF_CONTROLLER "
            "at a controller"
        )
    return argv


def pxengine_program() -> List[str]:
    """``$PXF_ENGINE`` (a command line) or ``<repo>/build/bin/pxengine``."""
    env = os.environ.get("PXF_ENGINE")
    argv = shlex.split(env) if env else [str(DEFAULT_PXENGINE)]
    if not argv or not shutil.which(argv[0]):
        where = f"$PXF_ENGINE={env!r}" if env else str(DEFAULT_PXENGINE)
        raise ClusterError(
            f"pxengine not found ({where} does not exist or is not executable). Build it with "
            "`bash scripts/build.sh`, or use the stock MPI engines: --engines ipengine"
        )
    return argv


def pxengine_available() -> bool:
    try:
        pxengine_program()
    except ClusterError:
        return False
    return True


def engine_program(kind: str, engine_cmd: Optional[str] = None) -> List[str]:
    """The program each rank runs (without the profile arguments)."""
    if engine_cmd:
        return shlex.split(engine_cmd)
    if kind == "pxengine":
        return pxengine_program()
    if kind == "ipengine":
        return [PYTHON, "-m", "ipyparallel.engine", "--mpi"]
    raise ClusterError(f"unknown engine kind {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")


def profile_args(profile_dir: Path, cluster_id: str) -> List[str]:
    args = [f"--profile-dir={profile_dir}"]
    if cluster_id:
        args.append(f"--cluster-id={cluster_id}")
    return args


def mpirun_command(n: int, program: List[str], *, mpirun: Optional[str] = None,
                   hostfile: Optional[str] = None, mpi_args: Sequence[str] = (),
                   env: Optional[Dict[str, str]] = None) -> List[str]:
    argv = shlex.split(mpirun or os.environ.get("PXF_MPIRUN", "mpirun"))
    if not argv or not shutil.which(argv[0]):
        raise ClusterError(f"MPI launcher {argv[0] if argv else mpirun!r} not found "
                           "(install openmpi-bin, or set PXF_MPIRUN / --mpirun)")
    argv[0] = shutil.which(argv[0])
    argv += ["-n", str(n)]
    if hostfile:
        argv += ["--hostfile", str(Path(hostfile).expanduser().resolve())]
        # remote ranks (rsh/ssh launcher) get only what is exported explicitly: the Python
        # path, the connection info (start_cluster sets it once the controller is up: no
        # shared filesystem needed) and pxfabric's knobs
        exports = ["PYTHONPATH", "PYTHONUNBUFFERED", "IPP_CONNECTION_INFO"]
        exports += sorted(k for k in (os.environ if env is None else env)
                          if k.startswith("PXF_"))
        for name in exports:
            argv += ["-x", name]
    argv += list(mpi_args)
    return argv + program


_SPANS_HOSTS = ("--host", "-host", "-H", "--hostfile", "-hostfile", "--machinefile", "-machinefile",
                "--rankfile", "-rf")


def _local_mpi_env(env: Dict[str, str], mpi_args: Sequence[str]) -> None:
    """A job on this machine only: the ranks talk through shared memory and open no TCP
    listener of their own, and Open MPI's run-time (mpirun's out-of-band channel) stays on
    loopback (docs/security.md). What the user set in the environment or in ``--mpi-args``
    wins."""
    args = " ".join(mpi_args)
    if any(a.split("=")[0] in _SPANS_HOSTS for a in mpi_args):
        return
    if "btl" not in args:
        env.setdefault("OMPI_MCA_btl", "self,vader")
    if "oob_tcp_if" not in args and "OMPI_MCA_oob_tcp_if_exclude" not in env:
        env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")


def process_env() -> Dict[str, str]:
    """The environment of the controller and the engine job."""
    env = dict(os.environ)
    for k, v in MPI_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PYTHON_DIR) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR)] + paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env
