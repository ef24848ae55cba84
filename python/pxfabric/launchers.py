"""Launchers that plug pxfabric into ipyparallel's ``Cluster`` and ``ipcluster``.

* :class:`PxControllerLauncher` -- the stock local controller launcher running ``pxcontroller``
  (``$PXF_CONTROLLER`` or ``<repo>/build/bin/pxcontroller``).
* :class:`PxMPIEngineSetLauncher` -- the stock MPI engine-set launcher running one
  ``mpiexec -n N pxengine --mpi ...`` job (``$PXF_ENGINE`` or ``<repo>/build/bin/pxengine``).

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
"""

from __future__ import annotations

import os
import shlex
import shutil

from ipyparallel.cluster.launcher import (
    LauncherError,
    LocalControllerLauncher,
    MPIEngineSetLauncher,
)
from traitlets import List, default

from pxfabric.cluster import DEFAULT_CONTROLLER, DEFAULT_PXENGINE

__all__ = ["PxControllerLauncher", "PxMPIEngineSetLauncher"]


def _default_cmd(env_var: str, fallback) -> list:
    value = os.environ.get(env_var)
    return shlex.split(value) if value else [str(fallback)]


def _check_program(cmd: list, what: str, hint: str) -> None:
    if not cmd or not shutil.which(cmd[0]):
        raise LauncherError(
            f"{what} not found: {cmd[0] if cmd else '(empty command)'} does not exist or is not "
            f"executable. {hint}"
        )


class PxControllerLauncher(LocalControllerLauncher):
    """Run ``pxcontroller`` as a local process (a drop-in for ``ipcontroller``)."""

    controller_cmd = List(
        config=True,
        help="Command that runs pxcontroller (default: $PXF_CONTROLLER or "
             "<repo>/build/bin/pxcontroller).",
    )

    @default("controller_cmd")
    def _controller_cmd_default(self):
        return _default_cmd("PXF_CONTROLLER", DEFAULT_CONTROLLER)

    def start(self):
        _check_program(self.controller_cmd, "pxcontroller",
                       "Build it with `bash scripts/build.sh` or set PXF_CONTROLLER / "
                       "PxControllerLauncher.controller_cmd.")
        return super().start()


class PxMPIEngineSetLauncher(MPIEngineSetLauncher):
    """Run N pxfabric engines as **one** MPI job: ``mpiexec -n N pxengine --mpi ...``."""

    engine_cmd = List(
        config=True,
        help="Command that runs pxengine on every rank (default: $PXF_ENGINE or "
             "<repo>/build/bin/pxengine). The stock launcher appends --mpi.",
    )

    @default("engine_cmd")
    def _engine_cmd_default(self):
        return _default_cmd("PXF_ENGINE", DEFAULT_PXENGINE)

    def start(self, n):
        _check_program(self.engine_cmd, "pxengine",
                       "Build it with `bash scripts/build.sh`, set PXF_ENGINE / "
                       "PxMPIEngineSetLauncher.engine_cmd, or use the stock MPI engines "
                       "(--engines=MPI).")
        return super().start(n)
