"""Hole 2, choosing one's own identity: the control socket decides who may enrol, relabel and
unenrol from the kernel's word about the caller (SO_PEERCRED), never from the request.

Only `admin` may reach the echo server. The agent (uid 65533 inside `interlock run --agent bot`)
tries to become `admin` three ways: `interlock enroll --pid $$ --agent admin`, `interlock run
--agent admin`, and a hand-written JSON request on the control socket (with and without a
pidfd). The server must see nothing from it, every attempt must be refused with a clear message
and be on record, and the control (root enrolling a process as `admin`) must reach the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from lab.instance import INTERLOCK, Instance
from lab.testing import ECHO_PORT, instance_name, stop_process, wait_until

pytestmark = pytest.mark.datapath

AGENT_UID, OPERATOR_UID, OPERATOR_GID = 65533, 65531, 65532
AS_AGENT_USER = ["setpriv", "--reuid", str(AGENT_UID), "--regid", str(AGENT_UID), "--clear-groups"]


@pytest.fixture(scope="module")
def inst(lab, echo, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "targets": {"echo": {"cidr": [f"{lab.b.addr4}/32", f"{lab.b.addr6}/128"], "port": ECHO_PORT}},
        "rules": [{"name": "only-admin", "agent": "admin", "target": "echo", "decision": "allow"}],
        "default": "deny",
    }))
    i = Instance(lab.a, instance_name("ctl"), proxy_port=15801, dns_port=15853, policy=str(policy),
                 operator_group=OPERATOR_GID)
    i.start()
    # As on a real host, where the run dir (/run/interlock) is world-readable and the state
    # dir apart: the lab keeps both in one mkdtemp dir (0700), so let other users reach run/.
    os.chmod(i.state_dir, 0o711)
    yield i
    i.close()


# What the agent tries, as one script: each attempt's exit code and message, then a connect.
ATTEMPTS = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    sd, host, port = sys.argv[1], sys.argv[2], sys.argv[3]
    cli = [sys.executable, "-m", "interceptor.cli"]
    out = {"uid": os.getuid()}
    r = subprocess.run([*cli, "enroll", "--state-dir", sd, "--pid", str(os.getpid()), "--agent", "admin"],
                       capture_output=True, text=True)
    out["enroll"] = [r.returncode, r.stderr.strip()]
    r = subprocess.run([*cli, "run", "--state-dir", sd, "--agent", "admin", "--",
                        sys.executable, "-m", "lab.probe", "tcp", host, port], capture_output=True, text=True)
    out["run"] = [r.returncode, r.stderr.strip(), r.stdout.strip()]
    for name, fds in (("json", []), ("json_pidfd", [os.pidfd_open(os.getpid())])):
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(sd, "run", "control.sock"))
        req = json.dumps({"op": "enroll", "pid": os.getpid(), "agent": "admin", "tree": True}).encode() + b"\\n"
        socket.send_fds(s, [req], fds) if fds else s.sendall(req)
        out[name] = json.loads(s.makefile().readline())
    for op in ("unenroll", "rearm", "down"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(sd, "run", "control.sock"))
        s.sendall(json.dumps({"op": op, "pid": os.getpid()}).encode() + b"\\n")
        out[op] = json.loads(s.makefile().readline())
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(sd, "run", "control.sock"))
    s.sendall(b'{"op": "status"}\\n')
    out["status"] = json.loads(s.makefile().readline())
    r = subprocess.run([sys.executable, "-m", "lab.probe", "tcp", host, port], capture_output=True, text=True)
    out["probe"] = json.loads(r.stdout.strip().splitlines()[-1])
    out["cgroup"] = open("/proc/self/cgroup").read().strip()
    print(json.dumps(out))
""")


def spawn(lab, cmd: list[str], comm: str, **kw) -> subprocess.Popen:
    """Start cmd on the agent host; return once it runs as `comm` (past the lab's cgroup and
    namespace wrappers, so its cgroup is the one it will keep)."""
    p = lab.a.popen(cmd, **kw)
    assert wait_until(lambda: open(f"/proc/{p.pid}/comm").read().strip() == comm), f"{cmd} did not start"
    return p


def refused_events(inst: Instance, uid: int) -> list[dict]:
    return [e["data"] for e in inst.events("control-refused") if e["data"]["caller_uid"] == uid]


@pytest.mark.parametrize("as_user", ["setpriv", "run --user"])
def test_an_agent_cannot_make_itself_admin(inst, lab, echo, as_user):
    before_events = len(refused_events(inst, AGENT_UID))
    before = len(echo.seen("tcp"))
    admin_before = {s["id"] for s in inst.sessions("admin")}
    script = [sys.executable, "-c", ATTEMPTS, str(inst.state_dir), lab.b.addr4, str(ECHO_PORT)]
    if as_user == "setpriv":
        r = inst.agent([*AS_AGENT_USER, *script], agent="bot")
    else:
        r = inst.cli("run", "--agent", "bot", "--user", f"{AGENT_UID}:{AGENT_UID}", "--", *script)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["uid"] == AGENT_UID and "/agents/bot" in out["cgroup"]

    # every attempt refused by the daemon, with a message that says why
    for verb in ("enroll", "run"):
        code, message = out[verb][0], out[verb][1]
        assert code != 0 and "refused:" in message and "is an agent" in message, out[verb]
        assert "Traceback" not in message
    for name in ("json", "json_pidfd", "unenroll", "rearm", "down"):
        assert out[name]["ok"] is False and "is an agent" in out[name]["error"], out[name]
    # status: health only, no agents, selectors or pids
    st = out["status"]
    assert st["ok"] and st["proxy_listening"] and "enrolled" not in st and "selectors" not in st
    assert "restricted" in st

    # the server saw nothing from the agent: not from `run --agent admin`, not from the probe as bot
    assert not out["run"][2], "the command under `run --agent admin` ran"
    assert out["probe"]["ok"] is False
    assert len(echo.seen("tcp")) == before, "the server saw a connection from the agent"
    # on record: the refusals (who asked, what, why) and the bot's denied connect, as bot
    refusals = refused_events(inst, AGENT_UID)[before_events:]
    assert {e["op"] for e in refusals} >= {"enroll", "unenroll", "rearm", "down"}
    assert sum(1 for e in refusals if e["op"] == "enroll" and e["asked"].get("agent") == "admin") == 4
    assert all("bot" in (e["caller_agent"] or "") for e in refusals)
    probe_pid = out["probe"]["pid"]
    row = wait_until(lambda: next((s for s in inst.sessions() if s["tgid"] == probe_pid), None))
    assert row and row["agent"] == "bot" and row["outcome"] == "denied", row
    assert {s["id"] for s in inst.sessions("admin")} == admin_before, "a session was recorded as admin"

    # control: root enrolling a running process as admin reaches the server, recorded as admin
    waiter = lab.a.popen([*AS_AGENT_USER, sys.executable, "-c",
                          "import sys,subprocess; sys.stdin.readline(); "
                          f"sys.exit(subprocess.run([sys.executable,'-m','lab.probe','tcp','{lab.b.addr4}','{ECHO_PORT}']).returncode)"],
                         stdin=subprocess.PIPE, text=True)
    try:
        e = inst.cli("enroll", "--pid", str(waiter.pid), "--agent", "admin")
        assert e.returncode == 0, e.stderr
        waiter.stdin.write("go\n")
        waiter.stdin.close()
        assert waiter.wait(timeout=60) == 0
    finally:
        stop_process(waiter)
    assert len(echo.seen("tcp")) == before + 1
    assert wait_until(lambda: [s for s in inst.sessions("admin") if s["uid"] == AGENT_UID and s["outcome"] == "closed"])


def test_a_root_agent_cannot_change_enrolment_either(inst, lab, echo):
    """Whatever its uid: an enrolled root process is still the agent."""
    script = ("import os,subprocess,sys; "
              f"r=subprocess.run([sys.executable,'-m','interceptor.cli','enroll','--state-dir','{inst.state_dir}',"
              "'--pid',str(os.getpid()),'--agent','admin'],capture_output=True,text=True); "
              "print(r.returncode, r.stderr.strip())")
    r = inst.agent([sys.executable, "-c", script], agent="bot")
    code, _, message = r.stdout.strip().partition(" ")
    assert code != "0" and "refused:" in message and "is an agent" in message, r.stdout + r.stderr
    assert any(e["caller_uid"] == 0 and e["asked"].get("agent") == "admin" for e in refused_events(inst, 0))
    # control: the same request from root outside any agent is carried out
    sleeper = spawn(lab, ["sleep", "60"], "sleep")
    try:
        e = inst.cli("enroll", "--pid", str(sleeper.pid), "--agent", "admin")
        assert e.returncode == 0, e.stderr
        assert wait_until(lambda: "/agents/admin" in open(f"/proc/{sleeper.pid}/cgroup").read())
    finally:
        stop_process(sleeper)


def test_the_operator_group_may_enrol_relabel_and_unenrol_others_may_not(inst, lab):
    operator = ["setpriv", "--reuid", str(OPERATOR_UID), "--regid", str(OPERATOR_UID), "--groups", str(OPERATOR_GID)]
    stranger = ["setpriv", "--reuid", str(OPERATOR_UID), "--regid", str(OPERATOR_UID), "--clear-groups"]
    sleeper = spawn(lab, ["sleep", "60"], "sleep")
    cli = [*INTERLOCK, "{verb}", "--state-dir", str(inst.state_dir)]

    def as_(who, verb, *args):
        return lab.a.run([*who, *[c.format(verb=verb) for c in cli], *args])

    def cgroup() -> str:
        return open(f"/proc/{sleeper.pid}/cgroup").read()

    try:
        origin = cgroup()
        r = as_(stranger, "enroll", "--pid", str(sleeper.pid), "--agent", "admin")
        assert r.returncode != 0 and "needs root or a member of the operator group" in r.stderr, r.stderr
        assert cgroup() == origin, "a refused enrol moved the process"
        st = json.loads(as_(stranger, "status", "--json").stdout)
        assert "enrolled" not in st and "selectors" not in st and st["restricted"]
        r = as_(stranger, "status")
        assert r.returncode == 0 and "proxy: listening" in r.stdout and "shown to root" in r.stdout, r.stdout + r.stderr
        assert str(sleeper.pid) not in r.stdout

        r = as_(operator, "enroll", "--pid", str(sleeper.pid), "--agent", "bot")
        assert r.returncode == 0, r.stderr
        assert "/agents/bot" in cgroup()
        r = as_(operator, "enroll", "--pid", str(sleeper.pid), "--agent", "admin")
        assert r.returncode == 0 and "relabelled from bot" in r.stdout, r.stdout + r.stderr
        assert "/agents/admin" in cgroup()
        st = json.loads(as_(operator, "status", "--json").stdout)
        assert sleeper.pid in st["enrolled"]["admin"]

        r = as_(stranger, "unenroll", "--pid", str(sleeper.pid))
        assert r.returncode != 0 and "refused:" in r.stderr
        assert "/agents/admin" in cgroup()
        r = as_(operator, "unenroll", "--pid", str(sleeper.pid))
        assert r.returncode == 0 and "unenrolled 1 process(es) from agent admin" in r.stdout, r.stdout + r.stderr
        assert cgroup() == origin, "unenroll puts the process back where it came from"
        assert inst.events("unenrolled")[-1]["data"]["by_uid"] == OPERATOR_UID
        r = as_(operator, "unenroll", "--pid", str(sleeper.pid))
        assert r.returncode != 0 and "is not enrolled" in r.stderr
        # root-only verbs stay root-only
        r = as_(operator, "rearm")
        assert r.returncode != 0 and "'rearm' needs root" in r.stderr
    finally:
        stop_process(sleeper)


def test_run_user_is_root_only(inst, lab):
    r = lab.a.run([*AS_AGENT_USER, *INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--user", "0", "--", "id"])
    assert r.returncode != 0 and "--user needs root" in r.stderr and "Traceback" not in r.stderr


FLOOD = textwrap.dedent("""
    import json, os, socket, sys, time
    path = os.path.join(sys.argv[1], "run", "control.sock")
    def ask():
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(json.dumps({"op": "enroll", "pid": os.getpid(), "agent": "flood"}).encode() + b"\\n")
        return json.loads(s.makefile().readline())
    replies = [ask() for _ in range(int(sys.argv[2]))]
    time.sleep(1.1)  # a new second: the next refusal carries the count of those not written one by one
    replies.append(ask())
    print(json.dumps({"refused": sum(1 for r in replies if not r["ok"] and r["error"].startswith("refused:"))}))
""")


def test_a_flood_of_refused_requests_is_answered_and_counted_not_lost(inst, lab):
    """Each refusal is answered; the record is bounded per uid and second, and the count of the
    refusals not written one by one is carried on the next record, so none goes unaccounted."""
    n = 60
    stranger = ["setpriv", "--reuid", str(OPERATOR_UID + 10), "--regid", str(OPERATOR_UID + 10), "--clear-groups"]
    r = lab.a.run([*stranger, sys.executable, "-c", FLOOD, str(inst.state_dir), str(n)])
    assert json.loads(r.stdout)["refused"] == n + 1, r.stdout + r.stderr
    rows = [e for e in inst.events("control-refused") if e["data"]["caller_uid"] == OPERATOR_UID + 10]
    assert len(rows) + sum(e["data"]["suppressed_before"] for e in rows) == n + 1
