#!/usr/bin/python3
"""From a laptop, and Curve's cost: two paired measurements in one run.

Part 1, ``curve`` (root namespace, everything on 127.0.0.1): two clusters up at once, identical
but for ``--curve``:
  hmac   build/bin/pxcontroller --profile-dir=P1 --ip=127.0.0.1 --ping=3000
  curve  build/bin/pxcontroller --curve --profile-dir=P2 --ip=127.0.0.1 --ping=3000
each with ONE MPI job ``mpiexec -n 2 pxengine --profile-dir=P`` and a stock 7.1 client (this
process; the curve client reads ``curve_serverkey`` from the file, HMAC signing stays on).
Per rep, on each cluster back to back (which goes first alternates by rep and workload):
  apply   rc[0].apply_sync(lambda: None)           --warmup untimed, then --calls timed; ms
  push    rc[0].push({'a': <100 MiB float64>}, block=True)   1 untimed, --pushes timed; MiB/s
Curve's cost = paired (curve time / hmac time - 1), per rep; goal <= 15 % on both.

Part 2, ``tunnel`` (network namespaces, tests/integration/hosts.py): nodeA 10.200.0.1 = login +
compute: ``pxcontroller --profile-dir=P --ip=127.0.0.1 --ssh=nodeA`` (clients on loopback
only) and ``mpirun -n 2 pxengine --profile-dir=P``; nodeC 10.200.0.2 = the laptop, where this
script re-executes itself (nsenter) and drives the stock 7.1 client both ways, against the same
running cluster and the same sshd:
  px     `pxcluster connect root@nodeA -F <ssh config> --remote-profile-dir P --known-hosts KH`
         (pxtunnel: one libssh session) then ipp.Client(profile='nodeA');
         at the end `pxcluster disconnect nodeA`
  stock  `scp -F <ssh config> nodeA:<client file> <laptop copy>` (what a user does first;
         timed apart), then ipp.Client(<laptop copy>, sshserver='nodeA') (zmq.ssh.tunnel:
         one `ssh -f -L ... sleep 60` per port, through pexpect; `ssh` on PATH is a wrapper
         `trap '' HUP; exec /usr/bin/ssh -F <ssh config> "$@"`); at the end the tunnel
         processes are found in nodeC's namespace (`ip netns pids`) and stopped by PID
Metrics per side and rep: setup (command start -> first rc[0].apply answered; stock also with
the scp), apply (as above, through the tunnel), push (100 MiB, as above). Ratios stock/px for
times, px/stock for MiB/s (> 1: pxcluster connect better). Goals: setup >= 3x, apply >= 1x.
One untimed round of both sides first (first ssh connections, page cache).

Usage:  /usr/bin/python3 bench/bench_laptop.py [--quick] [--reps N] [--calls N] [--pushes N]
        [--parts curve,tunnel] [--json PATH] [--keep]
        /usr/bin/python3 bench/bench_laptop.py --report bench/results/laptop-<UTC>.json
Needs root for part 2 (network namespaces, sshd); without it part 2 is skipped with the reason.
The machine has 2 cores and is shared: 2 controllers + 4 ranks + client in part 1.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import psutil  # noqa: E402

import _harness as H  # noqa: E402
import _report as R  # noqa: E402

REPO = HERE.parent
N_RANKS = 2
PING_MS = 3000          # pxcontroller's default heartbeat, given explicitly (the harness needs one)
fmt = R.fmt  # one number format for every report

CURVE_METRICS = [  # name, unit, what
    ("apply", "ms/call", "rc[0].apply_sync(lambda: None)"),
    ("push", "MiB/s", "rc[0].push({'a': 100 MiB float64}, block=True)"),
]
TUNNEL_METRICS = [  # name, unit, what, kind ("time"/"rate"), goal (min stock/px) or None
    ("setup", "s", "command start -> first rc[0].apply answered", "time", 3.0),
    ("setup_with_scp", "s", "  stock incl. scp of the client file first (px: same as setup)", "time", None),
    ("apply", "ms/call", "rc[0].apply_sync(lambda: None) through the tunnel", "time", 1.0),
    ("push", "MiB/s", "rc[0].push(100 MiB) through the tunnel", "rate", None),
]


def noop():
    return None


_alive = H.alive
stop_procs = H.stop_procs


# ============================================================================ shared workloads

def time_apply(rc, n_warm: int, n: int, T: float) -> list:
    """ms per rc[0].apply_sync(noop), issued as apply_async().get(timeout)."""
    e = rc[0]
    H.clear_client_caches(rc)
    for _ in range(n_warm):
        e.apply_async(noop).get(timeout=T)
    H.clear_client_caches(rc)
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        e.apply_async(noop).get(timeout=T)
        ms.append((time.perf_counter() - t) * 1e3)
    return ms


def time_push(rc, arr, n: int, T: float) -> list:
    """MiB/s per rc[0].push({'a': arr}, block=True) (after one untimed push)."""
    e = rc[0]
    mib = arr.nbytes / 2**20
    H.clear_client_caches(rc)
    e.push({"a": arr}, block=False).get(timeout=T)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        e.push({"a": arr}, block=False).get(timeout=T)
        out.append(mib / (time.perf_counter() - t))
    H.clear_client_caches(rc)
    return out


def check_push(rc, arr, T: float) -> None:
    got = rc[0].apply_async(lambda: float(globals()["a"].sum())).get(timeout=T)
    if got != float(arr.sum()):
        raise AssertionError(f"pushed array arrived wrong: sum {got} != {float(arr.sum())}")


def payload(mib: int):
    import numpy as np

    return np.arange(mib * 2**20 // 8, dtype=np.float64)


def cpu_pct(d: dict) -> dict:
    w = d["wall"] or 1e-9
    return {k: round(100 * v / w, 1) for k, v in d.items()
            if k != "wall" and not k.endswith("_user") and not k.endswith("_system")} | {"wall_s": w}


# ============================================================================ part 1: curve

def px_stats(client_file: Path, timeout: float = 5.0):
    """pxcontroller's counters (pxf_stats_request on the registration socket; pxcluster's
    query_hub, which speaks Curve when the file has a curve_serverkey)."""
    if str(REPO / "python") not in sys.path:
        sys.path.insert(0, str(REPO / "python"))
    from pxfabric.cluster import query_hub

    reply = query_hub(client_file, "pxf_stats_request", {}, timeout)
    return reply["content"] if reply else None


def sodium_pass(mib: int, n: int = 3):
    """libsodium alone, for scale: MiB/s of crypto_secretbox_easy (XSalsa20-Poly1305, what
    CurveZMQ's message boxes use) over ``mib`` MiB, encrypt and decrypt, medians of ``n``."""
    import ctypes

    try:
        so = ctypes.CDLL("libsodium.so.23")
    except OSError:
        return None
    so.sodium_init()
    size = mib * 2**20
    m, c = ctypes.create_string_buffer(size + 32), ctypes.create_string_buffer(size + 32)
    nonce, key = os.urandom(24), os.urandom(32)
    enc, dec = [], []
    for _ in range(n):
        t = time.perf_counter()
        so.crypto_secretbox_easy(c, m, ctypes.c_ulonglong(size), nonce, key)
        enc.append(mib / (time.perf_counter() - t))
        t = time.perf_counter()
        if so.crypto_secretbox_open_easy(m, c, ctypes.c_ulonglong(size + 16), nonce, key) != 0:
            return None
        dec.append(mib / (time.perf_counter() - t))
    return {"encrypt": H.median(enc), "decrypt": H.median(dec)}


def zmq_hop(arr, curve: bool, n: int) -> list:
    """libzmq alone, for scale: MiB/s of ``n`` sends of ``arr`` over one tcp://127.0.0.1 hop
    (DEALER -> ROUTER in one context: encryption and decryption both in its one I/O thread, as a
    relay does it), with or without CurveZMQ."""
    import zmq

    ctx = zmq.Context()
    r, d = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (r, d):
            s.linger = 0
        if curve:
            spub, ssec = zmq.curve_keypair()
            cpub, csec = zmq.curve_keypair()
            r.curve_server, r.curve_secretkey = True, ssec
            d.curve_serverkey, d.curve_publickey, d.curve_secretkey = spub, cpub, csec
        port = r.bind_to_random_port("tcp://127.0.0.1")
        d.connect(f"tcp://127.0.0.1:{port}")
        d.send(b"hello")
        r.recv_multipart()
        out = []
        for _ in range(n + 1):
            t = time.perf_counter()
            d.send(arr, copy=False)
            r.recv_multipart(copy=False)
            out.append(arr.nbytes / 2**20 / (time.perf_counter() - t))
        return out[1:]
    finally:
        r.close()
        d.close()
        ctx.term()

def run_curve(cfg: dict, tmp: Path) -> dict:
    import ipyparallel as ipp  # noqa: F401  (import before timing)

    out = {"sides": {}, "reps": [], "config": {}}
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [cfg["pxf_pythonpath"]] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["PXF_PYTHONPATH"] = cfg["pxf_pythonpath"]
    clusters = {}
    for side in ("hmac", "curve"):
        c = H.Cluster("px", tmp / f"curve-{side}", N_RANKS, cfg["pxcontroller"], ping_ms=PING_MS,
                      engine_mode="mpi", engine_program=[cfg["pxengine"]])
        if side == "curve":
            c.program.append("--curve")
        clusters[side] = c
    T = cfg["call_timeout"]
    try:
        deadline = time.monotonic() + 90
        for c in clusters.values():
            c.start_controller(deadline)
        for c in clusters.values():
            c.start_engines()
        for side, c in clusters.items():
            c.connect(deadline)
            info = json.loads((c.security / "ipcontroller-client.json").read_text())
            out["sides"][side] = {"argv": {"controller": c.controller_argv(), "engines": c.engine_argv()},
                                  "startup": dict(c.timings),
                                  "curve_serverkey": bool(info.get("curve_serverkey"))}
        if out["sides"]["curve"]["curve_serverkey"] is not True or out["sides"]["hmac"]["curve_serverkey"]:
            raise H.HarnessError(f"curve_serverkey: {out['sides']}")
        ups = ", ".join(f"{s} {fmt(c.timings['ready_s'])}s" for s, c in clusters.items())
        print(f"curve: both clusters up ({ups})", flush=True)
        arr = payload(cfg["push_mib"])
        out["sodium_mib_s"] = sodium_pass(cfg["push_mib"])
        me = [psutil.Process(os.getpid())]
        for rep in range(cfg["reps"]):
            row = {"rep": rep, "apply": {}, "push": {}, "apply_calls": {}, "push_each": {}, "cpu": {}}
            for wi, w in enumerate(("apply", "push")):
                order = ["hmac", "curve"] if (rep + wi) % 2 == 0 else ["curve", "hmac"]
                row.setdefault("order", {})[w] = order
                for side in order:
                    c = clusters[side]
                    c.check_alive()
                    other = clusters["curve" if side == "hmac" else "hmac"]
                    groups = {"controller": c.controller_procs(), "ranks": c.engine_procs(),
                              "client": me, "other_cluster": other.all_procs()}
                    s0 = H.CpuSnapshot(groups)
                    if w == "apply":
                        ms = time_apply(c.client, cfg["warmup"], cfg["calls"], T)
                        row["apply"][side] = H.median(ms)
                        row["apply_calls"][side] = {"p10": sorted(ms)[len(ms) // 10], "max": max(ms),
                                                    "over_100ms": sum(x > 100 for x in ms)}
                    else:
                        rates = time_push(c.client, arr, cfg["pushes"], T)
                        row["push"][side] = H.median(rates)
                        row["push_each"][side] = [round(x, 1) for x in rates]
                    row["cpu"].setdefault(w, {})[side] = cpu_pct(s0.delta(H.CpuSnapshot(groups)))
            # libzmq alone, one hop, same payload (scale for the push numbers)
            for side in (["hmac", "curve"] if rep % 2 == 0 else ["curve", "hmac"]):
                row.setdefault("zmq_hop", {})[side] = H.median(zmq_hop(arr, side == "curve", cfg["pushes"]))
            row["cost_pct"] = {"apply": 100 * (row["apply"]["curve"] / row["apply"]["hmac"] - 1),
                               "push": 100 * (row["push"]["hmac"] / row["push"]["curve"] - 1)}
            out["reps"].append(row)
            fr = H.median(x["foreign"] for w in row["cpu"].values() for x in w.values())
            print(f"curve rep {rep + 1}/{cfg['reps']}: apply hmac {fmt(row['apply']['hmac'])} curve "
                  f"{fmt(row['apply']['curve'])} ms ({row['cost_pct']['apply']:+.1f} %) | push hmac "
                  f"{fmt(row['push']['hmac'])} curve {fmt(row['push']['curve'])} MiB/s "
                  f"({row['cost_pct']['push']:+.1f} %) | libzmq one hop: plain {fmt(row['zmq_hop']['hmac'])} "
                  f"curve {fmt(row['zmq_hop']['curve'])} MiB/s | foreign load {fmt(fr, 0)}% of a core", flush=True)
        for c in clusters.values():
            check_push(c.client, arr, T)
        for side, c in clusters.items():
            out["sides"][side]["px_stats"] = px_stats(c.security / "ipcontroller-client.json")
    except (H.HardTimeout, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:4000]
        out["traceback"] = traceback.format_exc()[-3000:]
        print(f"ERROR in part curve: {out['error'][:1500]}", flush=True)
    finally:
        infos = H.stop_clusters(list(clusters.values()))
        for (side, c), info in zip(clusters.items(), infos):
            out["sides"].setdefault(side, {})["stop"] = info
            out["sides"][side]["controller_log"] = H.log_problems(c.controller_log, 8, r"[Rr]eceived signal 15")
            out["sides"][side]["engine_log"] = H.log_problems(c.workdir / "engines.log", 8,
                                                              r"[Rr]eceived signal 15|terminated by signal 15")
    return out


# ============================================================================ part 2: inner (on nodeC)

def netns_procs(cfg: dict, *needles: str) -> list:
    """Processes in nodeC's network namespace (``ip netns pids``; if that cannot be read from
    here, the same test by /proc/PID/ns/net) whose command line contains every needle."""
    pids = None
    try:
        r = subprocess.run(["ip", "netns", "pids", cfg["laptop_netns"]], capture_output=True,
                           text=True, timeout=10)
        if r.returncode == 0:
            pids = [int(t) for t in r.stdout.split() if t.isdigit()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if pids is None:
        mine = os.stat("/proc/self/ns/net").st_ino
        pids = []
        for p in psutil.pids():
            try:
                if os.stat(f"/proc/{p}/ns/net").st_ino == mine:
                    pids.append(p)
            except OSError:
                pass
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if all(n in cmd for n in needles) and _alive(p):
            out.append(p)
    return out


def ssh_tunnels(cfg: dict) -> list:
    """zmq.ssh.tunnel's ``ssh ... -L lport:127.0.0.1:RPORT nodeA sleep N`` processes for the
    controller's ports."""
    rports = {str(r) for r in cfg["remote_ports"]}
    found = []
    for p in netns_procs(cfg, "ssh", "-L"):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if any(a.count(":") >= 2 and a.rsplit(":", 1)[-1] in rports for a in cmd):
            found.append(p)
    return found


def nodea_side_procs(cfg: dict) -> dict:
    """The cluster (controller, mpirun + ranks) and nodeA's sshd sessions, for CPU accounting."""
    def tree(pid):
        try:
            p = psutil.Process(pid)
            return [p] + p.children(recursive=True)
        except psutil.Error:
            return []
    sshd = [p for p in tree(cfg["nodeA_sshd_pid"])[1:]]
    return {"controller": tree(cfg["controller_pid"]), "job": tree(cfg["mpirun_pid"]), "sshd_sessions": sshd}


class Side:
    def __init__(self, side: str, rep: int, cfg: dict, env: dict):
        self.side, self.rep, self.cfg, self.env = side, rep, cfg, env
        self.rc = None
        self.tunnel = []          # psutil.Process: pxtunnel, or the stock ssh -L processes
        self.out = {"side": side, "rep": rep, "metrics": {}, "startup": {}, "cpu": {}}

    def pxcluster(self, *args, timeout=60.0):
        return subprocess.run([H.PYTHON, "-m", "pxfabric", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=self.env, cwd=self.cfg["tmp"])

    def connect(self):
        import ipyparallel as ipp

        cfg, st, T = self.cfg, self.out["startup"], self.cfg["call_timeout"]
        if self.side == "px":
            t0 = time.perf_counter()
            r = self.pxcluster("connect", "root@nodeA", "-F", cfg["ssh_config"], "--remote-profile-dir",
                               cfg["profile"], "--known-hosts", cfg["known_hosts"], "--timeout", 30)
            st["connect_cmd_s"] = time.perf_counter() - t0
            self.out["connect_output"] = (r.stdout + r.stderr)[-1500:]
            if r.returncode != 0:
                raise H.HarnessError(f"pxcluster connect failed ({r.returncode}): {r.stdout}{r.stderr}")
            state = json.loads(Path(cfg["state_file"]).read_text())
            self.out["tunnel_ready_s"] = state.get("ready_seconds")
            self.tunnel = [psutil.Process(state["pid"])]
            t1 = time.perf_counter()
            self.rc = ipp.Client(profile="nodeA", timeout=T)
            st["client_s"] = time.perf_counter() - t1
            scp = 0.0
        else:
            local = Path(cfg["tmp"]) / f"laptop-copy-r{self.rep}.json"
            t0 = time.perf_counter()
            r = subprocess.run(["scp", "-q", "-F", cfg["ssh_config"], f"root@nodeA:{cfg['client_file']}",
                                str(local)], capture_output=True, text=True, timeout=60)
            scp = st["scp_s"] = time.perf_counter() - t0
            if r.returncode != 0:
                raise H.HarnessError(f"scp failed ({r.returncode}): {r.stderr}")
            t0 = time.perf_counter()
            self.rc = ipp.Client(str(local), sshserver="nodeA", timeout=T)
            st["client_s"] = time.perf_counter() - t0
            if self.rc._ssh is not True:
                raise H.HarnessError("the stock client is not using ssh tunnels")
        t1 = time.perf_counter()
        self.rc[0].apply_async(noop).get(timeout=T)
        st["first_apply_s"] = time.perf_counter() - t1
        setup = time.perf_counter() - t0
        self.out["metrics"]["setup"] = setup
        self.out["metrics"]["setup_with_scp"] = setup + scp
        if self.side == "stock":
            self.tunnel = ssh_tunnels(cfg)
            self.out["ssh_tunnel_processes"] = len(self.tunnel)
            if not self.tunnel:
                raise H.HarnessError("no `ssh -L` tunnel process on nodeC: how did the client connect?")
        hosts = self.rc[:].apply_async(socket.gethostname).get(timeout=T)
        if hosts != ["nodeA"] * N_RANKS or len(self.rc.ids) != N_RANKS or socket.gethostname() != "nodeC":
            raise H.HarnessError(f"engines {self.rc.ids} on {hosts}, client on {socket.gethostname()}")

    def groups(self):
        g = nodea_side_procs(self.cfg)
        g["client"] = [psutil.Process(os.getpid())]
        g["tunnel"] = list(self.tunnel)
        return g

    def workloads(self, arr):
        cfg, T = self.cfg, self.cfg["call_timeout"]
        g = self.groups()
        s0 = H.CpuSnapshot(g)
        ms = time_apply(self.rc, cfg["warmup"], cfg["calls"], T)
        self.out["cpu"]["apply"] = cpu_pct(s0.delta(H.CpuSnapshot(g)))
        self.out["metrics"]["apply"] = H.median(ms)
        self.out["apply_calls"] = {"p10": sorted(ms)[len(ms) // 10], "p90": sorted(ms)[9 * len(ms) // 10],
                                   "max": max(ms), "over_100ms": sum(x > 100 for x in ms),
                                   "over_400ms": sum(x > 400 for x in ms)}
        self.out["apply_ms"] = [round(x, 3) for x in ms]
        g = self.groups()
        s0 = H.CpuSnapshot(g)
        rates = time_push(self.rc, arr, cfg["pushes"], T)
        self.out["cpu"]["push"] = cpu_pct(s0.delta(H.CpuSnapshot(g)))
        self.out["metrics"]["push"] = H.median(rates)
        self.out["push_each"] = [round(x, 1) for x in rates]
        check_push(self.rc, arr, T)

    def close(self):
        info = {}
        if self.rc is not None:
            try:
                self.rc.close(linger=0)
            except Exception as e:  # noqa: BLE001
                info["client_close_error"] = repr(e)
            self.rc = None
        t = time.perf_counter()
        if self.side == "px":
            if Path(self.cfg["state_file"]).exists():
                r = self.pxcluster("disconnect", "nodeA", timeout=30)
                info["disconnect_rc"] = r.returncode
                info["disconnect_output"] = (r.stdout + r.stderr)[-400:]
            info["left"] = [p.pid for p in self.tunnel if _alive(p)] + \
                [p.pid for p in netns_procs(self.cfg, "pxtunnel")]
            info["needed_kill"] = stop_procs([psutil.Process(x) for x in set(info["left"]) if psutil.pid_exists(x)])
            info["local_file_left"] = Path(self.cfg["laptop_client_file"]).exists()
        else:
            found = ssh_tunnels(self.cfg)
            info["ssh_tunnels_stopped"] = [p.pid for p in found]
            info["needed_kill"] = stop_procs(found, grace=3.0)
            info["left"] = [p.pid for p in ssh_tunnels(self.cfg)]
        info["teardown_s"] = time.perf_counter() - t
        self.out["stop"] = info


def run_tunnel_inner(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    H.install_time_limit(cfg["timeout"])
    tmp = Path(cfg["tmp"])
    os.environ["IPYTHONDIR"] = str(tmp / "laptop-ipython")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [cfg["pxf_pythonpath"]] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["PXF_TUNNEL"] = cfg["pxtunnel"]
    # the stock client's `ssh` (pexpect): the test cluster's config; SIGHUP ignored (see the
    # README: otherwise the backgrounded `ssh -f` loses a race with the pty hang-up here)
    bindir = tmp / "laptop-bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "ssh"
    wrapper.write_text(f"#!/bin/sh\ntrap '' HUP\nexec /usr/bin/ssh -F '{cfg['ssh_config']}' \"$@\"\n")
    wrapper.chmod(0o755)
    os.environ["PATH"] = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    import ipyparallel  # noqa: F401  (imports before any timing)
    import numpy  # noqa: F401

    arr = payload(cfg["push_mib"])
    res = {"machine_before": H.machine_load(), "lifecycles": [], "client_host": socket.gethostname()}
    print(f"tunnel: laptop {socket.gethostname()}, machine load {res['machine_before']}", flush=True)
    rc_exit = 0
    try:
        for rep in range(-1, cfg["reps"]):    # rep -1: untimed warm-up round
            order = ["px", "stock"] if rep % 2 == 0 else ["stock", "px"]
            for side in order:
                s = Side(side, rep, cfg, env)
                t0 = time.perf_counter()
                try:
                    s.connect()
                    s.workloads(arr)
                except (H.HardTimeout, KeyboardInterrupt):
                    raise
                except Exception as e:  # noqa: BLE001
                    s.out["error"] = f"{type(e).__name__}: {e}"[:3000]
                    s.out["traceback"] = traceback.format_exc()[-3000:]
                    print(f"ERROR tunnel rep {rep + 1} {side}: {s.out['error'][:1500]}", flush=True)
                    rc_exit = 1
                finally:
                    s.close()
                s.out["wall_s"] = time.perf_counter() - t0
                res["lifecycles"].append(s.out)
                m, st = s.out["metrics"], s.out["startup"]
                fr = H.median(x["foreign"] for x in s.out["cpu"].values())
                tag = "warm-up" if rep < 0 else f"rep {rep + 1}/{cfg['reps']}"
                extra = (f"connect cmd {fmt(st.get('connect_cmd_s'))}s" if side == "px"
                         else f"scp {fmt(st.get('scp_s'))}s, {s.out.get('ssh_tunnel_processes')} ssh")
                extra += f", Client() {fmt(st.get('client_s'))}s, 1st apply {fmt(st.get('first_apply_s'))}s"
                print(f"tunnel {tag} {side:<5} setup {fmt(m.get('setup'))}s ({extra}) | apply "
                      f"{fmt(m.get('apply'))} ms | push {fmt(m.get('push'))} MiB/s | foreign load {fmt(fr, 0)}% | "
                      f"{s.out['wall_s']:.0f}s", flush=True)
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"ERROR: {res['error']}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        signal.alarm(0)
        for p in ssh_tunnels(cfg) + netns_procs(cfg, "pxtunnel"):
            stop_procs([p], grace=2.0)
    res["machine_after"] = H.machine_load()
    Path(cfg["res_path"]).write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    return rc_exit


# ============================================================================ part 2: outer

def run_tunnel(cfg: dict, tmp: Path, budget: float) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    import hosts as hostsmod  # tests/integration/hosts.py

    out = {}
    hosts = None
    started = []
    inner = None
    try:
        t = time.perf_counter()
        try:
            hosts = hostsmod.make_hosts(("nodeA", "nodeC"))
        except hostsmod.HostsUnavailable as e:
            out["skipped"] = f"cannot make network namespaces here: {e}"
            print(f"tunnel: skipped: {out['skipped']}", flush=True)
            return out
        out["hosts_setup_s"] = time.perf_counter() - t
        out["hosts"] = {n.name: n.ip for n in hosts.nodes.values()}
        A, C = hosts["nodeA"], hosts["nodeC"]
        wd = tmp / "tunnel"
        wd.mkdir()
        prof = wd / "remote_profile"
        env = dict(H.MPI_ENV, PYTHONPATH=cfg["pxf_pythonpath"], PXF_PYTHONPATH=cfg["pxf_pythonpath"],
                   PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        ctl_argv = [cfg["pxcontroller"], f"--profile-dir={prof}", "--ip=127.0.0.1", "--ssh=nodeA"]
        job_argv = ["mpirun", "-n", str(N_RANKS), *hosts.mpirun_args(), "-x", "PYTHONPATH", "-x",
                    "PXF_PYTHONPATH", cfg["pxengine"], f"--profile-dir={prof}"]
        out["argv"] = {"controller": ctl_argv, "job": job_argv}
        with open(wd / "controller.log", "wb") as log:
            ctl = A.popen(ctl_argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(ctl)
        cf, ef = prof / "security" / "ipcontroller-client.json", prof / "security" / "ipcontroller-engine.json"
        deadline = time.monotonic() + 30
        while True:
            try:
                ok = "pxf_fabric" in json.loads(ef.read_text()) and "registration" in json.loads(cf.read_text())
            except (OSError, ValueError):
                ok = False
            if ok:
                break
            if ctl.poll() is not None or time.monotonic() > deadline:
                raise H.HarnessError("controller on nodeA: no connection files\n"
                                     + H.log_tail(wd / "controller.log"))
            time.sleep(0.05)
        with open(wd / "engines.log", "wb") as log:
            job = A.popen(job_argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(job)
        info = json.loads(cf.read_text())
        if info.get("ssh") != "nodeA" or info.get("interface") != "tcp://127.0.0.1":
            raise H.HarnessError(f"client file: ssh {info.get('ssh')!r}, interface {info.get('interface')!r}")
        # both engines registered before any timing (a client on nodeA itself)
        r = A.python("import ipyparallel as ipp\n"
                     f"rc = ipp.Client({str(cf)!r}, timeout=30)\n"
                     "rc.wait_for_engines(2, timeout=60, interactive=False)\nprint(rc.ids)\nrc.close()",
                     timeout=90, env={"PYTHONDONTWRITEBYTECODE": "1"})
        if r.returncode != 0 or "[0, 1]" not in r.stdout:
            raise H.HarnessError(f"engines did not register: {r.stdout}{r.stderr}\n"
                                 + H.log_tail(wd / "engines.log"))
        # laptop's known_hosts: nodeA's host key, prepared (no --accept-new-host-key)
        kh = wd / "laptop_known_hosts"
        key = " ".join((hosts.workdir / "hostkey.pub").read_text().split()[:2])
        kh.write_text(f"nodea,{A.ip} {key}\n")
        icfg = dict(cfg)
        icfg.update({
            "tmp": str(wd), "profile": str(prof), "client_file": str(cf),
            "remote_ports": sorted({v for k, v in info.items() if isinstance(v, int) and k != "pid" and v > 0}),
            "ssh_config": str(hosts.ssh_config), "known_hosts": str(kh), "laptop_netns": C.netns,
            "state_file": str(wd / "laptop-ipython" / "profile_nodeA" / "security" / "pxtunnel-default.json"),
            "laptop_client_file": str(wd / "laptop-ipython" / "profile_nodeA" / "security" / "ipcontroller-client.json"),
            "controller_pid": ctl.pid, "mpirun_pid": job.pid, "nodeA_sshd_pid": A.sshd_pid,
            "res_path": str(wd / "result.json"), "timeout": max(30.0, budget)})
        (wd / "cfg.json").write_text(json.dumps(icfg))
        out["config"] = {k: icfg[k] for k in ("remote_ports", "known_hosts", "ssh_config")}
        inner = C.popen([H.PYTHON, str(Path(__file__).resolve()), "--inner", str(wd / "cfg.json")],
                        env={"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"},
                        stdout=None, stderr=None)
        out["inner_rc"] = inner.wait(timeout=budget + 60)
        try:
            out.update(json.loads((wd / "result.json").read_text()))
        except (OSError, ValueError) as e:
            out["error"] = f"no result from the laptop side: {e}"
        out["controller_alive_at_end"] = ctl.poll() is None
        out["job_alive_at_end"] = job.poll() is None
    except (H.HardTimeout, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:4000]
        out["traceback"] = traceback.format_exc()[-3000:]
        print(f"ERROR in part tunnel: {out['error'][:1500]}", flush=True)
    finally:
        if inner is not None and inner.poll() is None:
            try:
                os.killpg(inner.pid, signal.SIGTERM)
                inner.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    os.killpg(inner.pid, signal.SIGKILL)
                except OSError:
                    pass
        stop = {}
        for name, p in reversed(list(zip(("controller", "job"), started))):  # mpirun first
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    stop[f"{name}_needed_sigkill"] = True
            stop[f"{name}_rc"] = p.returncode
        out["stop"] = stop
        if started:
            wd = tmp / "tunnel"
            out["controller_log"] = H.log_problems(wd / "controller.log", 8, r"[Rr]eceived signal 15")
            out["engine_log"] = H.log_problems(wd / "engines.log", 8,
                                               r"[Rr]eceived signal 15|terminated by signal 15")
        if hosts is not None:
            hosts.close()
    return out


# ============================================================================ analysis

def analyse(res: dict) -> dict:
    A = {}
    cv = res.get("curve") or {}
    reps = cv.get("reps") or []
    if reps:
        rows = {}
        for name, unit, what in CURVE_METRICS:
            per = [r for r in reps if name in r.get("cost_pct", {})]
            rows[name] = {
                "hmac": H.summary(r[name]["hmac"] for r in per), "curve": H.summary(r[name]["curve"] for r in per),
                "cost_pct": H.summary(r["cost_pct"][name] for r in per),
                "per_rep_cost_pct": [round(r["cost_pct"][name], 1) for r in per]}
            c = rows[name]["cost_pct"]
            if c.get("n"):
                rows[name]["goal_pct"] = 15.0
                rows[name]["verdict"] = ("MET" + (" (not in every rep)" if c["max"] > 15 else "")
                                         if c["median"] <= 15 else "NOT MET")
        hops = [r["zmq_hop"] for r in reps if "zmq_hop" in r]
        if hops:
            rows["zmq_hop"] = {"plain": H.summary(h["hmac"] for h in hops),
                               "curve": H.summary(h["curve"] for h in hops)}
        A["curve"] = rows
    tn = res.get("tunnel") or {}
    lcs = [lc for lc in tn.get("lifecycles", []) if lc["rep"] >= 0]
    if lcs:
        by = {(lc["side"], lc["rep"]): lc for lc in lcs}
        rlist = sorted({lc["rep"] for lc in lcs})
        rows = {}
        for name, unit, what, kind, goal in TUNNEL_METRICS:
            pairs = []
            for r in rlist:
                s = by.get(("stock", r), {}).get("metrics", {}).get(name)
                p = by.get(("px", r), {}).get("metrics", {}).get(name)
                if s is None or p is None or s <= 0 or p <= 0:
                    continue
                pairs.append({"rep": r, "stock": s, "px": p, "ratio": s / p if kind == "time" else p / s})
            row = {"stock": H.summary(x["stock"] for x in pairs), "px": H.summary(x["px"] for x in pairs),
                   "ratio": H.summary(x["ratio"] for x in pairs), "per_rep": pairs}
            if goal is not None and pairs:
                med, lo = row["ratio"]["median"], row["ratio"]["min"]
                row["goal"] = goal
                row["verdict"] = ("MET" + (" (not in every rep)" if lo < goal else "") if med >= goal
                                  else "NOT MET")
            rows[name] = row
        A["tunnel"] = rows
        # diagnostics: medians over reps
        diag = {}
        for side in ("px", "stock"):
            L = [lc for lc in lcs if lc["side"] == side]
            d = {"connect_cmd_s": H.median(lc["startup"].get("connect_cmd_s") for lc in L if lc["startup"].get("connect_cmd_s") is not None),
                 "scp_s": H.median(lc["startup"].get("scp_s") for lc in L if lc["startup"].get("scp_s") is not None),
                 "client_s": H.median(lc["startup"].get("client_s") for lc in L if lc["startup"].get("client_s") is not None),
                 "first_apply_s": H.median(lc["startup"].get("first_apply_s") for lc in L if lc["startup"].get("first_apply_s") is not None),
                 "teardown_s": H.median(lc.get("stop", {}).get("teardown_s") for lc in L if lc.get("stop", {}).get("teardown_s") is not None)}
            for w in ("apply", "push"):
                for g in ("tunnel", "client", "sshd_sessions", "controller", "job", "foreign"):
                    vals = [lc["cpu"][w][g] for lc in L if w in lc.get("cpu", {}) and g in lc["cpu"][w]]
                    d[f"cpu_{w}_{g}"] = H.median(vals) if vals else None
            diag[side] = d
        A["tunnel_diag"] = diag
    return A


def print_report(res: dict) -> None:
    A = res.get("analysis") or {}
    cfg = res["config"]
    mb = res.get("machine_before", {})
    print()
    print(f"bench_laptop: {cfg['reps']} paired reps, {cfg['calls']} timed apply calls (+{cfg['warmup']} "
          f"warm-up), {cfg['pushes']} timed pushes of {cfg['push_mib']} MiB (+1 untimed) per side and rep"
          + (" [--quick]" if cfg.get("quick") else ""))
    print(f"machine: {mb.get('ncpu')} cores, SHARED with other users (load before: busy "
          f"{mb.get('cpu_busy_pct_1s')}% of all cores, loadavg {mb.get('loadavg_1_5_15')}); absolute "
          f"numbers move with their load, the paired ratios much less")
    cv = A.get("curve")
    if cv:
        print()
        print("== Curve's cost: pxcontroller --curve vs HMAC alone (both up at once on 127.0.0.1, each "
              "with mpiexec -n 2 pxengine; stock 7.1 client)")
        hdr = (f"{'metric':<8} {'unit':<8} {'hmac':>9} {'reps min..max':>15} {'curve':>9} "
               f"{'reps min..max':>15} {'cost':>8} {'paired min..max':>17}  per-rep cost %")
        print(hdr)
        print("-" * len(hdr))
        for name, unit, what in CURVE_METRICS:
            r = cv[name]
            h, c, k = r["hmac"], r["curve"], r["cost_pct"]
            if not k.get("n"):
                continue
            print(f"{name:<8} {unit:<8} {fmt(h['median']):>9} {fmt(h['min']) + '..' + fmt(h['max']):>15} "
                  f"{fmt(c['median']):>9} {fmt(c['min']) + '..' + fmt(c['max']):>15} {k['median']:+7.1f}% "
                  f"{k['min']:+7.1f}..{k['max']:+.1f}%  {r['per_rep_cost_pct']}  goal <= 15 %: {r['verdict']}")
        print("cost = median over reps of the paired (curve time / hmac time - 1); push time = 1/MiB/s")
        z = cv.get("zmq_hop")
        if z:
            print(f"for scale, libzmq alone (pyzmq DEALER -> ROUTER, one tcp://127.0.0.1 hop, same payload): "
                  f"plain {fmt(z['plain']['median'])} MiB/s, CurveZMQ {fmt(z['curve']['median'])} MiB/s "
                  f"(medians over reps); a push crosses two hops (client -> controller -> rank 0)")
        st = ((res.get("curve") or {}).get("sides") or {})
        bits = []
        for side in ("hmac", "curve"):
            ps = st.get(side, {}).get("px_stats") or {}
            if ps:
                bits.append(f"{side}: dropped {sum((ps.get('drops') or {}).values())}, curve handshakes "
                            f"refused {(ps.get('counters') or {}).get('curve.handshake_failed', 0)}")
        if bits:
            print("pxcontroller counters at the end: " + "; ".join(bits))
        so = (res.get("curve") or {}).get("sodium_mib_s")
        if so:
            print(f"and libsodium alone (crypto_secretbox_easy, XSalsa20-Poly1305, one pass over the payload): "
                  f"encrypt {fmt(so['encrypt'])} MiB/s, decrypt {fmt(so['decrypt'])} MiB/s")
    elif res.get("curve", {}).get("error"):
        print(f"\ncurve part failed: {res['curve']['error'][:500]}")
    tn = A.get("tunnel")
    if tn:
        print()
        print("== Through the tunnel: laptop nodeC -> sshd on nodeA (controller --ip=127.0.0.1 --ssh=nodeA "
              "+ mpirun -n 2 pxengine, same cluster for all); px = pxcluster connect (pxtunnel), "
              "stock = ipp.Client(file, sshserver='nodeA')")
        hdr = (f"{'metric':<15} {'unit':<8} {'stock':>9} {'reps min..max':>15} {'px':>9} "
               f"{'reps min..max':>15} {'ratio':>7} {'paired min..max':>16}  per-rep")
        print(hdr)
        print("-" * len(hdr))
        for name, unit, what, kind, goal in TUNNEL_METRICS:
            r = tn.get(name)
            if not r or not r["ratio"].get("n"):
                continue
            s, p, q = r["stock"], r["px"], r["ratio"]
            per = " ".join(f"{x['ratio']:.2f}" for x in r["per_rep"])
            v = f"  goal >= {goal:g}x: {r['verdict']}" if "verdict" in r else ""
            print(f"{name:<15} {unit:<8} {fmt(s['median']):>9} {fmt(s['min']) + '..' + fmt(s['max']):>15} "
                  f"{fmt(p['median']):>9} {fmt(p['min']) + '..' + fmt(p['max']):>15} {fmt(q['median']):>6}x "
                  f"{fmt(q['min']) + '..' + fmt(q['max']):>16}  [{per}]{v}")
        print("ratio = median over reps of the paired stock/px (times) or px/stock (MiB/s); > 1: "
              "pxcluster connect better")
        lc_ok = [lc for lc in (res.get("tunnel") or {}).get("lifecycles", []) if lc["rep"] >= 0]
        slow = {side: [(round(lc["apply_calls"]["max"]), lc["apply_calls"].get("over_100ms"))
                       for lc in lc_ok if lc["side"] == side and "apply_calls" in lc] for side in ("px", "stock")}
        print(f"  slowest apply per rep, ms (and calls > 100 ms): px {slow['px']}, stock {slow['stock']}")
        d = A.get("tunnel_diag", {})
        for side in ("px", "stock"):
            x = d.get(side, {})
            what = (f"pxcluster connect {fmt(x.get('connect_cmd_s'))}s, Client(profile=) {fmt(x.get('client_s'))}s"
                    if side == "px" else f"(scp {fmt(x.get('scp_s'))}s), Client(sshserver=) {fmt(x.get('client_s'))}s")
            what += f", first apply {fmt(x.get('first_apply_s'))}s"
            if side == "px":
                what += f"; pxcluster disconnect {fmt(x.get('teardown_s'))}s"
            print(f"  {side:<5} set-up parts: {what} | CPU % of a core "
                  f"during push: tunnel {fmt(x.get('cpu_push_tunnel'), 0)}, sshd {fmt(x.get('cpu_push_sshd_sessions'), 0)}, "
                  f"client {fmt(x.get('cpu_push_client'), 0)}, controller {fmt(x.get('cpu_push_controller'), 0)}; "
                  f"during apply: tunnel {fmt(x.get('cpu_apply_tunnel'), 0)}, foreign {fmt(x.get('cpu_apply_foreign'), 0)}")
    elif res.get("tunnel", {}).get("skipped"):
        print(f"\ntunnel part skipped: {res['tunnel']['skipped']}")
    elif res.get("tunnel", {}).get("error"):
        print(f"\ntunnel part failed: {res['tunnel']['error'][:500]}")
    # clean-up and errors
    tnr = res.get("tunnel") or {}
    lcs = tnr.get("lifecycles", [])
    errs = [f"tunnel rep {lc['rep'] + 1} {lc['side']}: {lc['error'][:200]}" for lc in lcs if "error" in lc]
    for e in errs:
        print("error in " + e)
    left = [(lc["side"], lc["rep"], lc["stop"].get("left")) for lc in lcs if lc.get("stop", {}).get("left")]
    ssh_n = sorted({lc.get("ssh_tunnel_processes") for lc in lcs if lc.get("ssh_tunnel_processes")})
    if lcs:
        print(f"tunnel clean-up: {'nothing left after disconnect / stopping the ssh tunnels' if not left else f'LEFT: {left}'}; "
              f"stock tunnel processes per client: {ssh_n}")
    for part in ("curve", "tunnel"):
        p = res.get(part) or {}
        logs = []
        for side, x in (p.get("sides") or {"": p}).items():
            for k in ("controller_log", "engine_log"):
                if x.get(k, {}).get("count"):
                    logs.append(f"{side} {k}: {x[k]['count']} ({x[k]['lines'][:1]})")
        if logs:
            print(f"{part} logs with warnings/errors: " + "; ".join(logs))
    if "total_wall_s" in res:
        print(f"run took {res['total_wall_s'] / 60:.1f} min")


# ============================================================================ main

binfo = H.binary_info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, help="paired reps per part (default 5, quick 2)")
    ap.add_argument("--calls", type=int, help="timed apply calls per side and rep (default 200, quick 30)")
    ap.add_argument("--warmup", type=int, help="untimed apply calls first (default 20, quick 5)")
    ap.add_argument("--pushes", type=int, help="timed pushes per side and rep (default 3, quick 1)")
    ap.add_argument("--push-mib", type=int, default=100, help="push payload, MiB (default 100)")
    ap.add_argument("--parts", default="curve,tunnel", help="curve,tunnel (default both)")
    ap.add_argument("--quick", action="store_true", help="about a minute: 2 reps, 30 calls, 1 push")
    ap.add_argument("--call-timeout", type=float, default=60.0, help="limit for any one call, s")
    ap.add_argument("--timeout", type=float, help="hard limit for the whole run, s (default 480, quick 240)")
    ap.add_argument("--px-binary", default=None, help="pxcontroller (default $PXF_CONTROLLER or build/bin)")
    ap.add_argument("--pxengine", default=None, help="pxengine (default $PXF_PXENGINE or build/bin)")
    ap.add_argument("--pxtunnel", default=None, help="pxtunnel (default $PXF_TUNNEL or build/bin)")
    ap.add_argument("--json", default=None, help="default bench/results/laptop-<UTC>[-quick].json")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--report", metavar="JSON", help="run nothing: reprint the tables of a saved run")
    ap.add_argument("--inner", metavar="CFG", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        return run_tunnel_inner(a.inner)
    if a.report:
        res = json.loads(Path(a.report).read_text())
        res["analysis"] = analyse(res)
        print_report(res)
        return 0
    d = (dict(reps=2, calls=30, warmup=5, pushes=1, timeout=240.0) if a.quick
         else dict(reps=5, calls=200, warmup=20, pushes=3, timeout=480.0))
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    parts = [p for p in a.parts.split(",") if p]
    if [p for p in parts if p not in ("curve", "tunnel")]:
        ap.error(f"unknown parts {parts}")
    H.install_time_limit(a.timeout)

    px_path, pxe_path = H.px_binary(a.px_binary), H.pxengine_binary(a.pxengine)
    pxt_path = a.pxtunnel or os.environ.get("PXF_TUNNEL") or str(REPO / "build" / "bin" / "pxtunnel")
    import ipyparallel
    import zmq

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.json) if a.json else HERE / "results" / f"laptop-{stamp}{'-quick' if a.quick else ''}.json"
    tmp = Path(tempfile.mkdtemp(prefix="pxbench-laptop-"))
    # Run copies (a rebuild of build/bin during the run must not mix builds).
    snap = tmp / "snapshot"
    (snap / "bin").mkdir(parents=True)
    binaries = {"pxcontroller": binfo(px_path), "pxengine": binfo(pxe_path), "pxtunnel": binfo(pxt_path)}
    cfg = {"reps": a.reps, "calls": a.calls, "warmup": a.warmup, "pushes": a.pushes,
           "push_mib": a.push_mib, "quick": a.quick, "call_timeout": a.call_timeout,
           "timeout": a.timeout, "parts": parts, "ping_ms": PING_MS,
           "pxcontroller": str(shutil.copy2(px_path, snap / "bin" / "pxcontroller")),
           "pxengine": str(shutil.copy2(pxe_path, snap / "bin" / "pxengine")),
           "pxtunnel": str(shutil.copy2(pxt_path, snap / "bin" / "pxtunnel"))}
    shutil.copytree(REPO / "python" / "pxfabric", snap / "python" / "pxfabric",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cfg["pxf_pythonpath"] = str(snap / "python")
    sshv = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10).stderr.strip()
    res = {"bench": "laptop", "started_utc": stamp, "config": cfg, "binaries": binaries,
           "mpi_env": H.MPI_ENV,
           "versions": {"python": platform.python_version(), "ipyparallel": ipyparallel.__version__,
                        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "openssh": sshv,
                        "zmq_has_curve": zmq.has("curve")},
           "machine_before": H.machine_load()}
    print(f"bench_laptop: parts {parts}, reps={a.reps} calls={a.calls} pushes={a.pushes}x{a.push_mib} MiB"
          f"{' [--quick]' if a.quick else ''}; machine: {res['machine_before']} (2 cores, shared)", flush=True)
    t_all = time.perf_counter()
    rc_exit = 0
    try:
        if "curve" in parts:
            res["curve"] = run_curve(cfg, tmp)
            rc_exit |= 1 if "error" in res["curve"] else 0
        if "tunnel" in parts:
            res["tunnel"] = run_tunnel(cfg, tmp, budget=max(30.0, H.remaining_alarm() - 40))
            t = res["tunnel"]
            rc_exit |= 1 if ("error" in t or t.get("inner_rc") or
                             any("error" in lc for lc in t.get("lifecycles", []))) else 0
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"bench_laptop: {res['error']}", file=sys.stderr, flush=True)
        rc_exit = 1
    finally:
        signal.alarm(0)
        for c in list(H._ALL_CLUSTERS):
            try:
                c.stop()
            except Exception:  # noqa: BLE001
                pass
    res["machine_after"] = H.machine_load()
    res["total_wall_s"] = time.perf_counter() - t_all
    res["analysis"] = analyse(res)
    print_report(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, sort_keys=True, default=str) + "\n")
    print(f"JSON: {out}")
    if a.keep or rc_exit:
        print(f"temp dir kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc_exit


if __name__ == "__main__":
    sys.exit(main())
