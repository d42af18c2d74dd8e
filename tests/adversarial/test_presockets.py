"""Hole 7, sockets from before enrolment: a socket's cgroup is fixed when it is created, so a
connection a process opened before `interlock enroll --pid` is invisible to the BPF hooks and to
the nft backstop's cgroup match. After the enrol, no such socket may carry a byte.

An unprivileged process (uid 65533) connects to the echo server (TCP, and a connected UDP
socket) and listens on a port, all before it is enrolled; root enrols it; then it writes on
the old sockets, re-connects the aborted TCP socket (connect(AF_UNSPEC), then connect again),
and opens a new connection. The server must receive nothing from the old sockets after the
enrol point; the CLI lists what it closed; the control (the new connection) goes through the
proxy and is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from lab.instance import Instance
from lab.testing import ECHO_PORT, instance_name, stop_process, wait_until

pytestmark = pytest.mark.datapath

AGENT_UID = 65533
AS_AGENT_USER = ["setpriv", "--reuid", str(AGENT_UID), "--regid", str(AGENT_UID), "--clear-groups"]
LISTEN_PORT = 9411


@pytest.fixture(scope="module")
def inst(lab, echo, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "targets": {"echo": {"cidr": [f"{lab.b.addr4}/32", f"{lab.b.addr6}/128"], "port": ECHO_PORT}},
        "rules": [{"name": "bot-may-echo", "agent": "bot", "target": "echo", "decision": "allow"}],
        "default": "deny",
    }))
    i = Instance(lab.a, instance_name("pre"), proxy_port=15811, dns_port=15863, policy=str(policy))
    i.start()
    yield i
    i.close()


AGENT = textwrap.dedent("""
    import ctypes, json, socket, sys
    host, port, lport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    t = socket.socket(fam, socket.SOCK_STREAM)
    t.connect((host, port))
    t.sendall(b"before-enrol\\n")
    assert t.recv(100) == b"before-enrol\\n"
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.connect((host, port))
    u.send(b"u" * 11)
    listener = socket.socket(fam, socket.SOCK_STREAM)
    listener.bind(("", lport))
    listener.listen()
    print(json.dumps({"tcp_port": t.getsockname()[1], "udp_port": u.getsockname()[1]}), flush=True)
    sys.stdin.readline()  # the test enrols us now
    out = {}
    for name, send in (("tcp_after", lambda: t.sendall(b"after-enrol\\n")), ("udp_after", lambda: u.send(b"v" * 37))):
        try:
            send()
            out[name] = "sent"
        except OSError as e:
            out[name] = e.strerror
    # the aborted socket, re-connected: connect(AF_UNSPEC) resets it, then dial the server again
    libc = ctypes.CDLL(None, use_errno=True)
    unspec = (ctypes.c_char * 16)()
    libc.connect(t.fileno(), unspec, 16)
    t.settimeout(5)
    try:
        t.connect((host, port))
        t.sendall(b"reconnected\\n")
        out["reconnect"] = "sent"
    except OSError as e:
        out["reconnect"] = e.strerror
    try:
        listener.settimeout(0.5)
        listener.accept()
        out["listener"] = "accepted"
    except OSError as e:
        out["listener"] = e.strerror or str(e)
    n = socket.create_connection((host, port), timeout=5)
    n.sendall(b"after-enrol-new\\n")
    out["new_echo"] = n.recv(100).decode()
    n.close()
    print(json.dumps(out), flush=True)
""")


def test_sockets_from_before_enrolment_carry_nothing_after_it(inst, lab, echo):
    before_tcp = len(echo.seen("tcp"))
    p = lab.a.popen([*AS_AGENT_USER, sys.executable, "-c", AGENT, lab.b.addr4, str(ECHO_PORT), str(LISTEN_PORT)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(p.stdout.readline())
        # the server saw the connection and the bytes sent before the enrol
        assert wait_until(lambda: [d for d in echo.seen("tcp-data") if d["port"] == ports["tcp_port"]])
        assert wait_until(lambda: [d for d in echo.seen("udp") if d["bytes"] == 11])
        assert len(echo.seen("tcp")) == before_tcp + 1

        r = inst.cli("enroll", "--pid", str(p.pid), "--agent", "bot")
        assert r.returncode == 0, r.stderr
        # the CLI says what happened to each socket, and lists it
        assert "3 inet socket(s) opened before enrolment" in r.stdout, r.stdout
        assert f"-> {lab.b.addr4}:{ECHO_PORT} (established; pid {p.pid} fd" in r.stdout and "destroyed" in r.stdout
        assert f"0.0.0.0:{LISTEN_PORT} (listen;" in r.stdout
        assert f"-> {lab.b.addr4}:{ECHO_PORT} (connected; pid {p.pid}" in r.stdout
        enrol_point = len(echo.seen())

        p.stdin.write("go\n")
        p.stdin.flush()
        out = json.loads(p.stdout.readline())
        assert p.wait(timeout=60) == 0
    finally:
        stop_process(p)

    # the old sockets are dead to the agent ...
    assert out["tcp_after"] != "sent" and out["reconnect"] != "sent", out
    assert out["udp_after"] != "sent", out
    assert out["listener"] != "accepted", out
    # ... and the server received nothing from them after the enrol point: no byte, no new connection
    after = echo.seen()[enrol_point:]
    assert not [d for d in after if d["proto"] == "tcp-data" and d["head"].startswith(("after-enrol\n", "reconnected"))]
    assert not [d for d in after if d["proto"] == "udp" and d["bytes"] == 37]
    conns = [d for d in after if d["proto"] == "tcp"]
    assert len(conns) == 1, f"only the new (proxied) connection reaches the server: {conns}"

    # control: the connection opened after the enrol went through the proxy, echoed, and is on record
    assert out["new_echo"] == "after-enrol-new\n"
    assert [d for d in after if d["proto"] == "tcp-data" and d["head"] == "after-enrol-new\n"]
    row = wait_until(lambda: next((s for s in inst.sessions("bot") if s["tgid"] == p.pid and s["ended"]), None))
    assert row and row["outcome"] == "closed" and row["bytes_up"] == len("after-enrol-new\n"), row
    ev = next(e["data"] for e in reversed(inst.events("enrolled")) if e["data"]["pid"] == p.pid)
    actions = {(s["proto"], s["state"]): s["action"] for s in ev["sockets"]}
    assert actions[("tcp", "established")] == "destroyed" and actions[("tcp", "listen")] == "destroyed"
    assert actions[("udp", "connected")] == "destroyed"


SHARED = textwrap.dedent("""
    import json, os, socket, sys
    t = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the child holds the same socket and writes on it after the enrol
        os.read(r, 1)
        try:
            t.sendall(b"from-the-child\\n")
            os._exit(0)
        except OSError:
            os._exit(3)
    print(json.dumps({"child": child, "tcp_port": t.getsockname()[1]}), flush=True)
    sys.stdin.readline()
    t.close()
    os.write(w, b"x")
    print(json.dumps({"child_exit": os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])}), flush=True)
""")


def test_a_tree_sharing_a_socket_is_frozen_and_the_socket_closed_once(inst, lab, echo):
    p = lab.a.popen([*AS_AGENT_USER, sys.executable, "-c", SHARED, lab.b.addr4, str(ECHO_PORT)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        r = inst.cli("enroll", "--pid", str(p.pid), "--agent", "bot")
        assert r.returncode == 0, r.stderr
        assert f"enrolled 2 process(es) as agent bot: {min(p.pid, info['child'])} {max(p.pid, info['child'])}" in r.stdout
        assert "1 inet socket(s) opened before enrolment" in r.stdout and "destroyed" in r.stdout, r.stdout
        ev = next(e["data"] for e in reversed(inst.events("enrolled")) if e["data"]["pid"] == p.pid)
        assert ev["frozen"] is True and len(ev["sockets"]) == 1
        p.stdin.write("go\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline())["child_exit"] == 3, "the child wrote on the old socket"
    finally:
        stop_process(p)
    assert not [d for d in echo.seen("tcp-data") if d["head"] == "from-the-child\n"]


IN_FLIGHT = textwrap.dedent("""
    import json, socket, sys
    t = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    a, b = socket.socketpair()
    socket.send_fds(a, [b"x"], [t.fileno()])  # the only reference left is in the Unix socket's queue
    port = t.getsockname()[1]
    t.close()
    print(json.dumps({"tcp_port": port}), flush=True)
    sys.stdin.readline()
""")


def test_a_socket_hidden_in_flight_makes_the_enrol_refused(inst, lab, echo):
    """A socket in no process's file table (sent to itself over a Unix socket) cannot be marked:
    the enrol is refused with the socket named, and the process stays where it was."""
    p = lab.a.popen([*AS_AGENT_USER, sys.executable, "-c", IN_FLIGHT, lab.b.addr4, str(ECHO_PORT)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(p.stdout.readline())["tcp_port"]
        before = open(f"/proc/{p.pid}/cgroup").read()
        r = inst.cli("enroll", "--pid", str(p.pid), "--agent", "bot")
        assert r.returncode != 0 and "not enrolled" in r.stderr and "held in no process's file table" in r.stderr, r.stderr
        assert f":{port} -> {lab.b.addr4}:{ECHO_PORT} (established;" in r.stderr
        assert open(f"/proc/{p.pid}/cgroup").read() == before, "a refused enrol left the process moved"
        assert any(str(port) in e["data"]["reason"] for e in inst.events("control-refused"))
    finally:
        stop_process(p)
    control = lab.a.popen([*AS_AGENT_USER, "sleep", "60"])
    try:
        assert wait_until(lambda: open(f"/proc/{control.pid}/comm").read().strip() == "sleep")
        assert inst.cli("enroll", "--pid", str(control.pid), "--agent", "bot").returncode == 0
    finally:
        stop_process(control)


def test_enrolling_a_tree_without_sockets_says_so(inst, lab):
    p = lab.a.popen([*AS_AGENT_USER, "sleep", "60"])
    try:
        assert wait_until(lambda: open(f"/proc/{p.pid}/comm").read().strip() == "sleep")
        r = inst.cli("enroll", "--pid", str(p.pid), "--agent", "bot")
        assert r.returncode == 0 and "no inet socket opened before enrolment" in r.stdout, r.stdout + r.stderr
    finally:
        stop_process(p)


def test_run_reports_inherited_sockets(inst, lab, echo, tmp_path):
    """`interlock run` enrols itself: a socket it inherited from its parent is closed too."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import socket, sys
        s = socket.socket(fileno=int(sys.argv[1]))
        try:
            s.sendall(b"inherited\\n")
            print("sent")
        except OSError as e:
            print(e.strerror)
    """))
    parent = tmp_path / "parent.py"
    parent.write_text(textwrap.dedent(f"""
        import socket, subprocess, sys
        s = socket.create_connection(("{lab.b.addr4}", {ECHO_PORT}))
        r = subprocess.run([sys.executable, "-m", "interceptor.cli", "run", "--state-dir", "{inst.state_dir}",
                            "--agent", "bot", "--", sys.executable, "{child}", str(s.fileno())],
                           pass_fds=(s.fileno(),), capture_output=True, text=True)
        print(r.stdout.strip())
        print(r.stderr.strip(), file=sys.stderr)
    """))
    before = len(echo.seen("tcp"))
    r = lab.a.run([sys.executable, str(parent)])
    assert len(echo.seen("tcp")) == before + 1, "the parent's connection reached the server (sanity)"
    assert r.stdout.strip() and r.stdout.strip() != "sent", r.stdout + r.stderr
    assert "interlock run: 1 inet socket(s) opened before enrolment" in r.stderr and "destroyed" in r.stderr, r.stderr
    assert not [d for d in echo.seen("tcp-data") if d["head"] == "inherited\n"]
