"""Where a rank's main thread is: the engine side of stuck-rank reports and ``pxcluster where``.

A rank runs user code on its main thread. When that thread is blocked inside MPI (a collective
the other ranks never join, a ``recv`` nobody sends to), an interrupt cannot free it: SIGINT
becomes ``KeyboardInterrupt`` only when the thread runs Python again. mpi4py releases the GIL
around blocking calls, so pxengine's watch thread (mpi/rank_watch.cpp) can take the GIL and read
the main thread's frames here (``sys._current_frames``). It calls :func:`publish_report` when an
interrupt has not returned the rank to Python within the grace period, and :func:`where_state`
for every ``pxf_where_request`` (both through :mod:`pxfabric.host`). (When the main thread
holds the GIL in native code, rank_watch.cpp answers without Python, from a faulthandler dump.)

Imported only when a report is due, never at engine start-up: standard library only.
"""

from __future__ import annotations

import ast
import linecache
import os
import re
import sys
from typing import List, Optional

#: Frames shown in a report (innermost ones; the engine's own frames are never shown).
MAX_FRAMES = 6

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CELL = re.compile(r"^<ipython-input-(\d+)-[0-9a-f]+>$")
_CALL_OPS = ("CALL", "PRECALL", "CALL_FUNCTION", "CALL_FUNCTION_EX", "CALL_METHOD",
             "CALL_FUNCTION_KW")


#: mpi4py's classes whose blocking methods a rank can hang in.
_MPI_CLASSES = {"Comm", "Intracomm", "Intercomm", "Cartcomm", "Graphcomm", "Distgraphcomm",
                "Topocomm", "Request", "Prequest", "Grequest", "Win", "File", "Message"}


def _internal_dirs() -> List[str]:
    """Directories of the engine machinery whose frames a user does not want to see."""
    dirs = [_PACKAGE_DIR]
    for name in ("IPython", "ipykernel", "ipyparallel", "traitlets"):
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)))
    return [d + os.sep for d in dirs]


def _is_internal(frame, internal: List[str]) -> bool:
    code = frame.f_code
    fn = code.co_filename
    if frame.f_globals.get("__name__") == "pxfabric.host":  # pyhost.cpp's bridge
        return True
    if fn == "<string>" and code.co_name == "<module>":
        # The apply call template "_<msg_id>_result = _<msg_id>_f(*...)" (engine.py).
        return bool(code.co_names) and code.co_names[0].endswith("_f")
    return any(fn.startswith(d) for d in internal)


def display_file(filename: str, cells: Optional[dict] = None) -> str:
    """A cell's file as IPython's tracebacks name it (``cell In[3]``), other files as they
    are. ``cells``: the shell compiler's file name -> execution count map."""
    number = (cells or {}).get(filename)
    if number is not None:
        return f"cell In[{number}]"
    m = _CELL.match(filename)
    if m:
        return f"cell In[{m.group(1)}]"
    return filename


def _cell_names(rt) -> dict:
    """File name -> execution count of the cells the engine's shell compiled (IPython 8)."""
    try:
        return dict(getattr(rt.shell.compile, "_filename_map", None) or {})
    except Exception:
        return {}


def user_frames(frame) -> list:
    """The main thread's frames from the outermost user frame in, engine machinery dropped."""
    internal = _internal_dirs()
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return [f for f in frames if not _is_internal(f, internal)]


def _source_segment(frame) -> Optional[str]:
    """The source of the expression the frame's current instruction belongs to."""
    code = frame.f_code
    lasti = frame.f_lasti
    if lasti < 0:
        return None
    try:
        positions = list(code.co_positions())
    except AttributeError:  # Python < 3.11
        return None
    index = lasti // 2
    if index >= len(positions):
        return None
    start, end, col, end_col = positions[index]
    if start is None or end is None or col is None or end_col is None:
        return None
    lines = [linecache.getline(code.co_filename, n, frame.f_globals) for n in range(start, end + 1)]
    if not any(lines):
        return None
    if start == end:
        return lines[0].encode("utf8")[col:end_col].decode("utf8", "replace")
    lines[0] = lines[0].encode("utf8")[col:].decode("utf8", "replace")
    lines[-1] = lines[-1].encode("utf8")[:end_col].decode("utf8", "replace")
    return "".join(lines)


def _is_calling(frame) -> bool:
    """Whether the frame's current instruction is a call (so it waits for what it called)."""
    import dis

    code = frame.f_code
    lasti = frame.f_lasti
    raw = code.co_code
    if lasti < 0 or lasti >= len(raw):
        return False
    return dis.opname[raw[lasti]] in _CALL_OPS


def _lookup_static(frame, chain: List[str]):
    """``a.b.c`` resolved in the frame without running user code (no properties, no
    ``__getattr__``): the receiver of a blocked call. Raises LookupError/AttributeError."""
    import inspect

    name = chain[0]
    # f_locals of a function frame is a snapshot; a cell's frame uses its globals dict.
    for scope in (frame.f_locals, frame.f_globals, frame.f_builtins):
        if name in scope:
            obj = scope[name]
            break
    else:
        raise LookupError(name)
    for attr in chain[1:]:
        obj = inspect.getattr_static(obj, attr)
    return obj


def _dotted(node) -> Optional[List[str]]:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
        return names[::-1]
    return None


def call_name(frame) -> Optional[str]:
    """What the frame is calling, as the user would name it: ``Comm.Barrier`` for
    ``MPI.COMM_WORLD.Barrier()`` (the class that defines the method), ``time.sleep``,
    ``f``. None when the frame is not in a call or the source is not available."""
    if not _is_calling(frame):
        return None
    segment = _source_segment(frame)
    if not segment:
        return None
    try:
        tree = ast.parse(segment.strip(), mode="eval")
    except SyntaxError:
        return None
    node = tree.body
    if not isinstance(node, ast.Call):
        return None
    chain = _dotted(node.func)
    if chain is None:
        return ast.unparse(node.func) if hasattr(ast, "unparse") else None
    if len(chain) == 1:
        return chain[0]
    method = chain[-1]
    try:
        owner = _lookup_static(frame, chain[:-1])
    except Exception:
        return ".".join(chain)
    if isinstance(owner, type(sys)):
        return f"{owner.__name__}.{method}"
    for cls in type(owner).__mro__:
        if method in vars(cls):
            return f"{cls.__name__}.{method}"
    return f"{type(owner).__name__}.{method}"


def describe_frame(frame, cells: Optional[dict] = None) -> dict:
    code = frame.f_code
    return {
        "file": display_file(code.co_filename, cells),
        "line": frame.f_lineno,
        "function": code.co_name,
        "code": linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals).strip(),
    }


def main_thread_state(rt) -> dict:
    """``where`` (one phrase) and ``frames`` (outermost first) of the runtime's main thread."""
    frame = sys._current_frames().get(rt._main_ident)
    frames = user_frames(frame) if frame is not None else []
    if not frames:
        return {"where": "in the engine, outside user code", "frames": [], "call": None}
    cells = _cell_names(rt)
    top = frames[-1]
    info = describe_frame(top, cells)
    call = call_name(top)
    at = f"at {info['file']} line {info['line']}"
    if top.f_code.co_name != "<module>":
        at += f" in {top.f_code.co_name}"
    where = f"in `{call}` {at}" if call else at
    return {"where": where, "call": call,
            "frames": [describe_frame(f, cells) for f in frames[-MAX_FRAMES:]]}


def where_state(rt, info: dict) -> dict:
    """The content of a ``pxf_where_reply`` for a busy rank: ``info`` (rank, engine id, what
    runs since when, from rank_watch.cpp) plus where the main thread is."""
    out = dict(info)
    out.update(main_thread_state(rt))
    out["gil"] = "free"
    return out


def format_frames(frames: List[dict]) -> str:
    lines = ["Python stack (most recent call last):"]
    for f in frames:
        lines.append(f"  {f['file']}, line {f['line']}, in {f['function']}")
        if f.get("code"):
            lines.append(f"    {f['code']}")
    return "\n".join(lines)


def report_text(info: dict, state: dict) -> str:
    """The stuck-rank report: where, the last frames, what to do next."""
    waited = info.get("interrupted_for") or info.get("grace") or 0
    head = (f"[pxfabric] rank {info['rank']} (engine {info['engine_id']}) did not return to Python "
            f"{waited:.0f} s after the interrupt: it is stuck {state['where']}.")
    parts = [head]
    if state["frames"]:
        parts.append(format_frames(state["frames"]))
    call = state.get("call") or ""
    owner, _, method = call.rpartition(".")
    if owner not in _MPI_CLASSES:
        why = ("It is still running this request: the interrupt lands only when the rank "
               "runs Python again.")
    elif method.lower().lstrip("im").startswith(("recv", "probe", "wait", "sendrecv")):
        why = ("A rank blocked in MPI cannot be interrupted: did no rank send the message it "
               "waits for?")
    else:
        why = ("A rank blocked in MPI cannot be interrupted: did the other ranks never join "
               "this collective?")
    parts.append(why + " `pxcluster where` shows every rank; `pxcluster restart` recovers "
                       "with the same engine ids.")
    return "\n".join(parts) + "\n"


def publish_report(rt, info: dict, parent: dict) -> None:
    """Publish the report on the rank's stderr, parented to the stuck request (the client
    shows it in ``ar.stderr`` and in ``%px`` output of that rank)."""
    text = report_text(info, main_thread_state(rt))
    rt._publish("stream", {"name": "stderr", "text": text}, parent, dict(rt._engine_md), [],
                rt._topics["stderr"])
