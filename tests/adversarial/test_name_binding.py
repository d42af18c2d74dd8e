"""Hole 5, naming a trusted host at any address: an unprivileged agent dials an address no rule
names and claims an allowed name in its SNI or Host header.

The lab's server host answers on a second address, X, that no rule names; the lab DNS answers the
allowed names with X. Without resolving (curl --resolve), a claimed name counts for nothing and
the connection or request is judged by its address alone: refused, and nginx (the server) logs
nothing. After the same agent resolves the name through Interlock's resolver to X, the same
request succeeds (the control). In intercept mode the upstream certificate may prove the SNI, and
a Host header then counts only when that certificate covers it."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from lab.https import PINNED, WWW, LabDns, LabPKI, Nginx
from lab.instance import Instance
from lab.testing import instance_name, wait_until

pytestmark = pytest.mark.datapath
# An unprivileged uid and a curl path no test selects by: a uid or exe selector of an instance
# running at the same time (test_datapath selects uid 65533 and /usr/bin/curl) enrols matching
# processes into that instance wherever they run.
UNPRIVILEGED = ["setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups"]
API = "api.lab.test"
TOKEN = "api-token-7c1e"

POLICY = f"""\
default: deny
targets:
  www: {{hostname: "{WWW}", port: [80, 443]}}
  api: {{hostname: "{API}", port: 443, credentials: api-token}}
  pinned: {{hostname: "{PINNED}", port: 443, tls: passthrough}}
  wild: {{hostname: "*.wild.lab.test", port: 443}}
rules:
  - name: named-ok
    target: [www, api, pinned, wild]
    decision: allow
"""


@pytest.fixture(scope="module")
def named(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    # X: a second address of the server host, named by no rule
    veth = f"v{lab.b.name}"[:15]
    x4, x6 = lab.b.addr4.rsplit(".", 1)[0] + ".3", lab.b.addr6.rsplit(":", 1)[0] + ":3"
    for addr in (f"{x4}/24", f"{x6}/64"):
        r = lab.b.run(["ip", "addr", "add", addr, "dev", veth, "nodad"] if ":" in addr else
                      ["ip", "addr", "add", addr, "dev", veth])
        assert r.returncode == 0, r.stderr
    pki = LabPKI(d / "pki")
    started: list = []
    readable = tempfile.mkdtemp(prefix="interlock-names-")  # what the unprivileged agent may read
    os.chmod(readable, 0o755)
    try:
        started.append(LabDns(lab.b, lab.b, names=(WWW, API, PINNED), addresses=(x4, x6)))
        nginx = Nginx(lab.b, pki, d / "nginx")
        started.append(nginx)
        policy = d / "policy.yaml"
        policy.write_text(POLICY)
        inst = Instance(lab.a, instance_name("names"), proxy_port=16401, dns_port=16453, policy=str(policy),
                        dns_upstream=lab.b.addr4, tls_trust=str(pki.ca_file))
        started.append(inst)
        inst.start()
        os.chmod(inst.state_dir, 0o711)  # the agent's trust bundle lives in its run dir
        assert inst.cli("credentials", "set", "api-token", "--kind", "bearer", input=TOKEN + "\n").returncode == 0
        inst.nginx, inst.x4 = nginx, x4
        inst.lab_ca = shutil.copy(pki.ca_file, os.path.join(readable, "lab-ca.pem"))
        os.chmod(inst.lab_ca, 0o644)
        inst.curl = shutil.copy("/usr/bin/curl", os.path.join(readable, "curl"))
        os.chmod(inst.curl, 0o755)
        yield inst
    finally:
        for s in reversed(started):
            s.close() if isinstance(s, Instance) else s.stop()
        shutil.rmtree(readable, ignore_errors=True)


def as_agent(inst: Instance, agent: str, shell: str):
    """A shell command as an unprivileged agent under `interlock run`."""
    return inst.agent([*UNPRIVILEGED, "sh", "-c", shell], agent=agent, timeout=120)


def resolve(inst: Instance, agent: str, name: str) -> None:
    r = as_agent(inst, agent, f"getent ahostsv4 {name}")
    assert inst.x4 in r.stdout, f"the lab DNS answers {name} with X through Interlock: {r.stdout} {r.stderr}"


def hits(inst: Instance, needle: str) -> int:
    log = inst.nginx.dir / "access.log"
    return sum(needle in line for line in log.read_text().splitlines()) if log.exists() else 0


def curl(inst: Instance, *args: str) -> str:
    return " ".join([inst.curl, "-sS", "--max-time", "20", "-w", "'\\n%{http_code}'", *args])


def sessions_to(inst: Instance, agent: str, port: int) -> list[dict]:
    return [s for s in inst.sessions(agent) if s["dst_addr"] == inst.x4 and s["dst_port"] == port]


def test_plain_http_host_counts_only_when_resolved_by_the_same_agent(named):
    x, req = named.x4, curl(named, "--resolve", f"{WWW}:80:{named.x4}", f"'http://{WWW}/small?h1'")
    r = as_agent(named, "eve-http", req)
    refused = r.stdout.strip().endswith("403") and "blocked_by_policy" in r.stdout  # a 403 naming the rule
    assert refused, "refused at the first request: " + r.stdout + r.stderr
    assert hits(named, "/small?h1") == 0, "the request reached the server"
    s = wait_until(lambda: [s for s in sessions_to(named, "eve-http", 80) if s["ended"]])
    assert s and s[-1]["verdict"] == "deny" and s[-1]["rule"] == "default", s
    assert any(e["data"]["name"] == WWW and e["data"]["address"] == x for e in named.events("name-unbound"))
    # another agent's resolution binds nothing for this one
    resolve(named, "bot", WWW)
    r = as_agent(named, "eve-http", req)
    assert r.stdout.strip().endswith("403") and hits(named, "/small?h1") == 0, r.stdout + r.stderr
    # the control: the same agent resolves through Interlock, then the same request succeeds
    resolve(named, "eve-http", WWW)
    r = as_agent(named, "eve-http", req)
    assert r.stdout.split() == ["ok", "200"], r.stdout + r.stderr
    assert hits(named, "/small?h1") == 1


def test_passthrough_sni_counts_only_when_resolved(named):
    req = curl(named, "--cacert", named.lab_ca, "--resolve", f"{PINNED}:443:{named.x4}", f"'https://{PINNED}/index.html?p1'")
    r = as_agent(named, "eve-pass", req)
    assert r.stdout.strip().endswith("000"), r.stdout + r.stderr
    assert hits(named, "/index.html?p1") == 0, "the request reached the server"
    s = wait_until(lambda: [s for s in sessions_to(named, "eve-pass", 443) if s["ended"]])
    assert s and s[-1]["verdict"] == "deny" and s[-1]["protocol"] == "tls", s
    # control: resolved through Interlock, the same pinned request goes through undecrypted
    resolve(named, "eve-pass", PINNED)
    r = as_agent(named, "eve-pass", req)
    assert r.stdout.split() == ["hello", "over", "https", "200"], r.stdout + r.stderr
    assert hits(named, "/index.html?p1") == 1
    assert any(e["data"].get("mode") == "passthrough" for e in named.events("tls"))


def test_intercepted_host_counts_only_when_resolved_or_covered_by_the_certificate(named):
    x = named.x4
    # the certificate proves the SNI: www.lab.test at X, not resolved, is let through
    r = as_agent(named, "eve-tls", curl(named, "--resolve", f"{WWW}:443:{x}", f"'https://{WWW}/small?t0'"))
    assert r.stdout.split() == ["ok", "200"], r.stdout + r.stderr
    assert any(e["data"]["name"] == WWW for e in named.events("name-proven"))
    # a Host the certificate does not cover rides on that proof: judged by the address, refused
    fronted = curl(named, "--resolve", f"{WWW}:443:{x}", "-H", f"'Host: {API}'", f"'https://{WWW}/whoami?t1'")
    r = as_agent(named, "eve-tls", fronted)
    assert r.stdout.strip().endswith("403") and "blocked_by_policy" in r.stdout, r.stdout + r.stderr
    assert hits(named, "/whoami?t1") == 0, "the request (and the api credential) reached the server"
    # an SNI the service's certificate does not prove: nothing goes past the handshake
    r = as_agent(named, "eve-tls", curl(named, "--resolve", f"{API}:443:{x}", f"'https://{API}/whoami?t2'"))
    assert r.stdout.strip().endswith("502"), r.stdout + r.stderr
    assert hits(named, "/whoami?t2") == 0
    # a name only a glob matches is never tried on a certificate: the proxy's own ClientHello would
    # carry the agent's labels to the agent's address. Refused at connect: no 502, no handshake.
    r = as_agent(named, "eve-tls", curl(named, "--resolve", f"exfil-4f2a.wild.lab.test:443:{x}",
                                        "'https://exfil-4f2a.wild.lab.test/small?t3'"))
    assert r.stdout.strip().endswith("000"), r.stdout + r.stderr
    s = wait_until(lambda: [s for s in sessions_to(named, "eve-tls", 443) if s["ended"] and s["verdict"] == "deny"])
    assert s and s[-1]["rule"] == "default" and s[-1]["bytes_down"] == 0
    assert any(e["data"]["name"] == "exfil-4f2a.wild.lab.test" and e["data"]["judged"] == "by address"
               for e in named.events("name-unbound"))
    refused = [e["data"] for e in named.events("decision") if e["data"]["protocol"] == "http"
               and e["data"]["verdict"] == "deny" and "/whoami" in e["data"]["summary"]]
    assert refused and refused[-1]["rule"] == "default"
    # control: once the agent resolved api.lab.test to X, the same request is api's, with its credential
    resolve(named, "eve-tls", API)
    r = as_agent(named, "eve-tls", fronted)
    assert r.stdout.split() == ["auth=Bearer", TOKEN, "200"], r.stdout + r.stderr
    assert hits(named, "/whoami?t1") == 1
