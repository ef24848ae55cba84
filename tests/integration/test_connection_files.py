"""Cross-checks of the C++ connection-file code (driven through build/bin/connfile_tool) against
stock ipyparallel 7.1:

* files written by C++ are loaded by the real ``ipyparallel.Client`` and the real ``ipengine``,
  which connect to every port they name (seen through zmq socket monitors on sockets the test
  binds) and sign with the key and scheme they name;
* files written by a real stock ``ipcontroller`` are read by C++ field for field and re-emitted
  byte for byte;
* profile/cluster-id resolution agrees with IPython's own application machinery.

Run with: /usr/bin/python3 -m pytest tests/integration/test_connection_files.py
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import zmq
from jupyter_client.session import Session
from zmq.utils.monitor import recv_monitor_message

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
from pxfabric import processes  # noqa: E402  (stopping by PID, shared with pxcluster and bench/)

TOOL = REPO / "build" / "bin" / "connfile_tool"
PYTHON = "/usr/bin/python3"
TOOL_TIMEOUT = 30
START_TIMEOUT = 60  # stock controller / engine start-up on a busy 2-core machine
STOP_TIMEOUT = 10
CONNECT_TIMEOUT = 30

CLIENT_KEYS = ["ssh", "interface", "registration", "control", "mux", "task", "task_scheme", "iopub",
               "notification", "broadcast", "key", "curve_serverkey", "location", "pack", "unpack",
               "signature_scheme"]
ENGINE_KEYS = ["ssh", "interface", "registration", "control", "mux", "task", "iopub", "hb_ping",
               "hb_pong", "broadcast", "key", "curve_serverkey", "location", "pack", "unpack",
               "signature_scheme"]


@pytest.fixture(scope="module", autouse=True)
def tool_built():
    if not TOOL.is_file():
        pytest.fail(f"{TOOL} is missing: build first (bash scripts/build.sh)", pytrace=False)


def tool(*args, stdin=None, env=None, check=True):
    proc = subprocess.run([str(TOOL), *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT, env=env)
    if check:
        assert proc.returncode == 0, f"connfile_tool {args} exited {proc.returncode}: {proc.stderr}"
    return proc


def resolve(*args, env=None):
    return json.loads(tool("resolve", *args, env=env).stdout)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL; then any descendant still alive, each by PID."""
    try:  # a reaped proc's PID is no longer ours
        tree = processes.descendants(psutil.Process(proc.pid)) if proc.poll() is None else []
    except psutil.NoSuchProcess:
        tree = []
    if tree:
        processes.terminate(tree[:1], STOP_TIMEOUT)
        proc.wait(STOP_TIMEOUT)
    processes.kill(tree[1:])


class Bound:
    """A socket bound to a random loopback port, with a monitor that sees peers connect."""

    def __init__(self, ctx: zmq.Context, kind: int):
        self.socket = ctx.socket(kind)
        self.socket.linger = 0
        if kind == zmq.SUB:
            self.socket.subscribe(b"")
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED)

    def wait_accepted(self, timeout: float) -> bool:
        if self.monitor.poll(int(timeout * 1000)):
            return recv_monitor_message(self.monitor)["event"] == zmq.EVENT_ACCEPTED
        return False

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)


class FakeHub(threading.Thread):
    """Answers one request on the registration ROUTER with `reply_type`/`reply` after checking
    (via jupyter_client's Session) that it was signed with the connection file's key."""

    def __init__(self, reg: Bound, session: Session, want: str, reply_type: str, reply: dict):
        super().__init__(daemon=True)
        self.reg, self.session, self.want = reg, session, want
        self.reply_type, self.reply = reply_type, reply
        self.request = None
        self.error = None

    def run(self):
        try:
            if not self.reg.socket.poll(START_TIMEOUT * 1000):
                raise TimeoutError(f"no {self.want} within {START_TIMEOUT}s")
            idents, msg = self.session.recv(self.reg.socket, mode=0)  # raises on a bad signature
            assert msg["header"]["msg_type"] == self.want, msg["header"]
            self.request = msg
            self.session.send(self.reg.socket, self.reply_type, content=self.reply, parent=msg,
                              ident=idents)
        except Exception as e:  # reported by the test through self.error
            self.error = e


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.mark.parametrize("pack,scheme", [("json", "hmac-sha256"), ("pickle", "hmac-sha512")])
def test_cpp_client_file_drives_the_stock_client(tmp_path, zctx, pack, scheme):
    import ipyparallel

    reg = Bound(zctx, zmq.ROUTER)
    channels = {"mux": Bound(zctx, zmq.ROUTER), "task": Bound(zctx, zmq.ROUTER),
                "control": Bound(zctx, zmq.ROUTER), "broadcast": Bound(zctx, zmq.ROUTER),
                "iopub": Bound(zctx, zmq.PUB), "notification": Bound(zctx, zmq.PUB)}
    key = str(uuid.uuid4())
    info = {"ssh": "", "interface": "tcp://127.0.0.1", "registration": reg.port,
            **{name: b.port for name, b in channels.items()}, "task_scheme": "weighted", "key": key,
            "curve_serverkey": None, "location": socket.gethostname(), "pack": pack, "unpack": pack,
            "signature_scheme": scheme}
    loc = resolve("--profile-dir", tmp_path / "prof", "--cluster-id", "cx1")
    tool("write-client", loc["client_file"], stdin=json.dumps(info))
    assert Path(loc["client_file"]).name == "ipcontroller-cx1-client.json"
    assert os.stat(loc["client_file"]).st_mode & 0o777 == 0o600

    hub = FakeHub(reg, Session(key=key.encode(), signature_scheme=scheme, packer=pack, unpacker=pack),
                  "connection_request", "connection_reply",
                  {"status": "ok", "engines": {"3": "engine-uuid-3"}})
    hub.start()
    client = None
    try:
        # Found through the profile dir + cluster id, like Client(profile=..., cluster_id=...).
        client = ipyparallel.Client(profile_dir=str(tmp_path / "prof"), cluster_id="cx1",
                                    timeout=CONNECT_TIMEOUT)
        hub.join(CONNECT_TIMEOUT)
        assert hub.error is None, hub.error
        assert client.ids == [3]  # the hub's reply arrived and verified with the file's key
        assert client._task_scheme == "weighted"
        assert client.session.key == key.encode()
        assert client.session.signature_scheme == scheme
        assert client.session.packer == pack
        for name, b in channels.items():
            assert client._config[name] == f"tcp://127.0.0.1:{b.port}"
            assert b.wait_accepted(CONNECT_TIMEOUT), f"the client never connected to {name}"
    finally:
        if client is not None:
            client.close(linger=0)
        for b in [reg, *channels.values()]:
            b.close()


def test_cpp_engine_file_drives_the_stock_engine(tmp_path, zctx):
    reg = Bound(zctx, zmq.ROUTER)
    channels = {"mux": Bound(zctx, zmq.ROUTER), "task": Bound(zctx, zmq.ROUTER),
                "control": Bound(zctx, zmq.ROUTER), "iopub": Bound(zctx, zmq.SUB),
                "hb_ping": Bound(zctx, zmq.PUB), "hb_pong": Bound(zctx, zmq.ROUTER)}
    broadcast = [Bound(zctx, zmq.ROUTER), Bound(zctx, zmq.ROUTER)]
    key = str(uuid.uuid4())
    info = {"ssh": "", "interface": "tcp://127.0.0.1", "registration": reg.port,
            **{name: b.port for name, b in channels.items()},
            "broadcast": [b.port for b in broadcast], "key": key, "curve_serverkey": None,
            "location": socket.gethostname(), "pack": "json", "unpack": "json",
            "signature_scheme": "hmac-sha256"}
    loc = resolve("--profile-dir", tmp_path / "prof", "--cluster-id", "ce1")
    tool("write-engine", loc["engine_file"], stdin=json.dumps(info))
    assert Path(loc["engine_file"]).name == "ipcontroller-ce1-engine.json"

    # Engine id 1 must pick broadcast[1 % 2]. connection_info is left empty on purpose: the
    # stock engine takes every port from the file.
    hub = FakeHub(reg, Session(key=key.encode()), "registration_request", "registration_reply",
                  {"status": "ok", "id": 1, "hb_period": 3000, "connection_info": {}})
    hub.start()
    log_path = tmp_path / "engine.log"
    with open(log_path, "wb") as log:
        engine = subprocess.Popen(
            [PYTHON, "-m", "ipyparallel.engine", f"--profile-dir={tmp_path / 'prof'}",
             "--cluster-id=ce1", "--IPEngine.enable_nanny=False", "--log-level=10"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            start_new_session=True)
    try:
        hub.join(START_TIMEOUT)
        assert hub.error is None, f"{hub.error}\n{log_path.read_text(errors='replace')}"
        assert hub.request["content"].get("uuid"), hub.request["content"]
        for name, b in [*channels.items(), ("broadcast[1]", broadcast[1])]:
            assert b.wait_accepted(START_TIMEOUT), (
                f"the engine never connected to {name}\n{log_path.read_text(errors='replace')}")
        assert not broadcast[0].wait_accepted(0.2), "engine 1 connected to broadcast[0]"
        assert engine.poll() is None, log_path.read_text(errors="replace")
    finally:
        stop(engine)
        for b in [reg, *channels.values(), *broadcast]:
            b.close()


def _wait_for_json(path: Path, proc: subprocess.Popen, log_path: Path) -> str:
    """Text of `path` once it holds complete JSON (stock writes in place, not atomically)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ipcontroller exited {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            text = path.read_text()
            json.loads(text)
            return text
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    pytest.fail(f"{path} never appeared:\n{log_path.read_text(errors='replace')}")


def test_stock_controller_files_are_read_by_cpp(tmp_path):
    prof = tmp_path / "prof"
    log_path = tmp_path / "ipcontroller.log"
    with open(log_path, "wb") as log:
        ctl = subprocess.Popen(
            [PYTHON, "-m", "ipyparallel.controller", f"--profile-dir={prof}", "--ip=127.0.0.1",
             "--cluster-id=stk"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            start_new_session=True)
    try:
        loc = resolve("--profile-dir", prof, "--cluster-id", "stk")
        texts = {kind: _wait_for_json(Path(loc[f"{kind}_file"]), ctl, log_path)
                 for kind in ("client", "engine")}
        # Read by C++ while the controller runs (it deletes the files when it stops).
        outputs = {kind: tool(f"read-{kind}", loc[f"{kind}_file"]).stdout for kind in texts}
    finally:
        stop(ctl)
        # stock 7.1 forks its schedulers (same argv) and may do so after our look at the
        # children: stop whatever still names our private profile dir, by PID
        left = [p for p in psutil.process_iter(["cmdline"])
                if str(prof) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
        processes.kill(left, STOP_TIMEOUT)

    for kind, keys in (("client", CLIENT_KEYS), ("engine", ENGINE_KEYS)):
        stock = json.loads(texts[kind])
        assert list(stock) == keys, f"stock {kind} key order changed: {list(stock)}"
        cpp = json.loads(outputs[kind])
        assert cpp == stock, kind
        # Same key order, same indentation, same everything.
        assert outputs[kind] == texts[kind] + "\n", kind
    client, engine = (json.loads(texts[k]) for k in ("client", "engine"))
    assert isinstance(engine["broadcast"], list) and isinstance(client["broadcast"], int)
    assert client["registration"] == engine["registration"]


def test_engine_info_from_environment_variable(tmp_path):
    info = {"ssh": "", "interface": "tcp://127.0.0.1", "registration": 60691, "control": 60692,
            "mux": 60693, "task": 60694, "iopub": 60695, "hb_ping": 60696, "hb_pong": 60697,
            "broadcast": [60698, 60699], "key": "169b682b-337c645951e7d47723061090",
            "curve_serverkey": None, "location": "host", "pack": "json", "unpack": "json",
            "signature_scheme": "hmac-sha256"}
    env = dict(os.environ, IPP_CONNECTION_INFO=json.dumps(info))
    out = tool("read-engine-env", env=env).stdout
    assert json.loads(out) == info
    assert out == json.dumps(info, indent=2) + "\n"

    env["IPP_CONNECTION_INFO"] = json.dumps(dict(info, broadcast=60698))
    bad = tool("read-engine-env", env=env, check=False)
    assert bad.returncode == 2
    assert "IPP_CONNECTION_INFO: key 'broadcast' must be a list of ports" in bad.stderr


def test_cpp_writes_what_python_json_dumps_writes(tmp_path):
    info = {"ssh": "me@login", "interface": "tcp://10.1.2.3", "registration": 1, "control": 2,
            "mux": 3, "task": 4, "task_scheme": "leastload", "iopub": 5, "notification": 6,
            "broadcast": 65535, "key": "k\u00e9y\"\\", "curve_serverkey": "Z" * 40,
            "location": "h\u00f4te-\u65e5\u672c-\U0001f600\x7f", "pack": "json", "unpack": "json",
            "signature_scheme": "hmac-sha256"}
    path = tmp_path / "security" / "ipcontroller-client.json"
    tool("write-client", path, stdin=json.dumps(info))
    # What stock save_connection_dict would have written for the same dict.
    assert path.read_text(encoding="ascii") == json.dumps(info, indent=2)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path.parent).st_mode & 0o777 == 0o700


def test_bad_file_is_reported_with_path_and_fix(tmp_path):
    info = {"ssh": "", "interface": "tcp://127.0.0.1", "registration": "5555", "control": 2,
            "mux": 3, "task": 4, "task_scheme": "leastload", "iopub": 5, "notification": 6,
            "broadcast": 7, "key": "k", "curve_serverkey": None, "location": "", "pack": "json",
            "unpack": "json", "signature_scheme": "hmac-sha256"}
    path = tmp_path / "ipcontroller-client.json"
    path.write_text(json.dumps(info))
    res = tool("read-client", path, check=False)
    assert res.returncode == 2
    assert f"{path}: key 'registration' must be an integer port, got the string \"5555\"" in res.stderr
    # The stock client fails on the same file too, less helpfully.
    import ipyparallel
    with pytest.raises(TypeError):
        ipyparallel.Client(str(path), timeout=1)
    # ...and writing it is refused outright.
    out = tmp_path / "out" / "ipcontroller-client.json"
    res = tool("write-client", out, stdin=json.dumps(info), check=False)
    assert res.returncode == 2 and "must be an integer port" in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------- profile resolution

# IPython's application machinery (as used by every 7.1 app) plus ipyparallel 8.x's
# init_config_from_env, which is where IPP_PROFILE_DIR / IPP_CLUSTER_ID come from.
STOCK_RESOLVER = r"""
import json, os, sys
from ipyparallel.apps.baseapp import BaseParallelApplication

class App(BaseParallelApplication):
    name = "pxf-resolve-check"
    auto_create = True  # as ipcontroller
    def initialize(self, argv=None):
        if "IPP_CLUSTER_ID" in os.environ:
            self.cluster_id = os.environ["IPP_CLUSTER_ID"]
        if "IPP_PROFILE_DIR" in os.environ:
            self.config.ProfileDir.location = os.environ["IPP_PROFILE_DIR"]
        super().initialize(argv)

app = App()
app.initialize(sys.argv[1:])
print(json.dumps({"profile_dir": os.path.abspath(app.profile_dir.location),
                  "cluster_id": app.cluster_id}))
"""


@pytest.mark.parametrize("args,env", [
    ([], {}),
    (["--profile=foo"], {}),
    (["--profile-dir={t}/cli"], {}),
    (["--profile-dir={t}/cli", "--profile=foo"], {}),
    (["--profile-dir={t}/cli"], {"IPP_PROFILE_DIR": "{t}/env"}),
    (["--profile=foo"], {"IPP_PROFILE_DIR": "{t}/env"}),
    ([], {"IPP_PROFILE_DIR": "{t}/env", "IPP_CLUSTER_ID": "envid"}),
    (["--cluster-id=cli"], {"IPP_CLUSTER_ID": "envid"}),
    (["--cluster-id="], {"IPP_CLUSTER_ID": "envid"}),
    (["--ipython-dir={t}/other", "--profile=bar"], {}),
    (["--profile-dir=~/tilde"], {}),
], ids=lambda v: " ".join(v) if isinstance(v, list) else ",".join(v) or "-")
def test_profile_resolution_matches_ipython(tmp_path, args, env):
    t = str(tmp_path)
    args = [a.format(t=t) for a in args]
    # Existing, so stock expands "~" (it creates a missing one under its literal name). Not
    # compared: "~" in IPP_PROFILE_DIR, which 8.x stock cannot handle (RuntimeError "Cannot set
    # profile location more than once" when the folder exists); C++ expands it.
    (tmp_path / "home" / "tilde").mkdir(parents=True)
    (tmp_path / "other").mkdir()  # stock needs an existing --ipython-dir
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("IPP_PROFILE_DIR", "IPP_CLUSTER_ID", "IPYTHON_DIR", "XDG_CONFIG_HOME")}
    full_env.update(HOME=f"{t}/home", IPYTHONDIR=f"{t}/ipd",
                    **{k: v.format(t=t) for k, v in env.items()})
    stock = subprocess.run([PYTHON, "-c", STOCK_RESOLVER, *args], capture_output=True, text=True,
                           timeout=START_TIMEOUT, env=full_env, cwd=t)
    assert stock.returncode == 0, stock.stderr
    expected = json.loads(stock.stdout.strip().splitlines()[-1])
    ours = json.loads(tool("resolve", *args, env=full_env).stdout)
    assert ours["profile_dir"] == expected["profile_dir"]
    assert ours["cluster_id"] == expected["cluster_id"]
