"""pytest plugin for runs of ipyparallel's own test suite (``-p pxf_ipp_plugin``, loaded by
``tests/ipp_suite/run_ipp_suite.py``).

* Refuses to run when ``ipyparallel`` is not the tree under test (``$PXF_IPP_TREE``): a run of
  Debian's 7.1 tests by mistake would look like a pass.
* Prints, in the report header, which ipyparallel and dependencies ran and which controller and
  engine commands the suite's launchers use after the swap (``sitecustomize`` in this folder).
* Runs ``async def`` tests when pytest-asyncio is not installed (Debian 12 has it as
  ``python3-pytest-asyncio``, but it is not one of pxfabric's packages): each coroutine test in a
  new event loop, as pytest-asyncio 0.20's function-scoped ``event_loop`` does (and, as it
  does, a fresh current loop afterwards). The suite uses no async fixtures.
"""

from __future__ import annotations

import asyncio
import inspect
import os

import pytest

try:
    import pytest_asyncio  # noqa: F401

    HAVE_PYTEST_ASYNCIO = True
except ImportError:
    HAVE_PYTEST_ASYNCIO = False


def pytest_addoption(parser):
    if not HAVE_PYTEST_ASYNCIO:
        # upstream's pyproject.toml sets it; without the plugin pytest would warn on every run
        parser.addini("asyncio_mode", "accepted for pytest-asyncio's sake (fallback runner)")


def pytest_configure(config):
    if not HAVE_PYTEST_ASYNCIO:
        config.addinivalue_line("markers", "asyncio: run as a coroutine (pxf_ipp_plugin)")
    tree = os.environ.get("PXF_IPP_TREE")
    if tree:
        import ipyparallel

        where = os.path.realpath(ipyparallel.__file__)
        if not where.startswith(os.path.realpath(tree) + os.sep):
            raise pytest.UsageError(
                f"ipyparallel was imported from {where}, not from the tree under test {tree}: "
                "is the tree first on PYTHONPATH?")


def pytest_report_header(config):
    import IPython
    import ipykernel
    import jupyter_client
    import tornado
    import traitlets
    import zmq

    import ipyparallel
    from ipyparallel.cluster import launcher

    swapped = getattr(launcher, "_pxf_swapped", None) or {}
    return [
        f"ipyparallel {ipyparallel.__version__} from {os.path.dirname(ipyparallel.__file__)}",
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), jupyter_client "
        f"{jupyter_client.__version__}, ipykernel {ipykernel.__version__}, traitlets "
        f"{traitlets.__version__}, tornado {tornado.version}, IPython {IPython.__version__}",
        f"controller: {launcher.ipcontroller_cmd_argv}"
        + (" (swapped)" if swapped.get("controller") else " (stock)"),
        f"engines: {launcher.ipengine_cmd_argv}"
        + (" (swapped)" if swapped.get("engine") else " (stock)")
        + (f"; under MPIEngineSetLauncher: {swapped['mpi_engine']}"
           if swapped.get("mpi_engine") else ""),
        "async tests: " + ("pytest-asyncio" if HAVE_PYTEST_ASYNCIO
                           else "pxf_ipp_plugin fallback (pytest-asyncio not installed)"),
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if HAVE_PYTEST_ASYNCIO or not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(pyfuncitem.obj(**kwargs))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            # as pytest-asyncio does after each test: later sync code (tornado's
            # IOLoop.current() in SQLiteDB, ...) calls get_event_loop(), which raises once
            # set_event_loop(None) was called in the main thread
            asyncio.set_event_loop(asyncio.new_event_loop())
    return True
