"""Hole 12, ICMP "ping" datagram sockets: with net.ipv4.ping_group_range open (set here only in the
lab's agent namespace: it is per network namespace), an agent opens SOCK_DGRAM/IPPROTO_ICMP and
carries data out in echo requests, past every connect/sendmsg hook. The sock_create hook refuses
ping sockets to agents (recorded as socket-refused); the nft backstop rejects ICMP from agent
sockets even with that hook gone. A raw ICMP socket on the server host is the witness; the
un-enrolled control's echo request reaches it."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from interceptor import bpf_loader
from interceptor import bpf_syscall as sc
from lab.instance import INTERLOCK, Instance
from lab.testing import instance_name, stop_process, wait_until

pytestmark = pytest.mark.datapath
UID = "65533"

# The agent's side: one echo request carrying a marker, as an unprivileged user may send it.
PING = """
import json, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
proto = socket.IPPROTO_ICMPV6 if fam == socket.AF_INET6 else socket.IPPROTO_ICMP
kind = 128 if fam == socket.AF_INET6 else 8
if len(sys.argv) > 3:  # wait for the go-ahead on stdin
    sys.stdin.readline()
try:
    s = socket.socket(fam, socket.SOCK_DGRAM, proto)
except OSError as e:
    print(json.dumps({"ok": False, "step": "socket", "errno": e.errno})); sys.exit(1)
try:
    s.sendto(bytes([kind, 0, 0, 0, 0, 0, 0, 1]) + sys.argv[2].encode(), (sys.argv[1], 0))
except OSError as e:
    print(json.dumps({"ok": False, "step": "sendto", "errno": e.errno})); sys.exit(1)
print(json.dumps({"ok": True}))
"""

# The server's side: every IPv4 echo request that arrives, with its payload.
SINK = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
out = open(sys.argv[1], "a", buffering=1)
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    ihl = (data[0] & 0x0F) * 4
    if data[ihl] == 8:
        out.write(json.dumps({"peer": addr[0], "payload": data[ihl + 8:].decode(errors="replace")}) + "\\n")
"""


@pytest.fixture(scope="module")
def inst(lab):
    r = lab.a.run(["sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647"])
    assert r.returncode == 0, r.stderr
    i = Instance(lab.a, instance_name("pg"), proxy_port=15731, dns_port=15732)
    i.start()
    yield i
    i.close()


@pytest.fixture(scope="module")
def sink(lab, tmp_path_factory):
    log = tmp_path_factory.mktemp("icmp") / "seen.jsonl"
    p = lab.b.popen([sys.executable, "-c", SINK, str(log)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"

    def seen(marker: str) -> list[dict]:
        rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        return [r for r in rows if marker in r["payload"]]

    yield seen
    stop_process(p)


def ping(inst: Instance, host: str, marker: str, agent: bool = True) -> dict:
    cmd = ["setpriv", "--reuid", UID, "--regid", UID, "--clear-groups", sys.executable, "-c", PING, host, marker]
    r = inst.agent(cmd) if agent else inst.host.run(cmd)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_agent_ping_socket_is_refused_and_on_record(inst, lab, sink):
    assert ping(inst, lab.b.addr4, "control-1", agent=False)["ok"]
    assert wait_until(lambda: sink("control-1")), "control: an un-enrolled process's echo request arrives"
    r = ping(inst, lab.b.addr4, "exfil-1")
    assert not r["ok"] and r["step"] == "socket" and r["errno"] == errno.EPERM, r
    r6 = ping(inst, lab.b.addr6, "exfil-6")
    assert not r6["ok"] and r6["step"] == "socket" and r6["errno"] == errno.EPERM, r6
    wait_until(lambda: False, timeout=0.5)
    assert not sink("exfil-1")
    refused = wait_until(lambda: [e["data"] for e in inst.events("socket-refused") if e["data"]["agent"] == "bot"
                                  and e["data"]["type"] == 2 and e["data"]["protocol"] in (1, 58)])
    assert {d["protocol"] for d in refused} == {1, 58}, inst.events("socket-refused")
    assert all(d["uid"] == int(UID) for d in refused)


def test_backstop_rejects_agent_icmp_without_the_socket_hook(inst, lab, sink):
    """An agent waits, enrolled; then the daemon is frozen (it would re-attach at once) and the
    sock_create program detached: the agent gets its ping socket, and the nft backstop still
    stops the echo request."""
    cmd = ["setpriv", "--reuid", UID, "--regid", UID, "--clear-groups", sys.executable, "-c", PING,
           lab.b.addr4, "exfil-2", "wait"]
    agent = inst.host.popen([*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--", *cmd],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert wait_until(lambda: any(agent.pid in pids or _child_of(agent.pid, pids)
                                  for pids in inst.status()["enrolled"].values()))
    fd = os.open(inst.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    hook = next(h for h in bpf_loader.HOOKS if h.func == "il_sock_create")
    inst.daemon.send_signal(signal.SIGSTOP)
    try:
        detached = 0
        for pfd in bpf_loader._our_programs(fd, hook):
            detached += sc.prog_detach(fd, hook.attach_type, pfd)
            os.close(pfd)
        assert detached == 1
        out, _ = agent.communicate("go\n", timeout=60)
        r = json.loads(out.strip().splitlines()[-1])
        assert not r["ok"] and r["step"] == "sendto" and r["errno"] == errno.EPERM, r
        wait_until(lambda: False, timeout=0.5)
        assert not sink("exfil-2"), "an agent's echo request left the host"
    finally:
        os.close(fd)
        inst.daemon.send_signal(signal.SIGCONT)
        stop_process(agent)
    assert wait_until(lambda: inst.status()["programs_attached"] and inst.status()["lockdown"])
    assert inst.cli("rearm").returncode == 0
    assert ping(inst, lab.b.addr4, "control-2", agent=False)["ok"] and wait_until(lambda: sink("control-2"))


def _child_of(pid: int, pids: list[int]) -> bool:
    """pid's exec'd command may be its child (setpriv execs; sh -c in Host.argv does too)."""
    for p in pids:
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            return True
    return False
