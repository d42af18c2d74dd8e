"""Hole 13, enrolling the wrong thing: `enroll --pid 1` once moved every process on the host into
an agent cgroup, and a pid that does not exist was "enrolled". Now each wrong target is refused
with a one-line reason and a non-zero exit, nothing moves, and the refusal is on record.

Safety: the refusals are tried only against processes these tests start (a throwaway PID
namespace from `unshare --pid --fork --mount-proc`, the test instance's own daemon and proxy, a
second test instance), never against the host's PID 1 or a kernel thread: those two cases are
checked on the decision alone (`target_refusal`), with no process behind it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from interceptor.enrolment import target_refusal
from interceptor.procinfo import ProcFacts
from lab.instance import INTERLOCK, Instance
from lab.testing import ECHO_PORT, instance_name, stop_process, wait_until

pytestmark = pytest.mark.datapath


@pytest.fixture(scope="module")
def inst(lab):
    i = Instance(lab.a, instance_name("tgt"), proxy_port=15821, dns_port=15873)
    i.start()
    yield i
    i.close()


def comm(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def cgroup(pid: int) -> str:
    return open(f"/proc/{pid}/cgroup").read()


def children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    return out


def refused(inst: Instance, r: subprocess.CompletedProcess, reason: str) -> None:
    """Non-zero exit, one line that names the reason, and the refusal on record."""
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert any(reason in e["data"]["reason"] for e in inst.events("control-refused")), "the refusal is not on record"


def control_enrol_works(inst: Instance, lab) -> None:
    """The same verb on an ordinary process of ours is carried out (the lab is not broken)."""
    p = lab.a.popen(["sleep", "60"])
    try:
        assert wait_until(lambda: comm(p.pid) == "sleep")
        r = inst.cli("enroll", "--pid", str(p.pid), "--agent", "bot")
        assert r.returncode == 0, r.stderr
        assert "/agents/bot" in cgroup(p.pid)
    finally:
        stop_process(p)


@pytest.fixture
def pidns(lab):
    """A throwaway PID namespace: `unshare` and its child, PID 1 inside (a sleep with a child)."""
    p = lab.a.popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "sleep 60 & wait"])
    init = wait_until(lambda: next((c for c in children(p.pid) if comm(c) == "sh"), None)) if wait_until(
        lambda: comm(p.pid) == "unshare") else None
    assert init, "the PID namespace did not start"
    assert wait_until(lambda: children(init))
    yield p, init
    stop_process(p)


def test_the_init_of_a_pid_namespace_is_refused(inst, lab, pidns):
    _, init = pidns
    nspid = next(line for line in open(f"/proc/{init}/status") if line.startswith("NSpid:")).split()
    assert nspid[-1] == "1" and nspid[1] == str(init)
    before = cgroup(init)
    r = inst.cli("enroll", "--pid", str(init), "--agent", "bot")
    refused(inst, r, f"pid {init} (sh) is PID 1 of its own PID namespace")
    assert cgroup(init) == before and cgroup(children(init)[0]) == before
    # its child, an ordinary process of the namespace, is enrolled (control)
    child = children(init)[0]
    assert inst.cli("enroll", "--pid", str(child), "--agent", "bot").returncode == 0
    assert "/agents/bot" in cgroup(child) and cgroup(init) == before


def test_pid_1_named_inside_a_pid_namespace_is_that_namespace_s_init(inst, lab):
    """The pid travels as a pidfd: `--pid 1` from inside a namespace is that namespace's PID 1
    (the CLI itself here), never the host's."""
    host_init = cgroup(1)
    r = lab.a.run(["unshare", "--pid", "--fork", "--mount-proc", *INTERLOCK, "enroll", "--state-dir",
                   str(inst.state_dir), "--pid", "1", "--agent", "bot"])
    refused(inst, r, "is PID 1 of its own PID namespace")
    assert cgroup(1) == host_init
    # a pid that exists only inside the namespace's view is not read as a host pid either
    r = lab.a.run(["unshare", "--pid", "--fork", "--mount-proc", *INTERLOCK, "enroll", "--state-dir",
                   str(inst.state_dir), "--pid", "2", "--agent", "bot"])
    assert r.returncode != 0 and "no process 2" in r.stderr, r.stderr
    control_enrol_works(inst, lab)


def test_host_init_and_kernel_threads_are_refused_by_nature():
    """Decision only: no test ever points the daemon at the host's PID 1 or a kernel thread."""
    assert "host's init" in target_refusal(ProcFacts(1, 0, False, 1, "init"))
    assert "kernel thread" in target_refusal(ProcFacts(2, 0, True, 2, "kthreadd"))
    assert "kernel thread" in target_refusal(ProcFacts(57, 2, True, 57, "kworker/0:1"))
    assert "PID 1 of its own PID namespace" in target_refusal(ProcFacts(4242, 4241, False, 1, "sh"))
    assert target_refusal(ProcFacts(4243, 4242, False, 2, "sleep")) is None


def test_pids_that_do_not_exist_are_refused(inst, lab):
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not os.path.exists(f"/proc/{gone.pid}")
    r = inst.cli("enroll", "--pid", str(gone.pid), "--agent", "bot")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"interlock enroll: no process {gone.pid}"], r.stderr
    for pid in ("0", "-5"):
        r = inst.cli("enroll", "--pid", pid, "--agent", "bot")
        assert r.returncode != 0 and f"no process {pid}" in r.stderr and "Traceback" not in r.stderr
    # the daemon does not trust the CLI: a bare number and a pidfd of an exited process, sent raw
    sock = str(inst.state_dir / "run" / "control.sock")

    def ask(req: dict, fds=()) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            socket.send_fds(s, [json.dumps(req).encode() + b"\n"], list(fds)) if fds else s.sendall(
                json.dumps(req).encode() + b"\n")
            return json.loads(s.makefile().readline())

    reply = lab.a.run([sys.executable, "-c", f"""
import json, socket
s = socket.socket(socket.AF_UNIX); s.connect({sock!r})
s.sendall(json.dumps({{"op": "enroll", "pid": {gone.pid}, "agent": "bot"}}).encode() + b"\\n")
print(s.makefile().readline())"""]).stdout
    assert json.loads(reply) == {"ok": False, "error": f"refused: no process {gone.pid}"}
    child = subprocess.Popen(["true"])
    fd = os.pidfd_open(child.pid)
    child.wait()
    try:
        reply = ask({"op": "enroll", "pid": child.pid, "agent": "bot"}, [fd])
    finally:
        os.close(fd)
    assert not reply["ok"] and "has exited" in reply["error"], reply
    control_enrol_works(inst, lab)


def test_the_daemon_and_the_proxy_are_refused(inst, lab, echo):
    st = inst.status()
    for pid, what in ((st["daemon_pid"], "daemon"), *((p, "proxy") for p in st["proxy_pids"])):
        before = cgroup(pid)
        r = inst.cli("enroll", "--pid", str(pid), "--agent", "bot")
        refused(inst, r, f"is instance {inst.name}'s own daemon or proxy")
        assert cgroup(pid) == before, f"the {what} was moved"
    # still serving: an agent connection goes through
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
    control_enrol_works(inst, lab)


def test_processes_of_another_instance_are_refused(inst, lab, make_instance):
    other = make_instance("o", proxy_port=15831, dns_port=15883)
    theirs = lab.a.popen([*INTERLOCK, "run", "--state-dir", str(other.state_dir), "--agent", "x", "--", "sleep", "60"])
    parent = lab.a.popen(["sh", "-c", f"{' '.join(INTERLOCK)} run --state-dir {other.state_dir} --agent y -- sleep 60; true"])
    try:
        assert wait_until(lambda: comm(theirs.pid) == "sleep" and "/agents/x" in cgroup(theirs.pid))
        grand = wait_until(lambda: next((c for c in children(parent.pid) if comm(c) == "sleep"), None))
        assert grand and wait_until(lambda: "/agents/y" in cgroup(grand))
        r = inst.cli("enroll", "--pid", str(theirs.pid), "--agent", "bot")
        refused(inst, r, f"belongs to another Interlock instance, '{other.name}'")
        assert "/agents/x" in cgroup(theirs.pid)
        daemon = other.status()["daemon_pid"]
        r = inst.cli("enroll", "--pid", str(daemon), "--agent", "bot")
        refused(inst, r, f"belongs to another Interlock instance, '{other.name}'")
        r = inst.cli("enroll", "--pid", str(parent.pid), "--agent", "bot")
        refused(inst, r, f"the tree of pid {parent.pid} contains pid {grand}")
        assert "/agents/" not in cgroup(parent.pid) and "/agents/y" in cgroup(grand)
    finally:
        stop_process(theirs)
        stop_process(parent)
    control_enrol_works(inst, lab)


def test_a_selector_of_another_instance_does_not_take_this_instance_s_agent(lab, make_instance):
    """Instance `other` enrols uid 65530 at exec anywhere on the lab host. An agent of `inst` (its
    tree on the same host) that becomes uid 65530 stays `inst`'s, and `other` records why it left it
    alone; an ordinary process of that uid is other's."""
    inst = make_instance("m", scoped=True, proxy_port=15851, dns_port=15895)
    other = make_instance("u", scoped=True, proxy_port=15841, dns_port=15893, agents=[{"name": "u", "uid": [65530]}])
    as_65530 = ["setpriv", "--reuid", "65530", "--regid", "65530", "--clear-groups"]
    ours = lab.a.popen([*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
                        *as_65530, "sleep", "60"])
    plain = lab.a.popen([*as_65530, "sleep", "61"])
    try:
        assert wait_until(lambda: comm(ours.pid) == "sleep" and comm(plain.pid) == "sleep")
        why = wait_until(lambda: next((e["data"]["reason"] for e in other.events("enroll-refused")
                                       if e["data"]["pid"] == ours.pid), None))
        assert why and f"belongs to another Interlock instance, '{inst.name}'" in why, why
        assert "/agents/bot" in cgroup(ours.pid) and inst.cgroup_root.name in cgroup(ours.pid)
        # control: the selector does enrol a process of that uid that belongs to no instance
        assert wait_until(lambda: "/agents/u" in cgroup(plain.pid) and other.cgroup_root.name in cgroup(plain.pid))
    finally:
        stop_process(ours)
        stop_process(plain)
