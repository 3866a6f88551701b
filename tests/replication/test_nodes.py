"""The cluster description's nodes: roles and addresses, what `replfs init --viewserver
... --server ...` writes and `init --here` makes, a description of before nodes had
addresses loading as all-local, and bad input refused in one line that loses nothing."""

import json

import pytest

from mounthelp import replfs
from replfs.errors import ReplfsError
from replfs.replication.config import CLIENT, VIEWSERVER, ClusterConfig
from replfs.replication.nodes import parse_endpoint
from replfs.tools.cli import main

pytestmark = pytest.mark.timeout(120)

SPREAD = ["--viewserver", "10.9.0.1:7000", "--server", "10.9.0.2:7001",
          "--server", "b=10.9.0.3:7001", "--server", "10.9.0.2:7002",
          "--server", "[fd00::4]:7001", "--groups", "2", "--size", "16M"]


def test_init_over_several_machines_writes_the_description_then_each_array_here(tmp_path):
    d = tmp_path / "c"
    r = replfs("init", d, *SPREAD)
    assert "--here S" in r.stdout and sorted(p.name for p in d.iterdir()) == [
        "cluster.json", "secret"]                   # no arrays: each on its own machine
    cfg = ClusterConfig.load(d)
    assert cfg.groups == {0: ["s0", "b"], 1: ["s2", "s3"]} and not cfg.one_machine
    assert cfg.direct("b") == ("10.9.0.3", 7001) and cfg.direct("b").node == "b"
    assert cfg.direct("s3") == ("fd00::4", 7001) and cfg.where("s3") == "[fd00::4]:7001"
    assert cfg.direct(VIEWSERVER) == ("10.9.0.1", 7000) and cfg.viewservers == [VIEWSERVER]
    assert cfg.nodes[CLIENT].role == "client" and CLIENT not in cfg.ports
    desc = json.loads((d / "cluster.json").read_text())
    assert desc["nodes"]["b"] == {"role": "server", "host": "10.9.0.3", "port": 7001}

    # on b's machine (a copy of the two files): its array only, where the description says
    data = tmp_path / "elsewhere" / "b"
    desc["nodes"]["b"]["data"] = str(data)
    (d / "cluster.json").write_text(json.dumps(desc))
    r = replfs("init", d, "--here", "b")
    assert "replfs server" in r.stdout and (data / "array.json").exists()
    assert not (d / "b").exists() and ClusterConfig.load(d).server_dir("b") == str(data)
    r = replfs("init", d, "--here", "b", check=False)
    assert r.returncode != 0 and "not empty" in r.stderr
    r = replfs("server", d, "b", check=False)        # this is not b's machine
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot listen on 10.9.0.3:7001" in r.stderr and "the machine that has" in r.stderr
    r = replfs("server", d, "s0", check=False)
    assert r.returncode != 0 and "--here s0" in r.stderr and "Traceback" not in r.stderr
    r = replfs("up", d, tmp_path, check=False)
    assert r.returncode != 0 and "spread over machines" in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--viewserver", "10.9.0.1:7000"], "needs both"),
    (["--viewserver", "10.9.0.1", "--server", "10.9.0.2:1", "--groups", "1"], "[NAME=]HOST:PORT"),
    (["--viewserver", "10.9.0.1:7000", "--server", "vs=10.9.0.2:1", "--groups", "1"],
     "given twice"),
    (["--viewserver", "10.9.0.1:7000", "--server", "10.9.0.1:7000", "--groups", "1"],
     "listen on 10.9.0.1:7000"),
    (["--viewserver", "10.9.0.1:7000", "--server", "10.9.0.2:1", "--groups", "2"],
     "do not make 2 groups"),
])
def test_init_refuses_bad_nodes_in_one_line(tmp_path, capsys, args, says):
    assert main(["init", str(tmp_path / "c"), *args]) != 0      # the command, in-process
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("text, says", [("10.9.0.2:70000", "[NAME=]HOST:PORT"),
                                        ("10.9.0.2", "[NAME=]HOST:PORT"),
                                        ("bad name=10.9.0.2:1", "not a node name"),
                                        ("x y:1", "not a host")])
def test_bad_endpoints(text, says):
    with pytest.raises(ReplfsError) as exc:
        parse_endpoint(text, "s0", "--server")
    assert says in str(exc.value) and repr(text) in str(exc.value)


def test_a_description_of_before_nodes_loads_all_local(tmp_path):
    cfg = ClusterConfig.create(tmp_path / "c", groups=1)
    path = tmp_path / "c" / "cluster.json"
    d = json.loads(path.read_text())
    d["ports"] = {n: node["port"] for n, node in d.pop("nodes").items() if "port" in node}
    path.write_text(json.dumps(d))
    old = ClusterConfig.load(cfg.dir)
    assert old.ports == cfg.ports and old.one_machine and old.nodes == cfg.nodes
    assert old.direct("s1") == ("127.0.0.1", cfg.ports["s1"])


@pytest.mark.parametrize("edit, says", [
    (lambda d: d["nodes"]["s1"].update(role="disk"), "role 'disk'"),
    (lambda d: d["nodes"]["s1"].update(port="x"), "port 'x'"),
    (lambda d: d["nodes"]["s1"].pop("host"), "not a host"),
    (lambda d: d["nodes"]["s1"].update(data="rel/dir"), "absolute directory"),
    (lambda d: d["nodes"].pop("vs"), "no view-server node"),
    (lambda d: d["groups"]["0"].append("client"), "not a server node"),
    (lambda d: d["nodes"].update(s9=[1]), "must be an object"),
])
def test_a_damaged_description_is_refused_in_one_line(tmp_path, edit, says):
    cfg = ClusterConfig.create(tmp_path / "c", groups=1)
    path = tmp_path / "c" / "cluster.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ReplfsError) as exc:
        ClusterConfig.load(cfg.dir)
    assert says in str(exc.value) and str(path) in str(exc.value)
    if "vs" not in d["nodes"]:       # and through the command: one line
        r = replfs("status", cfg.dir, check=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_server_is_found_by_its_name_given_either_way(tmp_path):
    from replfs.tools.cluster import _parse_cmdline
    for cmd in (["replfs", "server", "c", "s1"], ["replfs", "server", "c", "--name", "s1"],
                ["python3", "-m", "replfs.tools.cli", "server", "--name=s1", "c"]):
        assert _parse_cmdline(cmd, str(tmp_path)) == ("s1", str(tmp_path / "c"), None, False)
    assert _parse_cmdline(["replfs", "server", "c"], str(tmp_path)) is None


def test_a_server_whose_port_is_taken_says_so_in_one_line(tmp_path):
    import socket
    d = tmp_path / "c"
    replfs("init", d, "--groups", "1", "--replicas", "1", "--size", "16M")
    cfg = ClusterConfig.load(d)
    with socket.socket() as s:
        s.bind(cfg.direct("s0"))
        s.listen()
        r = replfs("server", d, "s0", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot listen on 127.0.0.1:" in r.stderr and "another port" in r.stderr
