"""HTTPS and HTTP through the full capture path: curl, requests and httpx as agents against
Debian's nginx, with no endpoint change. Interlock terminates TLS with a leaf for the SNI (the
agent trusts it through `interlock run`), verifies nginx against the lab's own CA, judges each
request (method, host, path, query, headers), holds, refuses, masks, and records every request."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from lab.https import BAD, BAD_PORT, PINNED, WS_PORT, WWW, LabDns, LabPKI, Nginx, WsEcho
from lab.instance import INTERLOCK, Instance
from lab.testing import instance_name, wait_until

pytestmark = pytest.mark.datapath
TOKEN = "stored-token-9f1c"  # what the credential store injects; the agent never holds it

POLICY = """\
default: deny
targets:
  www: {{hostname: "{www}", port: [80, 443], credentials: www-token}}
  bad: {{hostname: "{bad}"}}
  pinned: {{hostname: "{pinned}", tls: passthrough}}
  ws: {{address: ["{b4}", "{b6}"], port: {ws}}}
rules:
  - name: no-admin
    target: www
    path: "/admin/*"
    decision: deny
    reason: the admin area is not for agents
  - name: no-forced-delete
    target: www
    method: DELETE
    query: "*force=1*"
    decision: deny
  - name: no-debug
    target: www
    header: {{x-debug: "on"}}
    decision: deny
  - name: uploads-need-a-human
    target: www
    method: PUT
    path: "/upload/held/*"
    decision: approve
    timeout: 1m
  - name: mask-people
    target: www
    path: "/people.json"
    decision: mask
    mask: [email, password, credit_card]
  - name: www-ok
    target: www
    decision: allow
  - name: others-ok
    target: [bad, pinned, ws]
    decision: allow
"""


@pytest.fixture(scope="module")
def web(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    pki = LabPKI(d / "pki")
    started = []
    try:
        started.append(LabDns(lab.b, lab.b))
        nginx = Nginx(lab.b, pki, d / "nginx")
        started.append(nginx)
        started.append(WsEcho(lab.b))
        policy = d / "policy.yaml"
        policy.write_text(POLICY.format(www=WWW, bad=BAD, pinned=PINNED, b4=lab.b.addr4, b6=lab.b.addr6, ws=WS_PORT))
        inst = Instance(lab.a, instance_name("web"), proxy_port=16201, dns_port=16253, policy=str(policy),
                        dns_upstream=lab.b.addr4, tls_trust=str(pki.ca_file))
        started.append(inst)
        inst.start()
        r = inst.cli("credentials", "set", "www-token", "--kind", "bearer", input=TOKEN + "\n")
        assert r.returncode == 0, r.stderr
        inst.nginx, inst.pki = nginx, pki
        yield inst
    finally:
        for s in reversed(started):
            s.close() if isinstance(s, Instance) else s.stop()


def curl(inst: Instance, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return inst.agent(["curl", "-sS", "--max-time", "30", *args], timeout=timeout)


def py(inst: Instance, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    r = inst.agent([sys.executable, "-c", script], timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def seen_by_nginx(inst: Instance, needle: str) -> int:
    log = inst.nginx.dir / "access.log"
    return sum(needle in line for line in log.read_text().splitlines()) if log.exists() else 0


def requests_for(inst: Instance, path: str) -> list[dict]:
    """The request events for path; the proxy records a request a moment after answering it."""
    def found() -> list[dict]:
        return [e["data"] for e in inst.events("http") if e["data"]["path"].startswith(path)]
    return wait_until(found, timeout=5)


def test_curl_over_https_works_unchanged(web):
    r = curl(web, "-w", "\n%{http_code} %{http_version}", f"https://{WWW}/index.html")
    assert r.returncode == 0, r.stderr
    body, status = r.stdout.rsplit("\n", 1)
    assert body == "hello over https\n" and status == "200 1.1"  # curl offered h2; http/1.1 was negotiated
    tls = [e["data"] for e in web.events("tls") if e["data"]["sni"] == WWW]
    assert tls and tls[-1]["alpn"] == "http/1.1" and "h2" in tls[-1]["offered_alpn"]
    req = requests_for(web, "/index.html")[-1]
    assert (req["method"], req["host"], req["status"], req["verdict"], req["rule"]) == ("GET", WWW, 200, "allow", "www-ok")
    s = next(x for x in web.sessions() if x["dst_port"] == 443 and x["protocol"] == "tls")
    assert s["outcome"] == "closed"
    assert "http     " in web.cli("replay", s["id"]).stdout


def test_requests_keeps_alive_and_the_credential_is_injected(web):
    r = py(web, f"""
import requests
s = requests.Session()
a = s.get("https://{WWW}/whoami", headers={{"Authorization": "Bearer agent-made-up"}})
b = s.get("https://{WWW}/small")
print(a.status_code, a.text.strip(), b.status_code, b.text.strip())
""")
    assert r.stdout.split() == ["200", "auth=Bearer", TOKEN, "200", "ok"]
    a, b = requests_for(web, "/whoami")[-1], requests_for(web, "/small")[-1]
    sessions = {e["session"] for e in web.events("http") if e["data"] in (a, b)}
    assert len(sessions) == 1, "both requests went over one kept-alive connection"


def test_httpx_posts_chunked_and_reads_it_back(web):
    r = py(web, f"""
import httpx, hashlib
def gen():
    for i in range(64):
        yield bytes([i]) * 4096
with httpx.Client() as c:
    put = c.put("https://{WWW}/upload/chunked.bin", content=gen())
    got = c.get("https://{WWW}/upload/chunked.bin")
print(put.status_code, got.status_code, hashlib.sha256(got.content).hexdigest())
""")
    want = hashlib.sha256(b"".join(bytes([i]) * 4096 for i in range(64))).hexdigest()
    assert r.stdout.split() == ["201", "200", want]
    put = requests_for(web, "/upload/chunked.bin")[0]
    assert put["method"] == "PUT" and put["up"] == 64 * 4096


def test_large_upload_with_expect_continue_is_streamed_not_buffered(web, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for i in range(96):
            f.write(hashlib.sha256(str(i).encode()).digest() * 32768)  # 1 MiB each
    pids = web.status()["proxy_pids"]  # every proxy worker: the sum grows at least as the relaying one's
    hwm0 = sum(_hwm(p) for p in pids)
    r = curl(web, "-T", str(big), "-w", "%{http_code}", f"https://{WWW}/upload/big.bin", timeout=120)
    assert r.stdout.strip() == "201", r.stderr  # curl sends Expect: 100-continue for a body this size
    r = curl(web, "-o", str(tmp_path / "back.bin"), "-w", "%{http_code}", f"https://{WWW}/upload/big.bin", timeout=120)
    assert r.stdout.strip() == "200", r.stderr
    assert _sha(tmp_path / "back.bin") == _sha(big)
    assert sum(_hwm(p) for p in pids) - hwm0 < 48 << 20, "96 MiB each way went through without being held whole"


def _hwm(pid: int) -> int:
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) << 10


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipelined_requests_are_answered_in_order(web):
    r = py(web, f"""
import socket, ssl, os
s = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]).wrap_socket(
    socket.create_connection(("{WWW}", 443)), server_hostname="{WWW}")
s.sendall(b"GET /small HTTP/1.1\\r\\nHost: {WWW}\\r\\n\\r\\nGET /admin/x HTTP/1.1\\r\\nHost: {WWW}\\r\\n\\r\\n"
          b"GET /index.html HTTP/1.1\\r\\nHost: {WWW}\\r\\nConnection: close\\r\\n\\r\\n")
buf = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.decode())
""")
    out = r.stdout
    assert out.count("HTTP/1.1 ") == 3, out
    assert out.index("ok\n") < out.index("blocked_by_policy") < out.index("hello over https")


def test_rules_on_path_method_query_and_headers_refuse_with_403_json(web):
    cases = [
        ([f"https://{WWW}/admin/users"], "no-admin", "/admin/users"),
        ([f"http://{WWW}/admin/plain"], "no-admin", "/admin/plain"),  # plain http: the same treatment
        (["-X", "DELETE", f"https://{WWW}/upload/x?force=1"], "no-forced-delete", "/upload/x?force=1"),
        (["-H", "X-Debug: on", f"https://{WWW}/small?dbg"], "no-debug", "/small?dbg"),
        ([f"https://{WWW}/%61dmin/../admin/sneaky"], "no-admin", "admin/sneaky"),
    ]
    for args, rule, path in cases:
        r = curl(web, "-i", *args)
        head, _, body = r.stdout.partition("\n\n")  # text mode: curl -i line ends come as \n
        assert head.startswith("HTTP/1.1 403"), (args, r.stdout, r.stderr)
        assert body and json.loads(body)["error"] == "blocked_by_policy" and json.loads(body)["rule"] == rule, (args, r.stdout)
        assert f"x-interlock: blocked; rule={rule}" in head.lower()
        assert seen_by_nginx(web, path) == 0, f"{path} reached the server"
    denied = [d for d in (e["data"] for e in web.events("decision")) if d["verdict"] == "deny"]
    assert {d["rule"] for d in denied} >= {"no-admin", "no-forced-delete", "no-debug"}
    # a DELETE without force=1 is not this rule's business
    assert curl(web, "-X", "DELETE", "-w", "%{http_code}", "-o", "/dev/null", f"https://{WWW}/upload/none").stdout == "404"


def test_held_request_waits_for_a_human(web, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("quarterly numbers\n")
    cmd = [*INTERLOCK, "run", "--state-dir", str(web.state_dir), "--agent", "bot", "--", "curl", "-sS",
           "--max-time", "60", "-w", "%{http_code}", "-T", str(report), f"https://{WWW}/upload/held/report.txt"]
    p = web.host.popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = wait_until(lambda: json.loads(web.cli("approvals", "--json").stdout), timeout=30)
        assert held and held[0]["rule"] == "uploads-need-a-human" and held[0]["action"] == "PUT"
        time.sleep(0.3)
        assert seen_by_nginx(web, "/upload/held/") == 0, "nothing reaches the server while held"
        assert web.cli("approve", held[0]["id"]).returncode == 0
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert out == "201", err
    assert (web.nginx.dir / "www" / "upload" / "held" / "report.txt").read_text() == "quarterly numbers\n"


def test_json_is_masked_on_a_mask_decision(web):
    r = py(web, f"""
import requests, json
print(json.dumps(requests.get("https://{WWW}/people.json").json()))
""")
    people = json.loads(r.stdout)["people"]
    assert [p["name"] for p in people] == ["Ada", "Bob"]
    assert "@" not in json.dumps(people) and "hunter2" not in r.stdout and "4111" not in r.stdout
    masked = web.events("masked")[-1]["data"]
    assert masked["rule"] == "mask-people" and {"people.email", "people.password"} <= set(masked["fields"])
    assert masked["detectors"] == {"credit_card": 1}  # the card number, found by its shape under another key


def test_upstream_verification_failure_is_a_clear_502(web):
    r = curl(web, "-w", "\n%{http_code}", f"https://{BAD}:{BAD_PORT}/index.html")
    body, status = r.stdout.rsplit("\n", 1)
    assert status == "502", r.stderr
    detail = json.loads(body)["detail"]
    assert "certificate" in detail and BAD in detail and "verif" in detail
    assert any(e["data"]["sni"] == BAD for e in web.events("tls-upstream-failed"))


def test_a_service_that_hangs_up_gives_a_502_not_a_silent_reset(web):
    r = curl(web, "-w", "\n%{http_code}", f"https://{WWW}/drop")  # nginx's 444: close without answering
    body, status = r.stdout.rsplit("\n", 1)
    assert status == "502" and "closed the connection" in json.loads(body)["detail"], r.stdout + r.stderr
    assert requests_for(web, "/drop")[-1]["outcome"] == "upstream-error"


def test_passthrough_host_is_not_decrypted_but_still_judged(web):
    # The agent pins the service's real CA: only an undecrypted connection can satisfy it.
    r = curl(web, "--cacert", str(web.pki.ca_file), f"https://{PINNED}/index.html")
    assert r.returncode == 0 and r.stdout == "hello over https\n", r.stderr
    assert any(e["data"].get("mode") == "passthrough" for e in web.events("tls"))
    # an intercepted host presents Interlock's leaf, which that pinned CA does not sign
    r = curl(web, "--cacert", str(web.pki.ca_file), f"https://{WWW}/index.html")
    assert r.returncode == 60, r.stderr
    d = [e["data"] for e in web.events("decision") if e["data"]["action"] == "connect" and e["data"]["protocol"] == "tls"]
    assert any(x["rule"] == "others-ok" for x in d), "judged by SNI at connect"


def test_websocket_upgrade_is_recorded_then_relayed(web):
    r = web.agent([sys.executable, "-m", "lab.wsecho", "client", f"ws://{WWW}:{WS_PORT}/chat", "hello socket"], timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "hello socket", r.stderr
    up = web.events("http-upgrade")[-1]["data"]
    assert up["protocol"] == "websocket" and up["path"] == "/chat"
    assert requests_for(web, "/chat")[-1]["status"] == 101


def test_malformed_request_is_refused_never_passed(web):
    before = seen_by_nginx(web, "GET")
    r = py(web, f"""
import socket
s = socket.create_connection(("{WWW}", 80))
s.sendall(b"GET /small HTTP/1.1\\r\\nHost: {WWW}\\r\\nContent-Length: nope\\r\\n\\r\\n")
print(s.recv(65536).decode(errors="replace").splitlines()[0])
""")
    assert r.stdout.startswith("HTTP/1.1 400"), r.stdout
    assert seen_by_nginx(web, "GET") == before
    assert web.events("http-refused")


def test_secrets_never_reach_the_recording(web):
    # The secrets come on stdin: the agent's command line is on record, as it should be.
    secrets = ["query-secret-1", "agent-secret-2", "cookie-secret-3", "amz-secret-4"]
    r = web.agent([sys.executable, "-c", f"""
import requests, sys
q, a, c, t = sys.stdin.read().split()
r = requests.get("https://{WWW}/whoami?token=" + q, headers={{"Authorization": "Bearer " + a, "Cookie": "sid=" + c,
                 "X-Amz-Security-Token": t}})
print(r.status_code)
"""], input=" ".join(secrets), timeout=60)
    assert r.stdout.strip() == "200", r.stderr[-2000:]
    assert requests_for(web, "/whoami?token=")
    db = (web.state_dir / "recorder.db").read_bytes()
    wal = web.state_dir / "recorder.db-wal"
    db += wal.read_bytes() if wal.exists() else b""
    for secret in [*secrets, TOKEN]:
        assert secret.encode() not in db, secret


def test_one_kept_alive_connection_is_judged_per_request_shape_and_per_policy(web, tmp_path):
    """The proxy keeps the allowed decisions of a connection by request shape (proxy/gate.py
    DecisionCache). A header a rule names makes another shape; a refusal is judged and recorded
    every time; a policy reload is seen by the next request on the same connection, also when
    that request repeats the one before it byte for byte (proxy.http.model, SEEN_HEADS)."""
    go, ready = tmp_path / "go", tmp_path / "ready"
    policy_file = web.config["policy"]
    original = open(policy_file).read()
    out: dict = {}

    def agent() -> None:
        out["r"] = py(web, f"""
import os, time, requests
s = requests.Session()
codes = [s.get("https://{WWW}/small?shape-a", headers=h).status_code
         for h in ({{}}, {{"X-Debug": "on"}}, {{}}, {{"X-Debug": "on"}}, {{}}, {{}})]
open("{ready}", "w").close()
while not os.path.exists("{go}"):
    time.sleep(0.05)
codes += [s.get("https://{WWW}/small?shape-a").status_code for _ in range(2)]
print(*codes)
""")

    import threading
    loaded = len(web.events("policy-loaded"))
    t = threading.Thread(target=agent)
    t.start()
    try:
        assert wait_until(ready.exists, timeout=60)
        # the same request is now refused by a rule ahead of the one that allowed it
        _write(policy_file, original.replace("rules:\n", 'rules:\n  - name: no-small-now\n    path: "/small"\n'
                                                           '    decision: deny\n', 1))
        assert wait_until(lambda: len(web.events("policy-loaded")) > loaded, timeout=10)
        go.touch()
        t.join(120)
    finally:
        _write(policy_file, original)
        go.touch()
        t.join(120)
    assert wait_until(lambda: len(web.events("policy-loaded")) > loaded + 1, timeout=10)
    assert out["r"].stdout.split() == ["200", "403", "200", "403", "200", "200", "403", "403"], out["r"].stdout
    assert seen_by_nginx(web, "/small?shape-a") == 4, "only the four allowed requests reached nginx"
    reqs = [e for e in web.events("http") if e["data"]["path"] == "/small?shape-a"]
    assert len(reqs) == 8 and len({e["session"] for e in reqs}) == 1, "one kept-alive connection"
    sid = reqs[0]["session"]
    assert [e["data"]["rule"] for e in reqs] == ["www-ok", "no-debug", "www-ok", "no-debug", "www-ok", "www-ok",
                                                 "no-small-now", "no-small-now"]
    decisions = [e["data"] for e in web.events("decision") if e["session"] == sid and e["data"]["action"] == "GET"]
    refusals = [d["rule"] for d in decisions if d["verdict"] == "deny"]
    assert refusals == ["no-debug", "no-debug", "no-small-now", "no-small-now"], "each refusal on record"
    assert [d["rule"] for d in decisions if d["verdict"] == "allow"] == ["www-ok"] * 4


def _write(path: str, text: str) -> None:
    """Replace a file at once: the proxy's policy watcher never reads it half-written."""
    tmp = f"{path}.new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
