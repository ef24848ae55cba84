"""pxfabric: an MPI engine fabric for the stock ipyparallel client.

This package holds the Python side of pxfabric. :mod:`pxfabric.engine` is the engine runtime
that every MPI rank's embedded interpreter imports to execute ``apply_request`` and
``execute_request`` exactly as a stock ipyparallel engine does.
"""

__version__ = "0.1.0"


def load_ipython_extension(ip):
    """``%load_ext pxfabric`` in a client's IPython: adds ``%pxg``/``%%pxg`` (``%px`` with
    each distinct output shown once with its ranks; see :mod:`pxfabric.magics`).

    The imports are here, not at the top: every rank imports this package at start-up and
    must not pull in IPython's magics or the ipyparallel client."""
    from .magics import GroupedParallelMagics

    ip.register_magics(GroupedParallelMagics(ip))


def __getattr__(name):
    # pxfabric.show_grouped without importing pxfabric.grouped until it is used.
    if name == "show_grouped":
        from .grouped import show_grouped

        return show_grouped
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
