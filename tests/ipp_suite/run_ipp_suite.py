#!/usr/bin/python3
"""Run ipyparallel's own test suite (a newer ipyparallel, e.g. 9.x) against pxcontroller.

Users' laptops run ipyparallel 8/9 while this machine's stock peer is Debian's 7.1. This runner
checks the newer client against pxfabric with the newer release's own tests: the ipyparallel
source tree given (never committed here; export a release with ``git archive``, see
``docs/ipyparallel-9.md``) goes first on ``PYTHONPATH``, and ``hook/sitecustomize.py`` swaps
the controller every launcher of the suite starts for ``pxcontroller`` (``--controller stock``
keeps the tree's own ``ipcontroller``, to tell a pxcontroller gap from a failure of the newer
client on Debian 12's older pyzmq/jupyter_client/ipykernel). Engines are the tree's own
``ipengine`` (the suite starts them), or with ``--engines pxengine`` one-rank MPI jobs of
``pxengine`` (and ``pxengine`` under the stock MPI launcher's ``mpiexec -n N``).

Usage (``/usr/bin/python3``, no other Python)::

    run_ipp_suite.py [--ipp /tmp/ipp9] [--controller pxcontroller|stock]
                     [--engines ipengine|pxengine] [--timeout 120] [--total-timeout 3600]
                     [--json OUT.json] [-k EXPR] [TEST ...] [-- PYTEST_ARGS ...]
    run_ipp_suite.py --compare STOCK.json PX.json

``TEST`` is a module or node of ``ipyparallel.tests``: ``test_label``, ``test_view.py``,
``test_view.py::TestView::test_map``, ``ipyparallel.tests.test_db``; none = the whole suite.
The summary lists every failure and error with its first message line, skips by reason; with
``--json`` every test's outcome is saved, and ``--compare`` prints the tests whose outcome
differs between two saved runs (stock controller vs pxcontroller).

Every process of the run carries a unique token in its environment; whatever is still alive
when pytest ends (a controller or engine a failed test left behind) is found by that token and
stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional

PYTHON = "/usr/bin/python3"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HOOK_DIR = HERE / "hook"
DEFAULT_IPP = Path("/tmp/ipp9")
DEFAULT_PXCONTROLLER = Path(os.environ.get("PXF_PXCONTROLLER")
                            or REPO / "build" / "bin" / "pxcontroller")
DEFAULT_PXENGINE = Path(os.environ.get("PXF_PXENGINE") or REPO / "build" / "bin" / "pxengine")
TOKEN_VAR = "PXF_IPP_SUITE_TOKEN"

sys.path.insert(0, str(REPO / "python"))
import psutil  # noqa: E402
from pxfabric import processes  # noqa: E402

# Open MPI as root, more ranks than cores (stock MPI engines of test_mpi.py and pxengine jobs).
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}
# pxengine jobs on this machine only, as pxcluster runs them (docs/security.md).
PXENGINE_MPI_ENV = {"OMPI_MCA_btl": "self,vader", "OMPI_MCA_oob_tcp_if_include": "lo"}

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")


class RunnerError(Exception):
    """Bad input or a missing program: printed as one line, exit status 2."""


# --- the command ------------------------------------------------------------------------------
def check_tree(ipp: Path) -> str:
    """The tree's version; refuses a path that is not an ipyparallel source tree."""
    if not (ipp / "ipyparallel" / "tests" / "__init__.py").is_file():
        raise RunnerError(
            f"{ipp} is not an ipyparallel source tree (no ipyparallel/tests/__init__.py). "
            "Export one, e.g.: git -C /work/.mirror/ipython+ipyparallel/repo archive 9.1.0 "
            f"| tar -x -C {ipp}")
    ns: Dict[str, object] = {}
    exec(compile((ipp / "ipyparallel" / "_version.py").read_text(), "_version.py", "exec"), ns)
    return str(ns.get("__version__", "?"))


def pytest_targets(tests: List[str]) -> List[str]:
    """``--pyargs`` targets for the names given (module, file or node id of the suite)."""
    if not tests:
        return ["ipyparallel.tests"]
    out = []
    for t in tests:
        head, sep, rest = t.partition("::")
        head = head.removesuffix(".py").replace("/", ".")
        if not head.startswith("ipyparallel."):
            head = "ipyparallel.tests." + head.rsplit(".", 1)[-1]
        out.append(head + sep + rest)
    return out


def build_env(args, token: str) -> Dict[str, str]:
    env = dict(os.environ)
    for k, v in MPI_ENV.items():
        env.setdefault(k, v)
    paths = [str(HOOK_DIR), str(args.ipp)]
    if args.engines == "pxengine":
        paths.append(str(REPO / "python"))  # pxengine's ranks run pxfabric.engine
        for k, v in PXENGINE_MPI_ENV.items():
            env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the tree or tests/ipp_suite
    env["PXF_IPP_TREE"] = str(args.ipp)
    env[TOKEN_VAR] = token
    for name in ("PXF_IPP_CONTROLLER_CMD", "PXF_IPP_ENGINE_CMD", "PXF_IPP_MPI_ENGINE_CMD"):
        env.pop(name, None)
    if args.controller == "pxcontroller":
        env["PXF_IPP_CONTROLLER_CMD"] = json.dumps([str(args.pxcontroller)])
    if args.engines == "pxengine":
        mpirun = shutil.which("mpirun")
        if not mpirun:
            raise RunnerError("mpirun not found (install openmpi-bin) for --engines pxengine")
        env["PXF_IPP_ENGINE_CMD"] = json.dumps([mpirun, "-n", "1", str(args.pxengine)])
        env["PXF_IPP_MPI_ENGINE_CMD"] = json.dumps([str(args.pxengine)])
    return env


def pytest_command(args, junit: Path) -> List[str]:
    return [
        PYTHON, "-m", "pytest",
        # upstream's own settings (asyncio_mode, filterwarnings, addopts) from the tree
        "-c", str(args.ipp / "pyproject.toml"), "--rootdir", str(args.ipp),
        "-p", "no:cacheprovider", "-p", "pxf_ipp_plugin",
        f"--timeout={args.timeout:g}", "--color=no", "-rfEs",
        f"--junitxml={junit}", "-o", "junit_family=xunit1",
        *(["-k", args.k] if args.k else []),
        *args.pytest_args,
        "--pyargs", *pytest_targets(args.tests),
    ]


# --- processes ---------------------------------------------------------------------------------
def processes_with_token(token: str) -> List[int]:
    """PIDs of live processes whose environment carries this run's token (not us)."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def stop_pids(pids: List[int], grace: float = 3.0) -> None:
    """SIGTERM, ``grace`` s, SIGKILL: :func:`pxfabric.processes.terminate` on these PIDs."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass  # already gone
    processes.terminate(procs, grace)


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid} " + shlex.join(a.decode(errors="replace")
                                          for a in f.read().split(b"\0") if a)[:160]
    except OSError:
        return str(pid)


def run_pytest(cmd: List[str], env: Dict[str, str], cwd: Path, log: Path,
               total_timeout: float) -> int:
    """pytest in its own session, its output to the terminal and ``log``; bounded."""
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + total_timeout
        os.set_blocking(proc.stdout.fileno(), False)
        timed_out = False
        while True:
            chunk = proc.stdout.read()
            if chunk:
                logf.write(chunk)
                logf.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            if proc.poll() is not None and not chunk:
                break
            if not timed_out and time.monotonic() > deadline:
                timed_out = True
                print(f"\n[run_ipp_suite] total timeout {total_timeout:g} s: stopping pytest "
                      f"(pid {proc.pid})", flush=True)
                stop_pids([proc.pid], grace=10.0)
            time.sleep(0.05)
        return -1 if timed_out else proc.returncode


# --- results -----------------------------------------------------------------------------------
def node_id(classname: str, name: str) -> str:
    """``test_view.py::TestView::test_map`` from junit's dotted classname."""
    parts = classname.split(".")
    if parts[:2] == ["ipyparallel", "tests"]:
        parts = parts[2:]
    if not parts:
        return name
    return "::".join([parts[0] + ".py", *parts[1:], name])


def read_junit(path: Path) -> Dict[str, Dict[str, str]]:
    results: Dict[str, Dict[str, str]] = {}
    if not path.is_file():
        return results
    for case in ET.parse(path).getroot().iter("testcase"):
        nid = node_id(case.get("classname", ""), case.get("name", ""))
        kinds = {child.tag: child for child in case
                 if child.tag in ("failure", "error", "skipped")}
        if "failure" in kinds:
            outcome, el = "failed", kinds["failure"]
        elif "error" in kinds:
            outcome, el = "error", kinds["error"]
        elif "skipped" in kinds:
            el = kinds["skipped"]
            outcome = "xfailed" if el.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome, el = "passed", None
        message = ""
        if el is not None:
            message = (el.get("message") or el.text or "").strip().splitlines()
            message = message[0][:300] if message else ""
        results[nid] = {"outcome": outcome, "message": message,
                        "time": case.get("time", "")}
    return results


def summarize(results: Dict[str, Dict[str, str]], header: str) -> str:
    counts = Counter(r["outcome"] for r in results.values())
    lines = [header,
             "counts: " + ", ".join(f"{counts.get(o, 0)} {o}" for o in OUTCOMES)
             + f" ({len(results)} tests)"]
    bad = sorted((n, r) for n, r in results.items() if r["outcome"] in ("failed", "error"))
    if bad:
        lines.append("failures and errors:")
        lines += [f"  {r['outcome'].upper():6} {n}: {r['message']}" for n, r in bad]
    skips: Dict[str, List[str]] = defaultdict(list)
    for n, r in results.items():
        if r["outcome"] == "skipped":
            skips[r["message"]].append(n)
    if skips:
        lines.append("skipped, by reason:")
        lines += [f"  {len(v):3} {k}" for k, v in sorted(skips.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(lines)


def final_line(log: Path) -> str:
    """pytest's closing ``= 3 failed, 440 passed, ... in 400.1s =`` line, if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("=") and " in " in line and line.rstrip().endswith("="):
            return line.strip("= ").strip()
    return ""


def compare(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    ta, tb = a["tests"], b["tests"]
    print(f"A: {a_path} ({a['meta'].get('controller')}, {a['meta'].get('engines')})")
    print(f"B: {b_path} ({b['meta'].get('controller')}, {b['meta'].get('engines')})")
    for name, run in (("A", a), ("B", b)):
        c = Counter(r["outcome"] for r in run["tests"].values())
        print(f"{name}: " + ", ".join(f"{c.get(o, 0)} {o}" for o in OUTCOMES))
    diffs = []
    for nid in sorted(set(ta) | set(tb)):
        oa = ta.get(nid, {}).get("outcome", "-")
        ob = tb.get(nid, {}).get("outcome", "-")
        if oa != ob:
            diffs.append((nid, oa, ob, tb.get(nid, {}).get("message") or
                          ta.get(nid, {}).get("message", "")))
    print(f"{len(diffs)} tests differ (A -> B):")
    for nid, oa, ob, msg in diffs:
        print(f"  {oa:7} -> {ob:7} {nid}: {msg}")
    return 0


# --- main ----------------------------------------------------------------------------------------
def parse_args(argv: List[str]):
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="run_ipp_suite.py",
        description="ipyparallel's own test suite (a source tree, e.g. 9.x) against "
                    "pxcontroller, or against the tree's stock controller.")
    p.add_argument("tests", nargs="*", metavar="TEST",
                   help="test module or node id of ipyparallel.tests (default: all)")
    p.add_argument("--ipp", type=Path, default=DEFAULT_IPP,
                   help=f"ipyparallel source tree (default {DEFAULT_IPP})")
    p.add_argument("--controller", choices=("pxcontroller", "stock"), default="pxcontroller")
    p.add_argument("--pxcontroller", type=Path, default=DEFAULT_PXCONTROLLER,
                   help=f"pxcontroller binary (default $PXF_PXCONTROLLER or {DEFAULT_PXCONTROLLER})")
    p.add_argument("--engines", choices=("ipengine", "pxengine"), default="ipengine",
                   help="the tree's stock ipengine (default), or pxengine in MPI jobs")
    p.add_argument("--pxengine", type=Path, default=DEFAULT_PXENGINE,
                   help=f"pxengine binary (default $PXF_PXENGINE or {DEFAULT_PXENGINE})")
    p.add_argument("-k", help="pytest -k expression")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per test (120)")
    p.add_argument("--total-timeout", type=float, default=3600.0,
                   help="seconds for the whole run (3600)")
    p.add_argument("--json", type=Path, help="save every test's outcome here")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                   help="print the tests whose outcome differs between two saved runs")
    args = p.parse_args(argv)
    args.pytest_args = extra
    return args


def _interrupt_on_sigterm(signum, frame):
    # An outer timeout's SIGTERM must still reach main's cleanup of the run's processes.
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        return compare(*args.compare)
    args.ipp = args.ipp.resolve()
    version = check_tree(args.ipp)
    if args.controller == "pxcontroller" and not os.access(args.pxcontroller, os.X_OK):
        raise RunnerError(f"pxcontroller {args.pxcontroller} is not an executable file "
                          "(bash scripts/build.sh, or --pxcontroller / $PXF_PXCONTROLLER)")
    if args.engines == "pxengine":
        if args.controller != "pxcontroller":
            raise RunnerError("--engines pxengine needs --controller pxcontroller "
                              "(MPI jobs of pxengine register only with pxcontroller)")
        if not os.access(args.pxengine, os.X_OK):
            raise RunnerError(f"pxengine {args.pxengine} is not an executable file")
    token = uuid.uuid4().hex
    env = build_env(args, token)
    work = Path(tempfile.mkdtemp(prefix="pxf-ipp-suite-"))
    junit, log = work / "junit.xml", work / "pytest.log"
    cmd = pytest_command(args, junit)
    print(f"[run_ipp_suite] ipyparallel {version} from {args.ipp}; controller "
          f"{args.pxcontroller if args.controller == 'pxcontroller' else 'stock (the tree)'}; "
          f"engines {args.engines}; work dir {work}", flush=True)
    print("[run_ipp_suite] PYTHONPATH=" + env["PYTHONPATH"] + " " + shlex.join(cmd), flush=True)
    started = time.monotonic()
    rc = 1
    try:
        rc = run_pytest(cmd, env, work, log, args.total_timeout)
    finally:
        survivors = processes_with_token(token)
        if survivors:
            print(f"[run_ipp_suite] stopping {len(survivors)} processes the run left behind:")
            for pid in survivors:
                print("  " + _describe(pid))
            stop_pids(survivors)
    elapsed = time.monotonic() - started
    results = read_junit(junit)
    header = (f"=== ipyparallel {version} suite, controller={args.controller}, "
              f"engines={args.engines}: pytest exit {rc}, {elapsed:.0f} s (log {log})")
    print(summarize(results, header), flush=True)
    pytest_line = final_line(log)
    if pytest_line:  # xpassed tests count as passed in junit; pytest's own line tells them
        print("pytest: " + pytest_line, flush=True)
    if args.json:
        meta = {"ipyparallel": version, "tree": str(args.ipp), "controller": args.controller,
                "pxcontroller": str(args.pxcontroller), "engines": args.engines,
                "targets": pytest_targets(args.tests), "k": args.k, "pytest_exit": rc,
                "seconds": round(elapsed, 1), "command": cmd,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        args.json.write_text(json.dumps({"meta": meta, "tests": results}, indent=1))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RunnerError as e:
        print(f"run_ipp_suite: {e}", file=sys.stderr)
        sys.exit(2)
