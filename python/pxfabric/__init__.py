"""pxfabric: an MPI engine fabric for the stock ipyparallel client.

This package holds the Python side of pxfabric. :mod:`pxfabric.engine` is the engine runtime
that every MPI rank's embedded interpreter imports to execute ``apply_request`` and
``execute_request`` exactly as a stock ipyparallel engine does.
"""

__version__ = "0.1.0"
