"""Fixtures for the controller integration tests (tests/integration/test_controller_*.py).

Everything here is opt-in: a test gets a cluster only by asking for one of these fixtures, so
other test files in this folder are unaffected.

* ``controller_kind`` -- parametrised over ``$PXF_CONTROLLERS`` (comma list of ``pxfabric``,
  ``stock``; default both). Selecting ``pxfabric`` without ``build/bin/pxcontroller`` makes
  every test that uses it fail with a message saying so; ``$PXF_PXCONTROLLER`` points at
  another binary.
* ``cluster`` -- module-scoped controller + N stock engines (``ENGINES = N`` at module level,
  default 4).
* ``rc`` -- a fresh ``ipyparallel.Client`` of ``cluster`` per test.
* ``make_cluster`` -- function-scoped factory for destructive tests (kill, shutdown).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as harness  # noqa: E402

_LIVE: "set[harness.Cluster]" = set()


def _stop_live_clusters() -> None:
    for c in list(_LIVE):
        try:
            c.stop()
        finally:
            _LIVE.discard(c)


def _on_sigterm(signum, frame):
    # Being killed (e.g. by an outer CI timeout) must not leave controllers and engines behind.
    _stop_live_clusters()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def pytest_configure(config):
    if hasattr(signal, "SIGTERM") and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None,
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_unconfigure(config):
    _stop_live_clusters()


def _controller_params():
    try:
        return [pytest.param(k, id=k) for k in harness.selected_controllers()]
    except ValueError as e:
        # Reported by every test that needs a controller, without breaking collection.
        return [pytest.param(f"invalid: {e}", id="invalid-PXF_CONTROLLERS")]


def _start(kind: str, workdir: Path, n_engines: int) -> harness.Cluster:
    c = harness.Cluster(kind, workdir, n_engines)
    _LIVE.add(c)
    problem = None
    try:
        c.start()
    except harness.HarnessError as e:
        problem = str(e)
    except BaseException:
        _LIVE.discard(c)
        raise
    if problem:
        _LIVE.discard(c)
        pytest.fail(problem, pytrace=False)
    return c


def _stop(c: harness.Cluster) -> None:
    try:
        c.stop()
    finally:
        _LIVE.discard(c)


@pytest.fixture(scope="session", params=_controller_params())
def controller_kind(request) -> str:
    """The controller under test: "stock" or "pxfabric"."""
    kind = request.param
    if kind.startswith("invalid"):
        pytest.fail(kind, pytrace=False)
    problem = None
    try:
        harness.controller_command(kind)
    except harness.HarnessError as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    return kind


@pytest.fixture(scope="module")
def cluster(controller_kind, request, tmp_path_factory) -> harness.Cluster:
    """A controller plus ``ENGINES`` (module attribute, default 4) stock engines, per module."""
    n = getattr(request.module, "ENGINES", 4)
    workdir = tmp_path_factory.mktemp(f"{controller_kind}-{request.module.__name__}")
    c = _start(controller_kind, workdir, n)
    yield c
    _stop(c)


@pytest.fixture
def rc(cluster):
    """A new client of the module's cluster, closed afterwards."""
    client = cluster.client()
    yield client
    cluster.close_client(client)


@pytest.fixture
def make_cluster(controller_kind, tmp_path):
    """Factory for function-scoped clusters: ``make_cluster(n_engines)``; all stopped afterwards."""
    made = []

    def make(n_engines: int = 2) -> harness.Cluster:
        c = _start(controller_kind, tmp_path / f"cluster{len(made)}", n_engines)
        made.append(c)
        return c

    yield make
    for c in made:
        _stop(c)
