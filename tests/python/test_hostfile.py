"""The pure parts of ``pxfabric.hostfile``: hostfile parsing, the user's address settings, the
rsh agent, the host summary. (Hosts, ssh and the check itself: tests/integration/
test_hosts_pxcluster.py.)"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from pxfabric import hostfile as H  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_parse_open_mpi_format():
    text = ("# a comment\n"
            "\n"
            "nodeA slots=2\n"
            "nodeB   slots = 4  max_slots=8   # trailing comment\n"
            "alice@nodeC\n"
            "nodeD cpu=3 username=bob\n"
            "10.0.0.7 slots=1 max-slots=1\n")
    e = H.parse_hostfile_text(text, "hf")
    assert [(x.name, x.slots, x.max_slots, x.lineno) for x in e] == [
        ("nodeA", 2, None, 3), ("nodeB", 4, 8, 4), ("nodeC", None, None, 5),
        ("nodeD", 3, None, 6), ("10.0.0.7", 1, 1, 7)]
    assert e[2].target == "alice@nodeC" and e[3].target == "bob@nodeD"
    assert e[0].target == "nodeA" and e[1].where == "hf line 4"


@pytest.mark.parametrize("line, words", [
    ("nodeA slots=two", ["line 2", "slots must be a non-negative integer", "'two'"]),
    ("nodeA cores=2", ["line 2", "unknown keyword 'cores'"]),
    ("nodeA slots", ["line 2", "'slots' is not KEY=VALUE"]),
    ("slots=2", ["line 2", "expected a host name first"]),
    ("nodeA slots=4 max_slots=2", ["line 2", "max_slots (2) is less than slots (4)"]),
])
def test_parse_errors_name_the_line(line, words):
    with pytest.raises(H.HostfileError) as info:
        H.parse_hostfile_text(f"nodeZ\n{line}\n", "myhosts")
    msg = str(info.value)
    assert msg.startswith("myhosts line 2: ")
    for w in words:
        assert w in msg


def test_parse_file_errors(tmp_path):
    with pytest.raises(H.HostfileError, match="cannot read it"):
        H.parse_hostfile(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(H.HostfileError, match="names no host"):
        H.parse_hostfile(empty)


def test_shipped_example_parses():
    e = H.parse_hostfile(REPO / "hostfiles" / "two-nodes")
    assert [(x.name, x.slots) for x in e] == [("nodeA", 2), ("nodeB", 2)]


def test_unique_hosts_keeps_first_line():
    e = H.parse_hostfile_text("a slots=1\nb\na slots=3\n")
    assert [(x.name, x.lineno) for x in H.unique_hosts(e)] == [("a", 1), ("b", 2)]


def test_address_settings_command_line_and_config(tmp_path):
    assert H.address_settings([]) == {}
    assert H.address_settings(["--ping", "100"]) == {}
    assert H.address_settings(["--ip=127.0.0.1"]) == {"ip": "127.0.0.1"}
    assert H.address_settings(["--engine-ip", "10.0.0.1", "--IPController.client_ip='*'"]) == \
        {"engine-ip": "10.0.0.1", "client-ip": "*"}
    assert H.address_settings(["--HubFactory.engine_ip=10.1.1.1"]) == {"engine-ip": "10.1.1.1"}
    (tmp_path / "ipcontroller_config.py").write_text(
        "c = get_config()\nc.HubFactory.client_ip = '10.0.0.1'  # the note's spelling\n"
        "c.IPController.engine_ip = \"10.0.0.2\"\n")
    assert H.address_settings([], tmp_path) == {"client-ip": "10.0.0.1", "engine-ip": "10.0.0.2"}
    # the command line wins
    assert H.address_settings(["--engine-ip=*"], tmp_path)["engine-ip"] == "*"


def test_local_hosts_keep_the_controller_on_loopback():
    here = socket.gethostname()
    e = H.parse_hostfile_text(f"localhost slots=2\n{here} slots=2\n127.0.0.1\n")
    plan = H.choose_controller_address(e)
    assert plan.args == [] and plan.engine_ip == "127.0.0.1" and plan.warning is None
    assert "this host" in plan.reason


def test_user_choice_stands_and_loopback_is_fine_locally():
    e = H.parse_hostfile_text("localhost slots=2\n")
    plan = H.choose_controller_address(e, ["--ip=127.0.0.1"])
    assert plan.args == [] and plan.engine_ip == "127.0.0.1" and plan.warning is None
    assert "as given: --ip=127.0.0.1" in plan.reason


def test_unresolvable_host_names_host_and_line():
    e = H.parse_hostfile_text("localhost\n# x\nno-such-host.invalid slots=2\n", "hf")
    with pytest.raises(H.HostfileError) as info:
        H.choose_controller_address(e)
    msg = str(info.value)
    assert "no-such-host.invalid does not resolve" in msg and "hf line 3" in msg
    assert "/etc/hosts" in msg


def test_rsh_agent_sources():
    env = {"PATH": "/usr/bin:/bin"}
    assert H.rsh_agent(["--mca", "plm_rsh_agent", "ssh -F /x/cfg"], env) == ["ssh", "-F", "/x/cfg"]
    assert H.rsh_agent([], {**env, "OMPI_MCA_plm_rsh_agent": "ssh -p 2222"}) == ["ssh", "-p", "2222"]
    # the command line beats the environment
    assert H.rsh_agent(["-mca", "plm_rsh_agent", "ssh -q"],
                       {**env, "OMPI_MCA_plm_rsh_agent": "ssh -p 2222"}) == ["ssh", "-q"]
    assert H.rsh_agent([], env)[0] in ("ssh", "rsh")       # Open MPI's "ssh : rsh"
    cmd = H.ssh_command(["ssh", "-F", "/x/cfg"], "bob@nodeB")
    assert cmd == ["ssh", "-F", "/x/cfg", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                   "bob@nodeB", "/bin/sh", "-s"]


def test_group_and_format_hosts():
    engines = {"3": {"host": "nodeB", "rank": 3}, "0": {"host": "nodeA", "rank": 0},
               "1": {"host": "nodeA", "rank": 1}, "2": {"host": "nodeB", "rank": 2}}
    groups = H.group_hosts(engines)
    assert groups == [{"host": "nodeA", "engines": [0, 1], "ranks": [0, 1]},
                      {"host": "nodeB", "engines": [2, 3], "ranks": [2, 3]}]
    assert H.format_hosts(groups) == "nodeA (ranks 0-1), nodeB (ranks 2-3)"
    rr = H.group_hosts({str(i): {"host": "AB"[i % 2], "rank": i} for i in range(5)})
    assert H.format_hosts(rr) == "A (ranks 0,2,4), B (ranks 1,3)"
    stock = H.group_hosts({"0": {"host": "10.0.0.2", "rank": None}})
    assert H.format_hosts(stock) == "10.0.0.2 (engine 0)"
    assert H.format_hosts(None) == "-"


def test_rank_errors(tmp_path):
    log = tmp_path / "engines.log"
    log.write_text("INFO gateway: registering\n"
                   "CRITICAL pxengine: registration failed: cannot reach the controller at "
                   "tcp://127.0.0.1:1 from this host: connection refused\n"
                   "----\nmpirun detected that one or more processes exited\n")
    assert H.rank_errors(log) == [log.read_text().splitlines()[1]]
    assert H.rank_errors(tmp_path / "missing") == []


def test_local_check_runs_the_steps_without_ssh():
    """A hostfile of this host only: the check runs its steps here (no ssh), against a
    temporary listener on loopback."""
    e = H.parse_hostfile_text("localhost slots=1\n")
    checks = H.check_hosts(e, engine_argv=["/nonexistent/pxengine"], timeout=30)
    assert [(c.host, c.ok, c.step) for c in checks] == [("localhost", False, "pxengine")]
    assert checks[0].line() == ("localhost: pxengine not found at /nonexistent/pxengine: "
                                "install pxfabric there (same path) or set PXF_ENGINE")
