"""The capture path end to end on the real kernel: BPF hooks, nft backstop, daemon, proxy.

An agent on the agent host talks to the echo server on the server host, over veth, with no
endpoint change; the session rows and the server's own log say what happened."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from interceptor import bpf_loader
from lab.instance import Instance, leftovers
from lab.testing import ECHO_PORT, SLOWDOWN, default_policy_plus_opaque, instance_name, wait_until

pytestmark = pytest.mark.datapath


@pytest.fixture(scope="module")
def inst(lab, dns_echo, tmp_path_factory):
    # Capture scope = the lab host's whole cgroup, as "/" would be on a real host: the exe
    # selector then reaches processes that start anywhere on it.
    name = instance_name("dp")
    scope = str(lab.cgroup.relative_to(lab.cgroup.parent))
    (lab.cgroup / "svc").mkdir()  # stands in for a systemd unit's cgroup
    # The embedded default, plus: the echo server's bulk bytes may be relayed unread (opaque, spliced).
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(default_policy_plus_opaque([lab.b.addr4, lab.b.addr6], [ECHO_PORT]))
    i = Instance(lab.a, name, proxy_port=15101, dns_port=15153, dns_upstream=lab.b.addr4, policy=str(policy),
                 cgroup_root=f"{scope}/interlock-{name}", capture_cgroup=scope,
                 agents=[{"name": "sel", "exe": ["/usr/bin/curl"]},
                         {"name": "by-uid", "uid": [65534]},
                         {"name": "unit", "cgroup": [f"{scope}/svc"]}])
    i.start()
    yield i
    i.close()


def session_of(inst: Instance, tgid: int) -> dict | None:
    return next((s for s in inst.sessions() if s["tgid"] == tgid), None)


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "v4mapped"])
def test_agent_connection_is_captured_with_destination_and_identity(inst, lab, echo, family):
    host = lab.b.addr6 if family == "ipv6" else lab.b.addr4
    extra = ["--v4mapped"] if family == "v4mapped" else []
    before = len(echo.seen("tcp"))
    r = inst.probe("tcp", host, str(ECHO_PORT), *extra)
    assert r["ok"], r
    # getpeername() shows the address the agent asked for, not the proxy's
    assert r["peer"][1] == ECHO_PORT
    assert r["peer"][0].removeprefix("::ffff:") == host
    s = wait_until(lambda: (x := session_of(inst, r["pid"])) and x["outcome"] == "closed" and x)
    assert s, inst.sessions()
    assert (s["dst_addr"], s["dst_port"]) == (host, ECHO_PORT)
    assert s["family"] == ("ipv4" if family == "ipv4" else "ipv6")
    assert s["agent"] == "bot" and s["uid"] == 0 and s["pid"] == r["pid"]
    assert s["exe"].startswith("/usr/bin/python3") and "lab.probe" in s["cmdline"]
    assert s["bytes_up"] == s["bytes_down"] == len("hello interlock\n")
    # the server saw the proxy's connection, from the agent host
    seen = echo.seen("tcp")[before:]
    assert len(seen) == 1 and seen[0]["peer"].removeprefix("::ffff:") in (lab.a.addr4, lab.a.addr6)


def test_worker_thread_connection_is_captured(inst, lab, echo):
    r = inst.probe("tcp", lab.b.addr4, str(ECHO_PORT), "--thread")
    assert r["ok"], r
    s = wait_until(lambda: session_of(inst, r["pid"]))
    assert s and s["pid"] != s["tgid"], "the row names the thread and its process"


def test_children_stay_enrolled(inst, lab, echo):
    r = inst.probe("tcp", lab.b.addr4, str(ECHO_PORT), "--fork")
    assert r["ok"], r
    rows = wait_until(lambda: [s for s in inst.sessions() if s["agent"] == "bot" and s["tgid"] != r["pid"]
                               and "lab.probe" in s["cmdline"] and "--fork" in s["cmdline"]])
    assert rows, "the forked child's connection was not captured"


def test_bulk_transfer_moves_to_splice_intact_and_counted(inst, lab, echo):
    r = inst.probe("tcp", lab.b.addr4, str(ECHO_PORT), "--bulk", "24")
    assert r["ok"], r
    s = wait_until(lambda: (x := session_of(inst, r["pid"])) and x["ended"] and x)
    assert s["bytes_up"] == s["bytes_down"] == 24 << 20, "splice threads' bytes are counted"
    assert s["outcome"] == "closed"
    assert any(e["session"] == s["id"] for e in inst.events("splice")), "the transfer left the event loop"


def test_unenrolled_process_is_untouched(inst, lab, echo):
    before = len(echo.seen("tcp"))
    r = inst.probe("tcp", lab.b.addr4, str(ECHO_PORT), agent=None)
    assert r["ok"], r
    time.sleep(0.3)
    assert session_of(inst, r["pid"]) is None
    assert len(echo.seen("tcp")) == before + 1


def test_udp_other_than_dns_is_refused(inst, lab, echo):
    before = len(echo.seen("udp"))
    r = inst.probe("udp", lab.b.addr4, str(ECHO_PORT))
    assert not r["ok"] and r["errno"] == errno.EPERM, r
    r6 = inst.probe("udp", lab.b.addr6, str(ECHO_PORT))
    assert not r6["ok"] and r6["errno"] == errno.EPERM, r6
    time.sleep(0.3)
    assert len(echo.seen("udp")) == before


def test_dns_goes_to_the_resolver_and_the_reply_looks_direct(inst, lab, dns_echo):
    r = inst.probe("udp", lab.b.addr4, "53", "--dns", "example.test")
    assert r["ok"], r
    assert r["from"] == [lab.b.addr4, 53], "recvmsg hook restores the server the agent asked"
    assert dns_echo.seen("udp"), "the resolver forwarded upstream"
    seen = [e["data"] for e in inst.events("dns") if e["data"].get("name") == "example.test"]
    assert seen and seen[-1]["agent"] == "bot" and seen[-1]["pid"] == r["pid"], "every query names its agent and pid"


def test_raw_sockets_are_refused_to_agents(inst):
    r = inst.probe("raw")
    assert not r["ok"] and r["errno"] == errno.EPERM, r
    assert inst.probe("raw", agent=None)["ok"]


def test_proxy_never_loops(inst):
    r = inst.probe("tcp", "127.0.0.1", str(inst.config["proxy_port"]))
    assert not r["ok"], r
    s = wait_until(lambda: session_of(inst, r["pid"]))
    assert s and s["outcome"] == "refused" and "loop" in s["detail"]


def test_exec_selector_captures_the_first_connect(inst, lab, echo):
    before = len(echo.seen("tcp"))
    r = lab.a.run(["curl", "-s", "--max-time", "5", "-o", "/dev/null", f"http://{lab.b.addr4}:{ECHO_PORT}/"])
    rows = wait_until(lambda: [s for s in inst.sessions("sel") if s["comm"] == "curl"])
    assert rows, f"curl (exe selector) was not captured: {r.stderr}"
    assert rows[-1]["dst_addr"] == lab.b.addr4
    assert len(echo.seen("tcp")) == before + 1
    assert any(e["data"]["via"] == "exec-selector" for e in inst.events("enrolled"))


def test_uid_selector_enrolls_at_exec(inst, lab, echo):
    r = lab.a.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-m", "lab.probe",
                   "tcp", lab.b.addr4, str(ECHO_PORT)])
    assert '"ok": true' in r.stdout, r.stdout + r.stderr
    rows = wait_until(lambda: inst.sessions("by-uid"))
    assert rows and rows[-1]["uid"] == 65534


def test_cgroup_selector_enrolls_a_service(inst, lab, echo):
    svc = lab.cgroup / "svc"
    script = (f"import os,sys; open('{svc}/cgroup.procs','w').write(str(os.getpid())); "
              f"os.execv(sys.executable,[sys.executable,'-m','lab.probe','tcp','{lab.b.addr4}','{ECHO_PORT}'])")
    r = lab.a.run([sys.executable, "-c", script])
    assert '"ok": true' in r.stdout, r.stdout + r.stderr
    assert wait_until(lambda: inst.sessions("unit")), "a process in the selected cgroup was not captured"


def test_enroll_running_process_tree(inst, lab, echo):
    # the tree connects only once it has been moved (a fixed sleep raced the enrol CLI under emulation)
    script = ("import subprocess,sys,time; moved=lambda: '/agents/late' in open('/proc/self/cgroup').read(); "
              f"end=time.monotonic()+60*{SLOWDOWN}\n"
              "while not moved() and time.monotonic()<end: time.sleep(0.05)\n"
              f"sys.exit(subprocess.run([sys.executable,'-m','lab.probe','tcp','{lab.b.addr4}','{ECHO_PORT}']).returncode)")
    p = lab.a.popen([sys.executable, "-c", script])
    r = inst.cli("enroll", "--pid", str(p.pid), "--agent", "late")
    assert r.returncode == 0, r.stderr
    assert p.wait(timeout=60 * SLOWDOWN) == 0
    assert wait_until(lambda: inst.sessions("late")), "the enrolled tree's later connection was not captured"


def test_status_reports_everything_attached(inst):
    st = inst.status()
    assert st["daemon"] == "running" and st["programs_attached"] and st["nft_intact"]
    assert st["proxy_listening"] and st["lockdown"] is None


def test_ptrace_guard_is_in_force(inst):
    """An agent cannot borrow an un-enrolled process (tests/adversarial/test_borrow.py has the attacks)."""
    g = inst.status()["ptrace_guard"]
    assert g and g["name"] in ("bpf-lsm", "yama", "landlock"), g
    if os.environ.get("INTERLOCK_EMULATED"):  # the matrix's Debian kernels have `bpf` in CONFIG_LSM
        assert g["name"] == "bpf-lsm", g


# ---- fail closed ------------------------------------------------------------------------

def _refused(inst: Instance, lab, echo) -> dict:
    before = len(echo.seen("tcp"))
    r = inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))
    time.sleep(0.3)
    assert not r["ok"], f"agent traffic got through: {r}"
    assert len(echo.seen("tcp")) == before, "the server saw a connection"
    return r


def test_fail_closed_when_the_daemon_is_killed(make_instance, lab, echo):
    inst = make_instance("k", proxy_port=15201, dns_port=15253)
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
    proxy_pids = inst.status()["proxy_pids"]  # every proxy worker (`workers:`)
    inst.daemon.send_signal(signal.SIGKILL)
    inst.daemon.wait(timeout=10)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in proxy_pids)), "proxy outlived its daemon"
    # an agent that joins its cgroup after the kill (the CLI has no daemon to ask now)
    agent_cg = inst.cgroup_root / "agents" / "bot"
    assert agent_cg.exists()
    script = (f"import os,sys; open('{agent_cg}/cgroup.procs','w').write(str(os.getpid())); "
              f"os.execv(sys.executable,[sys.executable,'-m','lab.probe','tcp','{lab.b.addr4}','{ECHO_PORT}'])")
    before = len(echo.seen("tcp"))
    r = lab.a.run([sys.executable, "-c", script])
    assert r.returncode != 0 and '"ok": false' in r.stdout, r.stdout + r.stderr
    time.sleep(0.3)
    assert len(echo.seen("tcp")) == before
    # a new daemon adopts the pinned state and serves again
    inst.start()
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]


def test_exec_selectors_keep_enrolling_while_the_daemon_is_dead(make_instance, lab, echo):
    inst = make_instance("s", scoped=True, proxy_port=15251, dns_port=15252, agents=[{"name": "u", "uid": [65533]}])
    assert (Path("/sys/fs/bpf/interlock") / inst.name / "link_exec").exists(), "the exec hook is a pinned link"
    probe = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups", sys.executable, "-m", "lab.probe",
             "tcp", lab.b.addr4, str(ECHO_PORT)]
    inst.daemon.send_signal(signal.SIGKILL)
    inst.daemon.wait(timeout=10)
    before = len(echo.seen("tcp"))
    r = lab.a.run(probe)
    assert '"ok": false' in r.stdout, "a selector-matched program started while the daemon was dead got out"
    time.sleep(0.3)
    assert len(echo.seen("tcp")) == before
    inst.start()
    r = lab.a.run(probe)
    assert '"ok": true' in r.stdout, r.stdout + r.stderr
    assert wait_until(lambda: inst.sessions("u"))


def test_fail_closed_when_the_nft_table_is_deleted(make_instance, lab, echo):
    inst = make_instance("n", proxy_port=15301, dns_port=15353)
    table = "interlock-" + inst.name
    assert lab.a.run(["nft", "delete", "table", "inet", table]).returncode == 0
    assert wait_until(lambda: inst.status()["lockdown"]), "the daemon did not notice the deleted table"
    r = _refused(inst, lab, echo)
    assert r["errno"] == errno.EPERM
    assert inst.status()["nft_intact"], "the table was put back"
    assert any(e["data"]["what"] == "nft" for e in inst.events("tamper"))
    assert inst.cli("rearm").returncode == 0
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]


def test_fail_closed_when_the_proxy_dies(make_instance, lab, echo):
    inst = make_instance("p", proxy_port=15401, dns_port=15453, proxy_restart_delay=3.0 * SLOWDOWN)
    for pid in inst.status()["proxy_pids"]:  # every proxy worker (`workers:`): none listens
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    r = _refused(inst, lab, echo)
    assert r["errno"] == errno.ECONNREFUSED
    assert wait_until(lambda: inst.status()["proxy_listening"], timeout=15), inst.diagnosis()
    tries: list[dict] = []
    through = lambda: tries.append(inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))) or tries[-1]["ok"]  # noqa: E731
    assert wait_until(through, timeout=10), f"{len(tries)} probes, the last: {tries[-2:]}\n{inst.diagnosis()}"


def test_fail_closed_when_programs_are_detached(make_instance, lab, echo):
    inst = make_instance("d", proxy_port=15501, dns_port=15553)
    assert bpf_loader.detach_all(inst.cgroup_root) == len(bpf_loader.HOOKS)
    _refused(inst, lab, echo)
    assert wait_until(lambda: inst.status()["programs_attached"] and inst.status()["lockdown"])


def test_down_leaves_nothing_behind(make_instance, lab, echo):
    inst = make_instance("z", proxy_port=15601, dns_port=15653)
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
    assert leftovers(inst), "sanity: the instance had installed something"
    r = inst.down()
    assert r.returncode == 0, r.stderr
    assert leftovers(inst) == []
    assert not any(bpf_loader.attached(inst.cgroup_root).values())
    assert not inst.cgroup_root.exists()
    # the recordings stay: they are the audit trail
    assert (inst.state_dir / "recorder.db").exists()
    # and status names the instance that ran here, not the default one
    st = inst.cli("status", "--json")
    assert st.returncode == 3 and json.loads(st.stdout)["instance"] == inst.name, st.stdout


def test_a_daemon_that_cannot_start_says_why_and_harms_no_other_instance(make_instance, lab, echo):
    first = make_instance("c1", proxy_port=15651, dns_port=15652)
    with pytest.raises(RuntimeError) as e:
        make_instance("c2", proxy_port=15651, dns_port=15653)  # the same proxy port in the same namespace
    text = str(e.value)
    assert "cannot start: the proxy failed to start" in text and "interlock down" in text
    assert "cannot listen on port 15651" in text and "Traceback" not in text
    assert first.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
