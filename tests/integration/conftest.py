"""Fixtures for the controller integration tests (tests/integration/test_controller_*.py).

Everything here is opt-in: a test gets a cluster only by asking for one of these fixtures, so
other test files in this folder are unaffected.

* ``setup_kind`` -- parametrised over (controller, engines) pairs: ``$PXF_CONTROLLERS`` (comma
  list of ``pxfabric``, ``stock``; default both) times ``$PXF_ENGINES`` (``ipengine``, ``mpi``;
  default both), without (stock, mpi): MPI pxengines need pxcontroller. Test ids are
  ``pxfabric-ipengine``, ``stock-ipengine``, ``pxfabric-mpi``. ``controller_kind`` and
  ``engine_kind`` are its halves. Selecting ``pxfabric`` without ``build/bin/pxcontroller``
  makes every test that uses it fail with a message saying so; ``$PXF_PXCONTROLLER`` and
  ``$PXF_PXENGINE`` point at other binaries.
* ``cluster`` -- module-scoped controller + N engines (``ENGINES = N`` at module level,
  default 4): N stock engines, or one MPI job of N pxengine ranks.
* ``rc`` -- a fresh ``ipyparallel.Client`` of ``cluster`` per test.
* ``make_cluster`` -- function-scoped factory for destructive tests (kill, shutdown):
  ``make_cluster(n, jobs=(sizes...))``; ``jobs`` splits MPI engines into several jobs.
* ``hosts`` -- module-scoped "real hosts on one machine" (``hosts.py``): nodes ``HOSTS``
  (module attribute, default ``("nodeA", "nodeB")``) as network namespaces with their own
  hostname, /etc/hosts and sshd; skipped with the reason where namespaces cannot be made.
* ``slurm`` -- module-scoped private Slurm (``slurm.py``): single-node on this machine, or on
  namespaced hosts when the module sets ``SLURM_NODES = ("nodeA", "nodeB")`` (extra
  partitions: ``SLURM_PARTITIONS = {name: options}``);
  ``slurm_two_nodes`` -- always on nodeA + nodeB. Skipped with the reason where Slurm cannot
  run (not root, not installed, munged does not start).
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
    _stop_live_slurms()
    _stop_live_hosts()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def pytest_configure(config):
    if hasattr(signal, "SIGTERM") and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None,
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_unconfigure(config):
    _stop_live_clusters()
    _stop_live_slurms()
    _stop_live_hosts()


def _setup_params():
    try:
        return [pytest.param(pair, id=f"{pair[0]}-{pair[1]}")
                for pair in harness.selected_setups()]
    except ValueError as e:
        # Reported by every test that needs a controller, without breaking collection.
        return [pytest.param(("invalid", str(e)), id="invalid-PXF_CONTROLLERS-or-PXF_ENGINES")]


def _start(setup: tuple, workdir: Path, n_engines: int, jobs=None, args=()) -> harness.Cluster:
    kind, engine_kind = setup
    c = harness.Cluster(kind, workdir, n_engines, engine_kind=engine_kind, jobs=jobs,
                        extra_args=args)
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


@pytest.fixture(scope="session", params=_setup_params())
def setup_kind(request) -> tuple:
    """(controller, engines) under test: ("pxfabric"|"stock", "ipengine"|"mpi")."""
    kind, engine_kind = request.param
    if kind == "invalid":
        pytest.fail(engine_kind, pytrace=False)
    problem = None
    try:
        harness.controller_command(kind)
        if engine_kind == "mpi":
            harness.mpi_engine_command(Path("."), 1)
    except harness.HarnessError as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    return request.param


@pytest.fixture(scope="session")
def controller_kind(setup_kind) -> str:
    """The controller under test: "stock" or "pxfabric"."""
    return setup_kind[0]


@pytest.fixture(scope="session")
def engine_kind(setup_kind) -> str:
    """The engines under test: "ipengine" (stock) or "mpi" (pxengine ranks)."""
    return setup_kind[1]


@pytest.fixture(scope="module")
def cluster(setup_kind, request, tmp_path_factory) -> harness.Cluster:
    """A controller plus ``ENGINES`` (module attribute, default 4) engines, per module;
    ``CONTROLLER_ARGS`` (module attribute) are extra controller options, the same for both kinds."""
    n = getattr(request.module, "ENGINES", 4)
    workdir = tmp_path_factory.mktemp(f"{'-'.join(setup_kind)}-{request.module.__name__}")
    c = _start(setup_kind, workdir, n, args=getattr(request.module, "CONTROLLER_ARGS", ()))
    yield c
    _stop(c)


@pytest.fixture
def rc(cluster):
    """A new client of the module's cluster, closed afterwards."""
    client = cluster.client()
    yield client
    cluster.close_client(client)


@pytest.fixture
def make_cluster(setup_kind, tmp_path):
    """Factory for function-scoped clusters: ``make_cluster(n_engines, jobs=None, args=())``;
    all stopped afterwards. ``jobs`` (MPI engines only) gives the sizes of the MPI jobs;
    ``args`` are extra controller options (given to either kind alike)."""
    made = []

    def make(n_engines: int = 2, jobs=None, args=()) -> harness.Cluster:
        if setup_kind[1] != "mpi":
            jobs = None
        c = _start(setup_kind, tmp_path / f"cluster{len(made)}", n_engines, jobs, args)
        made.append(c)
        return c

    yield make
    for c in made:
        _stop(c)


# --- "real hosts on one machine" (hosts.py): network namespaces with hostname, /etc/hosts, sshd

import hosts as _netns_hosts  # noqa: E402  (not ``hosts``: the fixture below takes that name)
import slurm as _private_slurm  # noqa: E402  (not ``slurm``: the fixture below takes that name)


def _stop_live_hosts() -> None:
    # Every Hosts not closed yet, half-built ones included (SIGTERM, end of session).
    _netns_hosts.close_all()


@pytest.fixture(scope="module")
def hosts(request) -> "_netns_hosts.Hosts":
    """Nodes ``HOSTS`` (module attribute, default ``("nodeA", "nodeB")``) as network
    namespaces on a private LAN (10.200.0.1, .2, ...), each with its hostname, /etc/hosts
    and sshd; closed at the end of the module. Skips (with the reason) where namespaces
    cannot be made."""
    names = tuple(getattr(request.module, "HOSTS", ("nodeA", "nodeB")))
    problem = skip = None
    try:
        h = _netns_hosts.make_hosts(names)
    except _netns_hosts.HostsUnavailable as e:
        skip = f"namespaced hosts unavailable: {e}"
    except _netns_hosts.HostsError as e:
        problem = f"namespaced hosts could not be set up: {e}"
    if skip:
        pytest.skip(skip)
    if problem:
        pytest.fail(problem, pytrace=False)
    yield h
    h.close()


# --- a private Slurm (slurm.py): munged + slurmctld + slurmd(s), config and state in a temp dir

def _stop_live_slurms() -> None:
    # Before the hosts: a two-node Slurm's daemons live in its hosts' namespaces.
    _private_slurm.close_all()


def _start_slurm(nodes, partitions=None) -> "_private_slurm.Slurm":
    problem = skip = None
    try:
        s = _private_slurm.make_slurm(nodes=nodes, partitions=partitions)
    except _private_slurm.SlurmUnavailable as e:
        skip = f"Slurm unavailable: {e}"
    except _private_slurm.SlurmError as e:
        problem = f"Slurm could not be set up: {e}"
    if skip:
        pytest.skip(skip)
    if problem:
        pytest.fail(problem, pytrace=False)
    return s


@pytest.fixture(scope="module")
def slurm(request) -> "_private_slurm.Slurm":
    """A private Slurm per module: single-node on this machine, or on the namespaced hosts
    ``SLURM_NODES`` (module attribute) with client commands on the first one
    (``slurm.run``); ``SLURM_PARTITIONS`` (module attribute, name -> options) adds partitions
    next to ``debug`` and ``short``. Every job cancelled and every daemon stopped at the end
    of the module."""
    s = _start_slurm(getattr(request.module, "SLURM_NODES", None),
                     getattr(request.module, "SLURM_PARTITIONS", None))
    yield s
    s.close()


@pytest.fixture(scope="module")
def slurm_two_nodes() -> "_private_slurm.Slurm":
    """A private Slurm on namespaced hosts nodeA (slurmctld + slurmd) and nodeB (slurmd)."""
    s = _start_slurm(("nodeA", "nodeB"))
    yield s
    s.close()
