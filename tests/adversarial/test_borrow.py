"""Hole 3, borrowing an un-enrolled process: an agent (uid 65533, in `interlock run`) ptraces,
pidfd_getfd()s or writes the memory of a process of its own uid that is not enrolled, to make it
reach a destination for it. The ptrace guard (interceptor/ptrace_guard.py: BPF LSM, Yama or the
agent's Landlock domain) refuses each; the server sees nothing; the refusals are on record. The
controls: the helper itself reaches the server, and the same injection into the agent's own child
works and is captured."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from interceptor import ptrace_guard
from lab.instance import Instance
from lab.testing import ECHO_PORT, instance_name, stop_process, wait_until

pytestmark = pytest.mark.datapath
UID = "65533"


def as_user(cmd: list[str]) -> list[str]:
    return ["setpriv", "--reuid", UID, "--regid", UID, "--clear-groups", *cmd]


@pytest.fixture(scope="module")
def inst(lab):
    i = Instance(lab.a, instance_name("bw"), proxy_port=15711, dns_port=15712)
    i.start()
    yield i
    i.close()


@pytest.fixture
def victim(lab, echo):
    """An un-enrolled process of the agent's uid: it reached the server itself, then waits."""
    before = len(echo.seen("tcp"))
    p = lab.a.popen(as_user([sys.executable, "-m", "lab.borrow", "victim", lab.b.addr4, str(ECHO_PORT)]),
                    stdout=subprocess.PIPE, text=True)
    info = json.loads(p.stdout.readline())
    assert info["connected"] and len(echo.seen("tcp")) == before + 1, "control: the helper reaches the server"
    yield info
    stop_process(p)


def borrow(inst: Instance, *args: str) -> dict:
    r = inst.agent(as_user([sys.executable, "-m", "lab.borrow", *args]))
    return json.loads(r.stdout.strip().splitlines()[-1])


def refused_on_record(inst: Instance, agent_pid: int, syscall: str) -> dict | None:
    return next((e for e in inst.events("ptrace-refused")
                 if e["data"]["pid"] == agent_pid and e["data"]["syscall"] == syscall), None)


def assert_nothing_arrived(echo, before: int) -> None:
    wait_until(lambda: False, timeout=0.3)
    assert len(echo.seen("tcp")) == before, "the server saw a connection made through the borrowed process"


def test_agent_cannot_inject_a_connect_into_an_unenrolled_process(inst, lab, echo, victim):
    before = len(echo.seen("tcp"))
    r = borrow(inst, "inject", str(victim["pid"]), lab.b.addr4, str(ECHO_PORT))
    assert not r["ok"] and r["step"] == "PTRACE_ATTACH" and r["errno"] == errno.EPERM, r
    assert_nothing_arrived(echo, before)
    ev = wait_until(lambda: refused_on_record(inst, r["pid"], "ptrace"), timeout=30)
    assert ev, (inst.events("ptrace-refused"), inst.log.read_text()[-3000:])
    assert ev["data"]["target_pid"] == victim["pid"] and ev["data"]["agent"] == "bot", ev
    assert ev["data"]["uid"] == int(UID)


def test_agent_cannot_steal_a_socket_with_pidfd_getfd(inst, lab, echo, victim):
    before = len(echo.seen("tcp"))
    r = borrow(inst, "steal", str(victim["pid"]), str(victim["fd"]), lab.b.addr4, str(ECHO_PORT))
    assert not r["ok"] and r["step"] == "pidfd_getfd" and r["errno"] == errno.EPERM, r
    assert_nothing_arrived(echo, before)
    assert wait_until(lambda: refused_on_record(inst, r["pid"], "pidfd_getfd"), timeout=30), inst.events("ptrace-refused")


def test_agent_cannot_write_an_unenrolled_process_memory(inst, lab, echo, victim):
    r = borrow(inst, "memory", str(victim["pid"]), str(victim["addr"]))
    assert not r["ok"] and r["errno"] == errno.EPERM, r
    assert "/proc/PID/mem (13)" in r["step"] or "/proc/PID/mem (1)" in r["step"], r
    assert wait_until(lambda: refused_on_record(inst, r["pid"], "process_vm_writev"), timeout=30), inst.events("ptrace-refused")


def test_control_agent_still_traces_its_own_child_and_that_is_captured(inst, lab, echo):
    before = len(echo.seen("tcp"))
    r = borrow(inst, "own", lab.b.addr4, str(ECHO_PORT))
    assert r["ok"] and r["sent"] == len("borrowed\n"), r
    rows = wait_until(lambda: [s for s in inst.sessions("bot") if s["tgid"] == r["child"]])
    assert rows and rows[0]["dst_addr"] == lab.b.addr4, "the injected connect went through the proxy"
    assert len(echo.seen("tcp")) == before + 1
    # a debugger on its own child works too
    s = inst.agent(as_user(["strace", "-f", "-o", "/dev/null", "true"]))
    assert s.returncode == 0, s.stderr


def test_status_names_the_ptrace_defence(inst):
    st = inst.status()
    assert st["ptrace_guard"]["name"] in ("bpf-lsm", "yama", "landlock"), st["ptrace_guard"]
    start = inst.events("ptrace-guard")
    assert start and start[-1]["data"]["defence"] == st["ptrace_guard"]["name"]


# ---- the choice of defence (no kernel needed) -------------------------------------------------

@pytest.mark.parametrize("bpf, yama, landlock, allow, expect", [
    (None, None, 0, False, "bpf-lsm"),
    ("no hook", 1, 7, False, "yama"),
    ("no hook", 0, 7, False, "landlock"),
    ("no hook", None, 0, True, "none"),
])
def test_decide_picks_the_strongest_defence(bpf, yama, landlock, allow, expect):
    assert ptrace_guard.decide(bpf, yama, landlock, allow).name == expect


def test_decide_refuses_with_the_fix_when_there_is_no_defence():
    with pytest.raises(ptrace_guard.GuardError) as e:
        ptrace_guard.decide("no BPF LSM", 0, 0, False)
    msg = str(e.value)
    assert "\n" not in msg and "kernel.yama.ptrace_scope=1" in msg and "lsm=" in msg and "allow_unguarded_ptrace" in msg


def test_agent_enrolled_by_pid_is_guarded_where_the_defence_covers_it(inst, lab, echo, victim):
    """`enroll --pid` gives no Landlock domain: only the BPF LSM guard or Yama stop this agent.
    Where neither is in force (Landlock only), the daemon says so at start and in status."""
    attacker = lab.a.popen(as_user([sys.executable, "-c", "import sys, runpy; sys.stdin.readline(); "
                                    "sys.argv = ['lab.borrow', *sys.argv[1:]]; runpy.run_module('lab.borrow', "
                                    "run_name='__main__')", "inject", str(victim["pid"]), lab.b.addr4,
                                    str(ECHO_PORT)]),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert inst.cli("enroll", "--pid", str(attacker.pid), "--agent", "bot").returncode == 0
        before = len(echo.seen("tcp"))
        out, _ = attacker.communicate("go\n", timeout=60)
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_process(attacker)
    g = inst.status()["ptrace_guard"]
    if g["covers_all"]:
        assert not r["ok"] and r["errno"] == errno.EPERM, r
        assert_nothing_arrived(echo, before)
        assert wait_until(lambda: refused_on_record(inst, r["pid"], "ptrace"), timeout=30)
    else:  # the documented limit of a Landlock-only host, stated where the operator looks
        assert g["name"] == "landlock" and "enroll --pid" in g["detail"], g
        assert "warning: ptrace guard" in inst.log.read_text()
