"""Output of many ranks, each distinct output once with the ranks that produced it.

Stock ``AsyncResult.display_outputs`` prints one block per engine: 64 ranks printing the same
line give 64 ``[stdout:N]`` blocks. Here identical outputs collapse into one block labelled with
the engine ids as compressed ranges (``[stdout:0-6,8-63] 6``, then ``[stdout:7] 7``), for
stdout, stderr, display data (compared by their whole mime bundle), execute results
(``Out[0-3:5]: 15``) and errors (``[0-15:execute]: ZeroDivisionError ...`` plus the traceback
once).

Order: stdout groups, stderr groups, display data, results, errors (stock's order, errors last
as IPython shows them after the outputs); within a kind, groups in order of their first engine.
Within a block the formats are stock's (``_display_stream``, ``ExecuteReply._plaintext``,
``CompositeError.render_traceback``), except that a one-line text stays on the label's line.

Everything but :func:`show_grouped` is a pure function of plain data (:class:`EngineOutput`),
so the grouping is unit-testable without a cluster; :func:`outputs_of` reads an
``AsyncResult`` (duck-typed: this module imports neither IPython nor ipyparallel at import time,
the engine imports ``pxfabric`` and must stay light).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

# Tracebacks drawn in full before the remaining distinct errors get one line each (stock's
# CompositeError draws 4 and counts the rest).
TB_LIMIT = 4


@dataclass(frozen=True)
class ErrorInfo:
    """One engine's exception: what ``RemoteError`` carries, and the request kind."""
    ename: str
    evalue: str
    traceback: str = ""
    method: str = "execute"


@dataclass(frozen=True)
class EngineOutput:
    """Everything one engine produced for one request.

    ``outputs`` are display_data contents (``{"data": {mime: ...}, "metadata": {...}}``);
    ``execute_result`` is the execute_result content (``data``, ``metadata``,
    ``execution_count``) or None."""
    engine_id: int
    stdout: str = ""
    stderr: str = ""
    outputs: Tuple[dict, ...] = ()
    execute_result: Optional[dict] = None
    error: Optional[ErrorInfo] = None


@dataclass(frozen=True)
class Group:
    """One distinct value and the engines that produced it (ascending)."""
    ids: Tuple[int, ...]
    value: Any

    @property
    def ranges(self) -> str:
        return format_ranges(self.ids)


@dataclass
class Grouped:
    """The groups of one request's outputs, kind by kind."""
    stdout: List[Group] = field(default_factory=list)
    stderr: List[Group] = field(default_factory=list)
    displays: List[Group] = field(default_factory=list)
    results: List[Group] = field(default_factory=list)
    errors: List[Group] = field(default_factory=list)


def format_ranges(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``: consecutive ids as one range, ascending."""
    ordered = sorted(set(ids))
    parts = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_ranges(text: str) -> List[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``: the inverse of :func:`format_ranges` (``%%pxg
    --targets 0-3``). Raises ValueError naming the part it cannot read."""
    ids: List[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(f"cannot read engine ids {part!r} in {text!r}: expected N or N-M, "
                             "separated by commas") from None
        if first < 0 or last < first:
            raise ValueError(f"engine id range {part!r} in {text!r} is empty or negative")
        ids.extend(range(first, last + 1))
    return sorted(set(ids))


def mime_key(bundle: Any) -> Hashable:
    """A hashable stand-in for a mime bundle (or any JSON-like value), equal for equal bundles
    whatever their key order."""
    try:
        return json.dumps(bundle, sort_keys=True, default=repr)
    except (TypeError, ValueError):  # keys that are not strings, cycles
        return repr(bundle)


def group_values(pairs: Iterable[Tuple[int, Any]],
                 key: Callable[[Any], Hashable] = lambda v: v) -> List[Group]:
    """Group ``(engine_id, value)`` pairs by ``key(value)``; groups in order of their first
    engine id, each holding its ids ascending (an id once even if it gave the value twice)."""
    groups: Dict[Hashable, Tuple[List[int], Any]] = {}
    for eid, value in sorted(pairs, key=lambda p: p[0]):
        ids, _ = groups.setdefault(key(value), ([], value))
        if not ids or ids[-1] != eid:
            ids.append(eid)
    return [Group(tuple(ids), value) for ids, value in groups.values()]


def _result_key(result: dict) -> Hashable:
    # Same value and same execution count: "Out[0-3:5]" must be true for every id it names.
    return (mime_key(result.get("data", {})), result.get("execution_count"))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CELL_NUMBER = re.compile(r"\bIn ?\[\d+\]")


def error_key(error: ErrorInfo) -> Hashable:
    """Errors are the same if they differ at most in colours and in the cell number their
    traceback names (``Cell In [5]``): ranks that ran one more cell than the others (a
    ``--targets`` cell) still raise "the same" error. The group shows its first engine's
    traceback."""
    tb = _CELL_NUMBER.sub("In []", _ANSI.sub("", error.traceback))
    return (error.ename, error.evalue, error.method, tb)


def group_outputs(records: Iterable[EngineOutput]) -> Grouped:
    """Group each kind of output across engines; empty streams and missing results are
    left out (a rank that printed nothing is in no stdout group)."""
    records = list(records)
    return Grouped(
        stdout=group_values((r.engine_id, r.stdout) for r in records if r.stdout),
        stderr=group_values((r.engine_id, r.stderr) for r in records if r.stderr),
        displays=group_values(((r.engine_id, o) for r in records for o in r.outputs),
                              key=lambda o: mime_key(o.get("data", {}))),
        results=group_values(((r.engine_id, r.execute_result) for r in records
                              if r.execute_result is not None), key=_result_key),
        errors=group_values(((r.engine_id, r.error) for r in records if r.error is not None),
                            key=error_key),
    )


# --- text rendering (the terminal form; show_grouped republishes rich data through IPython)

def stream_block(label: str, text: str) -> str:
    """``[stdout:0-3] hello`` for one line, else the label alone on its line (as stock) and
    the text below it; always ends with a newline."""
    if not text.endswith("\n"):
        text += "\n"
    if "\n" in text[:-1]:
        return f"{label}\n{text}"
    return f"{label} {text}"


def result_label(group: Group) -> str:
    """``Out[0-3:5]: `` (stock's ``Out[engine:count]: ``)."""
    return f"Out[{group.ranges}:{group.value.get('execution_count')}]: "


def result_text(group: Group) -> str:
    """The plain-text form of a result group, laid out as stock's ``ExecuteReply``."""
    text = group.value.get("data", {}).get("text/plain", "")
    if "\n" in text and not text.startswith("\n"):
        text = "\n" + text
    return result_label(group) + text


def error_lines(groups: Sequence[Group], tb_limit: Optional[int] = TB_LIMIT) -> List[str]:
    """Grouped errors as stock's ``CompositeError.render_traceback`` draws them: the label
    ``[0-15:execute]: `` and the traceback, once per distinct error; past ``tb_limit`` groups
    (None: no limit) one line each."""
    lines: List[str] = []
    for n, g in enumerate(groups):
        e: ErrorInfo = g.value
        label = f"[{g.ranges}:{e.method}]: "
        if tb_limit is not None and n >= tb_limit:
            if n == tb_limit:
                lines.append(f"... {len(groups) - tb_limit} more distinct exceptions ...")
            lines.append(f"{label}{e.ename}: {e.evalue}")
            continue
        lines.append(label)
        lines.extend((e.traceback or f"{e.ename}: {e.evalue}").splitlines())
        lines.append("")
    return lines


def error_summary(groups: Sequence[Group]) -> str:
    """One line per distinct error (``CompositeError.__str__``'s tail)."""
    return "\n".join(f"[{g.ranges}:{g.value.method}]: {g.value.ename}: {g.value.evalue}"
                     for g in groups)


def render_text(grouped: Grouped, result_only: bool = False,
                errors: bool = True, tb_limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """The whole grouped output as ``(stream, text)`` pieces, stream ``"stdout"`` or
    ``"stderr"``: what :func:`show_grouped` prints outside IPython. Display data appear as
    their ``text/plain``. ``result_only`` leaves out streams and display data (they were
    streamed live)."""
    pieces: List[Tuple[str, str]] = []
    if not result_only:
        pieces += [("stdout", stream_block(f"[stdout:{g.ranges}]", g.value)) for g in grouped.stdout]
        pieces += [("stderr", stream_block(f"[stderr:{g.ranges}]", g.value)) for g in grouped.stderr]
        for g in grouped.displays:
            plain = g.value.get("data", {}).get("text/plain", "")
            pieces.append(("stdout", stream_block(f"[output:{g.ranges}]", plain)))
    pieces += [("stdout", result_text(g) + "\n") for g in grouped.results]
    if errors and grouped.errors:
        pieces.append(("stdout", "\n".join(error_lines(grouped.errors, tb_limit)) + "\n"))
    return pieces


# --- reading an AsyncResult

def error_info(exc: BaseException) -> ErrorInfo:
    """ErrorInfo of a ``RemoteError`` (or any exception standing for an engine's failure)."""
    info = getattr(exc, "engine_info", None) or {}
    ename = getattr(exc, "ename", None) or type(exc).__name__
    evalue = getattr(exc, "evalue", None)
    return ErrorInfo(ename=str(ename), evalue=str(exc if evalue is None else evalue),
                     traceback=getattr(exc, "traceback", None) or "",
                     method=str(info.get("method") or "execute"))


def outputs_of(ar) -> List[EngineOutput]:
    """One :class:`EngineOutput` per engine of a finished ``AsyncResult`` (a single-engine
    result too). Results come only from execute_result, as in stock ``display_outputs``:
    ``apply`` return values are not outputs."""
    # One entry per message (= per engine), exceptions included, as ipyparallel 7-9 keep them:
    # get() would reassemble a map's chunks into items (and, in 7.1, fails on a map with
    # errors when asked to return them).
    raw = getattr(ar, "_raw_results", None)
    if isinstance(raw, list) and len(raw) == len(getattr(ar, "msg_ids", ())):
        results = raw[0] if getattr(ar, "_single_result", False) else raw
    else:
        results = ar.get(return_exceptions=True)
    ids = ar.engine_id
    stdouts, stderrs, outputs, execute_results = ar.stdout, ar.stderr, ar.outputs, ar.execute_result
    if getattr(ar, "_single_result", False):
        ids, stdouts, stderrs, outputs, execute_results, results = (
            [ids], [stdouts], [stderrs], [outputs], [execute_results], [results])
    records = []
    for eid, out, err, outs, er, res in zip(ids, stdouts, stderrs, outputs, execute_results,
                                            results):
        records.append(EngineOutput(
            engine_id=eid, stdout=out or "", stderr=err or "", outputs=tuple(outs or ()),
            execute_result=er or None,
            error=error_info(res) if isinstance(res, BaseException) else None))
    return records


def show_grouped(ar, result_only: bool = False, errors: bool = True,
                 tb_limit: Optional[int] = None, timeout: Optional[float] = None) -> Grouped:
    """Print an AsyncResult's outputs grouped: each distinct output once with its engines.

    Waits for the result and its output (up to ``timeout`` seconds; TimeoutError after).
    Streams go to ``sys.stdout``/``sys.stderr``. In IPython, display data and results are
    republished with their whole mime bundle (figures show as figures; metadata
    ``engines`` lists the ids), elsewhere their ``text/plain`` is printed. Errors are printed,
    not raised (``%pxg`` raises them instead). Returns the groups."""
    ar.wait(timeout if timeout is not None else -1)
    if not ar.ready():
        raise TimeoutError(f"result not ready after {timeout} s")
    ar.wait_for_output(timeout if timeout is not None else -1)
    grouped = group_outputs(outputs_of(ar))
    ip = _ipython()
    if ip is None:
        for stream, text in render_text(grouped, result_only, errors, tb_limit):
            _stream(stream).write(text)
        _stream("stdout").flush()
        return grouped
    if not result_only:
        for g in grouped.stdout:
            sys.stdout.write(stream_block(f"[stdout:{g.ranges}]", g.value))
        for g in grouped.stderr:
            sys.stderr.write(stream_block(f"[stderr:{g.ranges}]", g.value))
        sys.stdout.flush()
        sys.stderr.flush()
        from IPython.display import display_pretty
        for g in grouped.displays:
            display_pretty(f"[output:{g.ranges}]", raw=True)
            md = dict(g.value.get("metadata") or {}, engines=list(g.ids))
            ip.display_pub.publish(data=g.value.get("data", {}), metadata=md)
    for g in grouped.results:
        ip.display_pub.publish(data=_result_bundle(g, ip),
                               metadata=dict(g.value.get("metadata") or {}, engines=list(g.ids)))
    if errors and grouped.errors:
        sys.stdout.write("\n".join(error_lines(grouped.errors, tb_limit)) + "\n")
        sys.stdout.flush()
    return grouped


def _result_bundle(group: Group, ip) -> dict:
    # Stock ExecuteReply._repr_mimebundle_: the bundle, text/plain prefixed by a red Out[...].
    data = dict(group.value.get("data", {}))
    if "text/plain" in data:
        text = result_text(group)
        if getattr(ip, "colors", "NoColor") != "NoColor":
            label = result_label(group)
            text = "\x1b[0;31m" + label + "\x1b[0m" + text[len(label):]
        data["text/plain"] = text
    return data


def _stream(name: str):
    return sys.stderr if name == "stderr" else sys.stdout


def _ipython():
    if "IPython" not in sys.modules:
        return None
    from IPython.core.getipython import get_ipython
    return get_ipython()
