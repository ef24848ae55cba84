"""Deferred package ``__init__``s: a rank imports only the submodules it uses.

An engine needs ``ipyparallel.serialize``, ``ipyparallel.error``, ``IPython.core`` and
``jupyter_client.session``. Importing them the normal way runs their packages' ``__init__``
first, and those pull in the whole client, the cluster launchers, ``distutils``/``setuptools``,
the terminal IPython (``prompt_toolkit``) and ``jupyter_client``'s asyncio clients: about 0.3 s
of CPU per rank, which on an oversubscribed node is most of a job's start-up.

:func:`defer` puts the package in ``sys.modules`` without running its ``__init__``. Submodule
imports work as usual (``import ipyparallel.serialize`` loads just that subpackage). The first
time anything reads a name the ``__init__`` would have defined (``ipp.Client``,
``from IPython import embed``, ``from ipyparallel import *``), the real ``__init__`` runs in
the same module object, so user code sees the complete package. A few names that the
packages' own submodules import from the top level during start-up are served from where
they are defined (``LIGHT``) so they do not force the full import.

``PXF_EAGER_IMPORTS=1`` turns this off (every package imports normally).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, Tuple

# package -> {name: (module it lives in, attribute)}: names the package's own submodules import
# from the top level while an engine starts.
LIGHT: Dict[str, Dict[str, Tuple[str, str]]] = {
    "IPython": {
        "get_ipython": ("IPython.core.getipython", "get_ipython"),
        "version_info": ("IPython.core.release", "version_info"),
    },
    "jupyter_client": {
        "protocol_version": ("jupyter_client._version", "protocol_version"),
        "protocol_version_info": ("jupyter_client._version", "protocol_version_info"),
        "version_info": ("jupyter_client._version", "version_info"),
        "__version__": ("jupyter_client._version", "__version__"),
        # ipykernel/connect.py, imported by ipykernel/__init__
        "write_connection_file": ("jupyter_client.connect", "write_connection_file"),
    },
    "ipyparallel": {
        "__version__": ("ipyparallel._version", "__version__"),
        "version_info": ("ipyparallel._version", "version_info"),
    },
}

# Dunders that tools probe on arbitrary modules; any other missing name (``__version__``,
# ``__all__``...) runs the real ``__init__``.
_PROBES = frozenset({
    "__wrapped__", "__warningregistry__", "__builtins__", "__cached__", "__test__",
    "__origin__", "__mro_entries__", "__length_hint__", "__class_getitem__", "__signature__",
    "__text_signature__", "__qualname__", "__annotations__", "__code__", "__func__", "__self__",
})

_lock = threading.RLock()
completed: Dict[str, bool] = {}  # package -> whether its real __init__ has run (for tests)


def defer(name: str) -> bool:
    """Register package ``name`` with its ``__init__`` deferred. False if already imported
    or not found (nothing changes then)."""
    if os.environ.get("PXF_EAGER_IMPORTS") == "1" or name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    mod = importlib.util.module_from_spec(spec)
    light = LIGHT.get(name, {})

    def complete() -> None:
        with _lock:
            if completed.get(name):
                return
            completed[name] = True
            mod.__dict__.pop("__getattr__", None)
            spec.loader.exec_module(mod)  # type: ignore[union-attr]

    def __getattr__(attr: str):
        if attr in light and not completed.get(name):
            where, what = light[attr]
            value = getattr(importlib.import_module(where), what)
            setattr(mod, attr, value)
            return value
        if attr in _PROBES:
            # introspection of every module (inspect, doctest, pickle): not a reason to import it all
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        if not completed.get(name):
            # `from pkg import submodule` asks here first; import just the submodule then.
            try:
                sub = importlib.util.find_spec(f"{name}.{attr}")
            except (ImportError, ValueError):
                sub = None
            if sub is not None:
                return importlib.import_module(f"{name}.{attr}")
            complete()
        try:
            return mod.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
    completed[name] = False
    sys.modules[name] = mod
    return True


def defer_engine_packages() -> None:
    """What a pxengine rank defers before importing its runtime."""
    for name in ("ipyparallel", "IPython", "jupyter_client"):
        defer(name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after module ``name`` is first imported (by anyone)."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; the normal finders do the finding
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        then = self.then

        def exec_then(module: ModuleType) -> None:
            exec_module(module)
            then(module)

        spec.loader.exec_module = exec_then  # type: ignore[method-assign]  # this spec's loader only
        return spec


def after_import(name: str, then: Callable[[ModuleType], None]) -> None:
    """Call ``then(module)`` once ``name`` is imported: now if it already is, else right after."""
    if name in sys.modules:
        then(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


# Canning-map entries named by a string, resolved by the first can() (ipyparallel imports every
# string key then): key -> (module whose import defines the class, attribute of that module).
DEFERRED_CANNING = {
    # the whole client: 0.1 s of CPU
    "ipyparallel.dependent": ("ipyparallel.controller.dependency", "dependent"),
    # numpy: 0.13 s of CPU on the first apply of a rank whose user code never imported it
    "numpy.ndarray": ("numpy", "ndarray"),
}


def _defer_canning_imports() -> None:
    # Only an instance of a key's class needs its entry, and no instance can exist before the
    # class's module is imported: add each entry (as the class, as ipyparallel's own import of
    # the string would) when its module is imported.
    from ipyparallel.serialize import canning

    for key, (module_name, attr) in DEFERRED_CANNING.items():
        if key not in canning.can_map:
            continue
        canner = canning.can_map.pop(key)
        canning._original_can_map.pop(key, None)

        def add(module: ModuleType, canner=canner, attr=attr) -> None:
            cls = getattr(module, attr)
            canning.can_map[cls] = canner
            canning._original_can_map[cls] = canner

        after_import(module_name, add)


def prepare_engine() -> None:
    """Before a rank imports :mod:`pxfabric.engine`: defer the heavy package inits, and keep
    what importing ``ipyparallel.client`` does to ``jupyter_client`` in a stock engine
    (messages' dates stay strings)."""
    defer_engine_packages()
    import jupyter_client.session

    jupyter_client.session.extract_dates = lambda obj: obj
    if completed.get("ipyparallel") is False:
        _defer_canning_imports()
