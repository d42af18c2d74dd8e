"""Hole 1, inbound connections: an agent that listens on a port and is dialled from another host.

The agent (uid 65533 inside `interlock run`) listens on the agent host; the peer dials from the
server host. Without an `inbound` rule the peer is reset before any byte of the agent reaches it,
the agent's listener never sees the connection, and the attempt is a session row. The control in
each test is the same dial to a port a rule allows: it works both ways and is recorded with bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lab.instance import INTERLOCK, Instance
from lab.probe import BANNER, PEER_LINE
from lab.rawpeer import block_kernel_resets
from lab.testing import SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath

AGENT_UID = 65533
ALLOWED_PORT, DENIED_PORT, UDP_PORT = 9401, 9402, 9403
AS_AGENT_USER = ["setpriv", "--reuid", str(AGENT_UID), "--regid", str(AGENT_UID), "--clear-groups"]


@pytest.fixture(scope="module")
def inst(lab, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        # As permissive as the embedded default: inbound still needs a rule that names it.
        "default": "allow",
        "targets": {"peer-host": {"cidr": [f"{lab.b.addr4}/32", f"{lab.b.addr6}/128"], "port": ALLOWED_PORT}},
        "rules": [{"name": "peer-may-call-bot", "agent": "bot", "target": "peer-host", "operation": "inbound",
                   "decision": "allow"}],
    }))
    i = Instance(lab.a, instance_name("in"), proxy_port=15701, dns_port=15753, policy=str(policy),
                 proxy_restart_delay=4.0 * SLOWDOWN)
    i.start()
    yield i
    i.close()


class AgentListener:
    """lab.probe listen, as the unprivileged agent: started, bound, then its JSON result."""

    def __init__(self, inst: Instance, port: int, *args: str, agent: str | None = "bot", wait: float = 10):
        probe = [*AS_AGENT_USER, sys.executable, "-m", "lab.probe", "listen", str(port), "--wait", str(wait), *args]
        cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", agent, "--", *probe] if agent else probe
        self.proc = inst.host.popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "listening" in line, f"the agent's listener did not start: {line!r}"
        if agent:
            # Exe/uid selectors are host-wide: another instance's uid-65533 selector (another test
            # run on this host) can enrol this process too and move it into its own cgroup.
            cgroup = open(f"/proc/{self.proc.pid}/cgroup").read()
            mine = f"{inst.cgroup_root.name}/agents/{agent}"
            assert mine in cgroup, f"lab interference: the agent was taken by another instance: {cgroup}"

    def result(self) -> dict:
        out, _ = self.proc.communicate(timeout=60 * SLOWDOWN)
        return json.loads(out.strip().splitlines()[-1])


def dial(host, addr: str, port: int, *args: str) -> dict:
    r = host.run([sys.executable, "-m", "lab.probe", "dial", addr, str(port), *args])
    return json.loads(r.stdout.strip().splitlines()[-1])


def kernel_view(inst: Instance) -> str:
    """What the agent host's kernel saw, for a failure message: the inbound chain's counters,
    reassembly counts."""
    table = "interlock-" + inst.name
    nft = inst.host.run(["nft", "list", "chain", "inet", table, "agent_in"]).stdout
    snmp = [line for line in inst.host.run(["cat", "/proc/net/snmp"]).stdout.splitlines() if line.startswith("Ip:")]
    return f"\n{nft}\n" + "\n".join(snmp)


def inbound_session(inst: Instance, pid: int, port: int, ended: bool = True) -> dict | None:
    rows = [s for s in inst.sessions("bot") if s["protocol"] == "inbound" and s["tgid"] == pid and s["dst_port"] == port]
    return rows[-1] if rows and (rows[-1]["ended"] or not ended) else None


FAMILIES = {  # listener family, address the peer dials
    "ipv4": ("4", "addr4"), "ipv6": ("6", "addr6"), "v4mapped": ("dual", "addr4"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_inbound_from_another_host_needs_a_rule_and_is_recorded(inst, lab, family):
    fam, which = FAMILIES[family]
    addr, peer_addr = getattr(lab.a, which), getattr(lab.b, which)

    # Attack: no rule allows the peer on this port.
    agent = AgentListener(inst, DENIED_PORT, "--family", fam, wait=6)
    got = dial(lab.b, addr, DENIED_PORT)
    seen = agent.result()
    assert not got["ok"] and got["got"] == "", f"the peer received the agent's bytes: {got}"
    assert BANNER.decode() not in got["got"]
    assert seen["accepted"] == [], f"the agent's listener got the connection: {seen} {kernel_view(inst)}"
    s = wait_until(lambda: inbound_session(inst, seen["pid"], DENIED_PORT))
    assert s, inst.sessions()
    assert (s["verdict"], s["rule"], s["outcome"]) == ("deny", "default", "denied")
    assert s["dst_addr"] == peer_addr and s["uid"] == AGENT_UID and "lab.probe listen" in s["cmdline"]
    assert s["bytes_up"] == 0 and s["bytes_down"] == 0
    decision = [e for e in inst.events("decision") if e["session"] == s["id"]]
    assert decision and decision[0]["data"]["action"] == "inbound"

    # Control: the same peer to the port the rule allows works both ways, and is recorded.
    agent = AgentListener(inst, ALLOWED_PORT, "--family", fam)
    got = dial(lab.b, addr, ALLOWED_PORT)
    seen = agent.result()
    assert got["ok"] and got["got"] == (BANNER + PEER_LINE).decode(), got
    assert [c["got"] for c in seen["accepted"]] == [PEER_LINE.decode()], seen
    s = wait_until(lambda: inbound_session(inst, seen["pid"], ALLOWED_PORT))
    assert s, inst.sessions()
    assert (s["verdict"], s["rule"], s["outcome"]) == ("allow", "peer-may-call-bot", "closed")
    assert s["dst_addr"] == peer_addr and s["uid"] == AGENT_UID
    assert s["bytes_up"] == len(BANNER) + len(PEER_LINE), "what the agent sent out"
    assert s["bytes_down"] == len(PEER_LINE), "what the peer sent in"
    where = [e["data"] for e in inst.events("inbound") if e["session"] == s["id"]]
    assert where and where[0]["local"].endswith(f":{ALLOWED_PORT}") and where[0]["peer"].startswith(peer_addr)


def test_udp_from_another_host_never_reaches_an_agent_socket(inst, lab):
    before = sum(e["data"]["packets"].get("inbound-other-dropped", 0) for e in inst.events("inbound-refused"))
    agent = AgentListener(inst, UDP_PORT, "--udp", "--family", "dual", "--count", "3", wait=6)
    assert dial(lab.b, lab.a.addr4, UDP_PORT, "--udp")["ok"]
    assert dial(lab.b, lab.a.addr6, UDP_PORT, "--udp")["ok"]
    seen = agent.result()
    assert seen["accepted"] == [], f"datagrams from another host reached the agent: {seen}"
    assert wait_until(lambda: sum(e["data"]["packets"].get("inbound-other-dropped", 0)
                                  for e in inst.events("inbound-refused")) - before >= 6), "the drops are not on record"
    # Control: the same socket receives datagrams from this host (loopback is not diverted).
    agent = AgentListener(inst, UDP_PORT, "--udp", "--family", "dual", "--count", "3", wait=10)
    assert dial(lab.a, "127.0.0.1", UDP_PORT, "--udp")["ok"]
    assert len(agent.result()["accepted"]) == 3


def test_loopback_connections_are_not_diverted(inst, lab):
    """Documented choice (docs/ARCHITECTURE.md): connections from this host reach the agent as
    they are; an enrolled dialler's connection is its own outbound session."""
    agent = AgentListener(inst, DENIED_PORT, "--count", "2")
    for addr in ("127.0.0.1", lab.a.addr4):
        got = dial(lab.a, addr, DENIED_PORT)  # an un-enrolled local process
        assert got["ok"], got
    seen = agent.result()
    assert len(seen["accepted"]) == 2
    time.sleep(0.5)
    assert inbound_session(inst, seen["pid"], DENIED_PORT, ended=False) is None, "nothing was diverted"
    # An enrolled dialler (another agent) is captured on its way out, and recorded as such.
    agent = AgentListener(inst, DENIED_PORT)
    r = inst.probe("dial", "127.0.0.1", str(DENIED_PORT), agent="peer-bot")
    assert r["ok"], r
    assert agent.result()["accepted"]
    rows = wait_until(lambda: [s for s in inst.sessions("peer-bot") if s["dst_port"] == DENIED_PORT])
    assert rows and rows[-1]["dst_addr"] == "127.0.0.1" and rows[-1]["protocol"] != "inbound"


def test_dialling_the_inbound_listener_directly_is_refused(inst, lab):
    port = inst.config["proxy_port"] + 2
    got = dial(lab.a, "127.0.0.1", port)
    assert not got["ok"] and got["got"] == "", got
    assert wait_until(lambda: [e for e in inst.events("refused") if e["data"]["reason"] == "inbound-direct"])


def test_inbound_fails_closed_while_the_proxy_is_down(inst, lab):
    before = len(inst.events("inbound-refused"))
    proxy_pids = inst.status()["proxy_pids"]  # every proxy worker (`workers:`): none listens
    agent = AgentListener(inst, ALLOWED_PORT, wait=6)
    for pid in proxy_pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in proxy_pids))
    got = dial(lab.b, lab.a.addr4, ALLOWED_PORT)
    seen = agent.result()
    assert not got["ok"] and got["got"] == "" and got.get("error") == "ConnectionRefusedError", got
    assert seen["accepted"] == [], f"with the proxy down the connection went straight to the agent: {seen}"
    refused = wait_until(lambda: [e for e in inst.events("inbound-refused")[before:]
                                  if e["data"]["packets"].get("inbound-tcp-refused")])
    assert refused and refused[0]["data"]["proxy_listening"] is False
    # Control: once the daemon has restarted the proxy, the same dial works again.
    assert wait_until(lambda: inst.status()["proxy_listening"], timeout=30)
    agent = AgentListener(inst, ALLOWED_PORT)
    assert wait_until(lambda: dial(lab.b, lab.a.addr4, ALLOWED_PORT)["ok"], timeout=10)
    assert agent.result()["accepted"]


RAW = {  # rawpeer arguments, address the peer dials
    "ipv4-fragments": (["--fragment", "8"], "addr4"),
    "ipv6-ext-headers": (["--ext-headers"], "addr6"),
    # 32 + 8 bytes: the 20-byte base header must be in the first fragment (RFC 7112). Fragments
    # behind other extension headers are dropped by netfilter's defrag before any socket lookup.
    "ipv6-fragments": (["--fragment", "32"], "addr6"),
}


@pytest.mark.parametrize("attack", RAW)
def test_raw_packet_handshakes_are_diverted_too(inst, lab, attack):
    """SYN and ACK split into fragments (the TCP header across them) or behind IPv6 extension
    headers: the socket lookup sees the reassembled segment, so the agent is reached only where
    a rule allows it."""
    args, which = RAW[attack]
    addr = getattr(lab.a, which)
    table = block_kernel_resets(lab.b, DENIED_PORT)
    try:
        agent = AgentListener(inst, DENIED_PORT, "--family", "dual", wait=12)
        got = json.loads(lab.b.run([sys.executable, "-m", "lab.rawpeer", addr, str(DENIED_PORT), *args]).stdout)
        seen = agent.result()
    finally:
        lab.b.run(["nft", "delete", "table", "inet", table])
    assert got["synack"], f"the handshake did not start: {got}"
    assert got["got"] == "" and seen["accepted"] == [], (got, seen, kernel_view(inst))
    rows = wait_until(lambda: [e for e in inst.events("inbound") if e["data"]["peer"].endswith(f":{got['sport']}")])
    assert rows, "the attempt is not on record"
    s = next(x for x in inst.sessions("bot") if x["id"] == rows[0]["session"])
    assert s["verdict"] == "deny" and s["dst_port"] == DENIED_PORT
    # Control: the same raw handshake to the port the rule allows reaches the agent.
    table = block_kernel_resets(lab.b, ALLOWED_PORT)
    try:
        agent = AgentListener(inst, ALLOWED_PORT, "--family", "dual", wait=12)
        got = json.loads(lab.b.run([sys.executable, "-m", "lab.rawpeer", addr, str(ALLOWED_PORT), *args]).stdout)
        agent.proc.kill()
    finally:
        lab.b.run(["nft", "delete", "table", "inet", table])
    assert got["got"].startswith(BANNER.decode()), got


def test_with_the_nft_diversion_gone_packets_still_never_reach_an_agent(inst, lab):
    """The second wall: with the daemon stopped (it cannot put the table back) and the inbound
    chain flushed by root, the cgroup ingress program still drops what other hosts send to agent
    sockets. The daemon, once running again, records the tamper and locks down."""
    table = "interlock-" + inst.name
    agent = AgentListener(inst, ALLOWED_PORT, wait=8)
    inst.daemon.send_signal(signal.SIGSTOP)
    try:
        assert lab.a.run(["nft", "flush", "chain", "inet", table, "inbound"]).returncode == 0
        got = dial(lab.b, lab.a.addr4, ALLOWED_PORT)
        seen = agent.result()
    finally:
        inst.daemon.send_signal(signal.SIGCONT)
    assert not got["ok"] and got["got"] == "", got
    assert seen["accepted"] == [], f"with the diversion flushed the agent was reached: {seen}"
    assert wait_until(lambda: inst.status()["lockdown"]), "the daemon did not notice the flushed chain"
    assert any(e["data"]["what"] == "nft" for e in inst.events("tamper"))
    assert inst.cli("rearm").returncode == 0
    # Control: with the table back, the allowed peer reaches the agent again.
    agent = AgentListener(inst, ALLOWED_PORT)
    assert wait_until(lambda: dial(lab.b, lab.a.addr4, ALLOWED_PORT)["ok"], timeout=10)
    assert agent.result()["accepted"]
