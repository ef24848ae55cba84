"""Swaps ipyparallel's controller (and optionally its engines) in every Python process of a run
of ipyparallel's own test suite (``tests/ipp_suite/run_ipp_suite.py`` puts this directory
first on ``PYTHONPATH``).

Why a ``sitecustomize`` and not a pytest plugin: the suite starts controllers three ways --
``tests/__init__.py`` (``ipcontroller_cmd_argv + [...]``), ``ipp.Cluster`` in the pytest process
(``ControllerLauncher.controller_cmd``, a copy of that list made at import), and ``ipcluster``
subprocesses (``test_apps.py``). A hook that runs when ``ipyparallel.cluster.launcher`` is first
imported, in any interpreter that inherits the environment, reaches all three.

Environment (set by the runner; without them this module only chains to Debian's):

* ``PXF_IPP_CONTROLLER_CMD`` -- JSON list, the controller command (e.g. ``["/.../pxcontroller"]``)
* ``PXF_IPP_ENGINE_CMD`` -- JSON list, the command of one engine (local engine launchers and
  ``tests/__init__.add_engines``), e.g. ``["mpirun", "-n", "1", "/.../pxengine"]``
* ``PXF_IPP_MPI_ENGINE_CMD`` -- JSON list, what ``MPIEngineSetLauncher`` runs under its own
  ``mpiexec -n N`` (e.g. ``["/.../pxengine"]``); unset: the stock ``ipengine``.
"""

import importlib.abc
import json
import os
import sys

TARGET = "ipyparallel.cluster.launcher"


def _chain_to_system_sitecustomize():
    """Run the ``sitecustomize`` this file shadows (Debian's: the apport hook), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        path = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(path):
            with open(path) as f:
                code = compile(f.read(), path, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": path})
            return


def _command(name):
    raw = os.environ.get(name)
    if not raw:
        return None
    cmd = json.loads(raw)
    if not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
        raise ValueError(f"${name} must be a JSON list of strings, not {raw!r}")
    return cmd


def _set_list_default(cls, name, cmd):
    """Make ``cmd`` the default of the List trait ``name`` (shared by all subclasses)."""
    trait = cls.class_traits()[name]
    trait.default_args = (list(cmd),)
    trait.default_value = list(cmd)


def patch_launcher(module):
    """Point ipyparallel's controller/engine commands at the commands in the environment."""
    controller = _command("PXF_IPP_CONTROLLER_CMD")
    if controller:
        # tests/__init__.py imported this very list object: mutate it in place
        module.ipcontroller_cmd_argv[:] = controller
        _set_list_default(module.ControllerLauncher, "controller_cmd", controller)
    engine = _command("PXF_IPP_ENGINE_CMD")
    if engine:
        module.ipengine_cmd_argv[:] = engine
        _set_list_default(module.EngineLauncher, "engine_cmd", engine)
    mpi_engine = _command("PXF_IPP_MPI_ENGINE_CMD")
    if mpi_engine:
        # The MPI launchers run engine_cmd under their own mpiexec: a one-rank mpirun inside
        # would nest. traitlets looks up `_<name>_default` in the class __dict__ first.
        for cls_name in ("MPIEngineSetLauncher",):
            cls = getattr(module, cls_name, None)
            if cls is not None:
                cls._engine_cmd_default = lambda self, cmd=list(mpi_engine): list(cmd)
    module._pxf_swapped = {"controller": controller, "engine": engine, "mpi_engine": mpi_engine}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``ipyparallel.cluster.launcher`` with the other finders, and patches the module
    right after it executed (before anyone can copy its lists)."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_launcher(module)

        loader.exec_module = exec_and_patch  # this spec's own loader instance
        return spec


_chain_to_system_sitecustomize()
if any(os.environ.get(n) for n in
       ("PXF_IPP_CONTROLLER_CMD", "PXF_IPP_ENGINE_CMD", "PXF_IPP_MPI_ENGINE_CMD")):
    sys.meta_path.insert(0, _PatchAfterImport())
