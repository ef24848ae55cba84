"""Fixtures for the engine-runtime tests.

``cluster`` is one stock controller (``--ping=250``) with two pyengines (ids 0 and 1) and one
stock ``ipengine`` for side-by-side comparisons; it is shared by the whole session and torn
down by PID.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "python"))
sys.path.insert(0, str(HERE))

from harness import Cluster, engine_id_for  # noqa: E402

DEFAULT_TIMEOUT = 120


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


class ClusterInfo:
    def __init__(self, cluster: Cluster, client, py_uuids, stock_uuid):
        self.cluster = cluster
        self.client = client
        self.py_uuids = py_uuids
        self.py_ids = [engine_id_for(client, u) for u in py_uuids]
        self.stock_uuid = stock_uuid
        self.stock_id = engine_id_for(client, stock_uuid)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    import ipyparallel as ipp

    cl = Cluster(tmp_path_factory.mktemp("cluster"))
    client = None
    try:
        cl.start_controller()
        py_uuids = [cl.start_pyengine(0), cl.start_pyengine(1)]
        cl.start_stock_engine()
        client = ipp.Client(str(cl.client_file), timeout=30)
        cl.wait_for_engines(client, py_uuids, 3)
        stock_uuid = next(u for u in client._engines.values() if u not in py_uuids)
        yield ClusterInfo(cl, client, py_uuids, stock_uuid)
    finally:
        if client is not None:
            client.close()
        cl.stop()


@pytest.fixture
def rc(cluster):
    return cluster.client


@pytest.fixture
def dv(cluster):
    """DirectView on the two pyengines (blocking)."""
    view = cluster.client[cluster.py_ids]
    view.block = True
    return view
