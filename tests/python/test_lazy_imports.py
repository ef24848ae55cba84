"""Deferred package inits (pxfabric/_lazy.py): a rank starts without the heavy imports, and
user code still sees complete packages.

Each case runs in a fresh /usr/bin/python3 (the deferral changes sys.modules for good)."""

import os
import subprocess
import textwrap
from pathlib import Path

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"

PRELUDE = f"""
import sys
sys.path.insert(0, {str(PYTHON_DIR)!r})
from pxfabric import _lazy
_lazy.prepare_engine()
import pxfabric.engine
import pxfabric.host
"""


def run(body: str, **env) -> str:
    code = PRELUDE + textwrap.dedent(body)
    e = dict(os.environ, **env)
    if "PXF_EAGER_IMPORTS" not in env:
        e.pop("PXF_EAGER_IMPORTS", None)
    p = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, timeout=60, env=e)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_engine_import_skips_heavy_packages():
    out = run("""
        heavy = ["distutils", "setuptools", "prompt_toolkit", "IPython.terminal", "ipyparallel.client",
                 "ipyparallel.cluster", "jupyter_client.manager", "jedi"]
        print(sorted(m for m in heavy if m in sys.modules))
        print(sorted(k for k, v in _lazy.completed.items() if v))
    """)
    loaded, completed = out.splitlines()
    assert loaded == "[]"
    assert completed == "[]"


def test_eager_switch_turns_deferral_off():
    out = run("""
        print(sorted(_lazy.completed), "ipyparallel.client" in sys.modules)
    """, PXF_EAGER_IMPORTS="1")
    assert out.strip() == "[] True"


def test_user_code_sees_complete_packages():
    out = run("""
        import ipyparallel as ipp
        print(ipp.Client.__name__, ipp.Reference.__name__, ipp.__version__ == ipp._version.__version__)
        ns = {}
        exec("from ipyparallel import *", ns)
        print("Client" in ns, "interactive" in ns, "RemoteError" in ns)
        import IPython
        print(isinstance(IPython.__version__, str), IPython.embed.__name__)
        from IPython import get_ipython, display
        print(get_ipython() is None, display.__name__)
        import jupyter_client
        print(jupyter_client.KernelManager.__name__)
        print(sorted(k for k, v in _lazy.completed.items() if v))
    """)
    assert out.splitlines() == [
        "Client Reference True",
        "True True True",
        "True embed",
        "True IPython.display",
        "KernelManager",
        "['IPython', 'ipyparallel', 'jupyter_client']",
    ]


def test_missing_names_still_raise_attribute_error():
    out = run("""
        import ipyparallel
        for name in ("__wrapped__", "no_such_name"):
            try:
                getattr(ipyparallel, name)
            except AttributeError as e:
                print("AttributeError", name)
    """)
    assert out.splitlines() == ["AttributeError __wrapped__", "AttributeError no_such_name"]


def test_dependent_functions_are_canned_once_their_module_exists():
    out = run("""
        from ipyparallel.serialize import canning, can, uncan
        print(any(isinstance(k, str) and "dependent" in k for k in canning.can_map))
        import ipyparallel as ipp
        @ipp.depend(lambda: True)
        def f():
            return 7
        c = can(f)
        print(type(c).__name__, type(uncan(c)).__name__, uncan(c)())
    """)
    assert out.splitlines() == ["False", "CannedObject dependent 7"]


def test_numpy_is_not_imported_by_canning_until_user_code_imports_it():
    out = run("""
        from ipyparallel.serialize import canning, can, uncan, serialize_object
        serialize_object(len)  # what the first apply does with its result
        print("numpy" in sys.modules, any(isinstance(k, str) for k in canning.can_map))
        import numpy as np
        a = np.arange(10000.0)  # over the 1 kB threshold: sent as its own buffer
        c = can(a)
        bufs = serialize_object(a)
        print(type(c).__name__, len(bufs), bytes(bufs[-1]) == a.tobytes(), uncan(c).sum())
    """)
    assert out.splitlines() == ["False False", "CannedArray 2 True 49995000.0"]


def test_shell_completer_is_created_on_first_use():
    out = run("""
        import tempfile, os
        os.environ["IPYTHONDIR"] = tempfile.mkdtemp()
        rt = pxfabric.engine.EngineRuntime(0, "u", lambda *a, **k: None, install_streams=False)
        sh = rt.shell
        before = "jedi" in sys.modules or "IPython.core.completer" in sys.modules
        c = sh.Completer
        print(type(sh).__name__, before, type(c).__name__, c in sh.configurables, sh.Completer is c)
        sh.user_ns["zq_value"] = 1
        print(sh.complete("zq_v", "zq_v", 4)[0])
    """)
    assert out.splitlines() == ["ZMQInteractiveShell False IPCompleter True True", "zq_v"]
