"""Hole 4, waiting out the classifier: an agent that sends one byte, sleeps past
`first_byte_timeout` and sends the rest must still be read, never relayed as opaque tcp.

Against real nginx (a `path: /admin*` deny rule) and a real PostgreSQL under the embedded default
policy (DROP is held for a human), the agent (uid 65533 inside `interlock run`) dribbles its
opening: the /admin request must never reach nginx (its access log), the DROP must never reach
PostgreSQL (the table is still there), and each attempt must be on record. The same slow sender
asking for what the policy allows succeeds and is recorded as inspected (the control). Bytes
that stop half-way are refused at `header_timeout`; bytes no parser recognises (a request behind
a leading CRLF, which nginx accepts) are refused where a rule needs reading."""

from __future__ import annotations

import json
import os
import sys

import pytest

from lab.https import WWW, LabPKI, Nginx
from lab.instance import Instance
from lab.postgres import Postgres
from lab.testing import SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath

AS_AGENT = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]
PAUSE = "1.0"  # four times first_byte_timeout
HEADER_TIMEOUT = 4.0 * SLOWDOWN

POLICY = """\
default: deny
targets:
  web: {{address: "{b4}", port: [80, 443]}}
rules:
  - name: no-admin
    target: web
    path: "/admin*"
    decision: deny
    reason: the admin area is not for agents
  - name: web-ok
    target: web
    decision: allow
"""


def slow(inst: Instance, *args: str, timeout: float = 90) -> dict:
    r = inst.agent([*AS_AGENT, sys.executable, "-m", "lab.slow", *args], timeout=timeout)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"no result from lab.slow: {r.stdout[-2000:]} {r.stderr[-2000:]}") from None


def session(inst: Instance, pid: int) -> dict | None:
    return wait_until(lambda: next((s for s in inst.sessions() if s["tgid"] == pid and s["ended"]), None))


def nginx_saw(nginx: Nginx, needle: str) -> int:
    log = nginx.dir / "access.log"
    return sum(needle in line for line in log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def web(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    pki = LabPKI(d / "pki")
    nginx = Nginx(lab.b, pki, d / "nginx")
    (d / "nginx" / "www" / "admin").mkdir()
    (d / "nginx" / "www" / "admin" / "index.html").write_text("admin area\n")
    policy = d / "policy.yaml"
    policy.write_text(POLICY.format(b4=lab.b.addr4))
    inst = Instance(lab.a, instance_name("wait"), proxy_port=16301, dns_port=16353, policy=str(policy),
                    tls_trust=str(pki.ca_file), header_timeout=HEADER_TIMEOUT)
    try:
        inst.start()
        os.chmod(inst.state_dir, 0o711)  # the agent user reads the CA bundle `interlock run` names
        inst.nginx = nginx
        yield inst
    finally:
        inst.close()
        nginx.stop()


@pytest.fixture(scope="module")
def pg(lab):
    with Postgres(lab.b) as server:
        server.psql("CREATE TABLE victim (id int); INSERT INTO victim VALUES (1), (2)")
        inst = Instance(lab.a, instance_name("pgw"), proxy_port=16311, dns_port=16363)  # the embedded default policy
        try:
            inst.start()
            inst.server = server
            yield inst
        finally:
            inst.close()


def http_get(path: str, host: str = WWW, lead: bytes = b"") -> str:
    return (lead + f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()).hex()


def test_slow_http_request_is_still_read(web, lab):
    before = nginx_saw(web.nginx, "/admin")
    r = slow(web, "send", lab.b.addr4, "80", http_get("/admin/index.html"), "--dribble", "3", "--pause", PAUSE)
    assert r["received"].startswith("HTTP/1.1 403"), r
    assert "admin area is not for agents" in r["received"]
    assert nginx_saw(web.nginx, "/admin") == before, "the /admin request reached nginx"
    s = session(web, r["pid"])
    assert s["protocol"] == "http"
    denied = [e["data"] for e in web.events("decision") if e["session"] == s["id"] and e["data"]["verdict"] == "deny"]
    assert denied and denied[0]["rule"] == "no-admin"
    # control: the same slow sender, an allowed path
    r = slow(web, "send", lab.b.addr4, "80", http_get("/index.html"), "--dribble", "3", "--pause", PAUSE)
    assert r["received"].startswith("HTTP/1.1 200") and r["received"].endswith("hello over https\n"), r
    assert wait_until(lambda: nginx_saw(web.nginx, "GET /index.html"))
    s = session(web, r["pid"])
    assert s["protocol"] == "http"
    assert any(e["data"]["action"] == "GET" for e in web.events("decision") if e["session"] == s["id"])


def test_slow_tls_client_hello_is_still_read(web, lab):
    before = nginx_saw(web.nginx, "/admin")
    r = slow(web, "tls", lab.b.addr4, "443", WWW, "/admin/index.html", "--dribble", "3", "--pause", PAUSE)
    assert r.get("status") == 403, r
    assert nginx_saw(web.nginx, "/admin") == before, "the /admin request reached nginx over TLS"
    s = session(web, r["pid"])
    assert s["protocol"] == "tls"
    assert any(e["data"]["rule"] == "no-admin" for e in web.events("decision") if e["session"] == s["id"])
    r = slow(web, "tls", lab.b.addr4, "443", WWW, "/index.html", "--dribble", "3", "--pause", PAUSE)
    assert r.get("status") == 200 and r["body"].endswith("hello over https\n"), r


def test_a_request_that_stops_half_way_is_refused_at_header_timeout(web, lab):
    before = nginx_saw(web.nginx, "/admin")
    wire = http_get("/admin/index.html")[:2 * 12]  # "GET /admin/i", then nothing
    r = slow(web, "send", lab.b.addr4, "80", wire, "--dribble", "1", "--pause", PAUSE,
             "--wait", str(HEADER_TIMEOUT + 10 * SLOWDOWN))
    assert r["end"] == "ECONNRESET" and not r["received"], r
    assert nginx_saw(web.nginx, "/admin") == before
    s = session(web, r["pid"])
    assert (s["outcome"], s["rule"]) == ("denied", "unclassified") and "header_timeout" in s["detail"]


def test_unrecognised_bytes_are_not_relayed_where_a_rule_needs_reading(web, lab):
    """nginx skips a leading CRLF; our parser does not: such bytes are refused, not relayed."""
    before = nginx_saw(web.nginx, "/admin")
    r = slow(web, "send", lab.b.addr4, "80", http_get("/admin/index.html", lead=b"\r\n"), "--dribble", "0")
    assert not r["received"].startswith("HTTP/"), r
    assert nginx_saw(web.nginx, "/admin") == before, "nginx served a request the proxy could not read"
    s = session(web, r["pid"])
    assert (s["outcome"], s["rule"], s["protocol"]) == ("denied", "uninspectable", "tcp"), s
    assert "no-admin" in s["detail"]


def test_slow_postgres_drop_under_the_default_policy_is_held(pg, lab):
    r = slow(pg, "pg", lab.b.addr4, "5432", "DROP TABLE victim", "--dribble", "2", "--pause", PAUSE, "--wait", "4")
    assert not r["ok"], f"DROP completed: {r}"
    assert pg.server.psql("SELECT count(*) FROM victim").strip() == "2", "the table was dropped"
    s = wait_until(lambda: next((x for x in pg.sessions() if x["tgid"] == r["pid"]), None))
    held = [e["data"] for e in pg.events("approval-requested") if e["session"] == s["id"]]
    assert held and "DROP TABLE victim" in held[0]["summary"], pg.events("approval-requested")
    for a in json.loads(pg.cli("approvals", "--json").stdout):
        assert pg.cli("deny", a["id"], "--reason", "not in a test").returncode == 0
    assert session(pg, r["pid"])["protocol"] == "postgres"
    # control: the same slow startup, a read
    r = slow(pg, "pg", lab.b.addr4, "5432", "SELECT count(*) FROM victim", "--dribble", "2", "--pause", PAUSE)
    assert r["ok"] and ["C", "SELECT 1 "] in r["messages"], r
    s = session(pg, r["pid"])
    assert s["protocol"] == "postgres"
    assert any(e["data"]["action"] == "read" for e in pg.events("decision") if e["session"] == s["id"])


def test_slow_postgres_ssl_request_is_answered_by_the_proxy(pg, lab):
    r = slow(pg, "send", lab.b.addr4, "5432", "0000000804d2162f", "--dribble", "8", "--pause", "0.4", "--wait", "3")
    assert r["received"] in ("S", "N"), r
    s = session(pg, r["pid"])
    assert s["protocol"] == "postgres", "an SSLRequest sent slowly was relayed unread"


def test_a_kept_alive_connection_that_stalls_in_its_next_head_is_closed(web, lab):
    first = f"GET /index.html HTTP/1.1\r\nHost: {WWW}\r\n\r\n".encode()
    stalled = b"GET /admin/index.html HTTP/1.1\r\nHo"
    before = nginx_saw(web.nginx, "/admin")
    r = slow(web, "send", lab.b.addr4, "80", (first + stalled).hex(), "--dribble", "0",
             "--wait", str(HEADER_TIMEOUT + 10 * SLOWDOWN))
    assert r["received"].startswith("HTTP/1.1 200") and r["end"] == "ECONNRESET", r  # the control, then the reset
    assert nginx_saw(web.nginx, "/admin") == before
    s = session(web, r["pid"])
    assert s["outcome"] == "header-timeout" and "header_timeout" in s["detail"], s
