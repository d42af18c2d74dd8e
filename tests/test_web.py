"""The approval page in a real headless Chromium, signed in through a real OIDC provider process,
against the real central recorder and its PostgreSQL, with a real Interlock host shipping to it.

Everything web-facing runs in the lab's server host: the recorder (lab/central.py), the provider
(oidc-provider-mock, lab/oidc.py) and the browser (lab/browser.py); the agent host runs Interlock
joined to the recorder, and its agent talks to a second PostgreSQL on the server host."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from lab.browser import Browser
from lab.central import Central, in_host
from lab.instance import INTERLOCK, Instance
from lab.oidc import MockProvider
from lab.postgres import Postgres
from lab.testing import SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath

CLIENT_ID = "interlock-web"
ALICE = {"sub": "alice", "email": "alice@example.com", "name": "Alice DBA", "groups": ["dba"]}
MALLORY = {"sub": "mallory", "email": "mallory@example.com", "groups": ["devs"]}
TARGET_PORT = 5440
XSS = "<script>document.title='pwned';window.pwned=1</script><img src=x onerror=\"window.pwned=2\">"
POLICY = """\
rules:
  - name: hold-deletes
    risk: [delete-without-where]
    decision: approve
    reason: deleting every row needs a DBA
    timeout: 120s
    approvers: {groups: [dba], four_eyes: true}
  - name: hold-truncate
    risk: [truncate]
    decision: approve
    timeout: 3s
default: allow
"""


HOOK_PORT, HOOK_SECRET = 9601, "hook-secret"
RECEIVER = """\
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body.decode()}) + "\\n")
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
"""


def _web_config(path, rec_url: str, idp: MockProvider):
    hook = f"http://127.0.0.1:{HOOK_PORT}"
    path.write_text(yaml.safe_dump({
        "origin": rec_url,
        "oidc": {"issuer": idp.issuer, "client_id": CLIENT_ID, "client_secret": "web-client-secret", "groups_claim": "groups"},
        "approvers": {"groups": ["dba"], "four_eyes": True},
        "webhooks": [{"name": "ops", "url": hook + "/json", "kind": "json", "secret": HOOK_SECRET},
                     {"name": "slack", "url": hook + "/slack", "kind": "slack"}]}))
    return path


@pytest.fixture(scope="module")
def hooks(lab, tmp_path_factory):
    """A real webhook receiver on the server host: every POST it got, in a JSON Lines file."""
    seen = tmp_path_factory.mktemp("hooks") / "seen.jsonl"
    seen.touch()
    p = lab.b.popen([sys.executable, "-c", RECEIVER, str(seen), str(HOOK_PORT)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    try:
        from lab.testing import wait_listening

        wait_listening(lab.b, HOOK_PORT, p)
        yield seen
    finally:
        p.terminate()
        p.wait(10)


@pytest.fixture(scope="module")
def idp(lab):
    p = MockProvider(lab.b, users=[ALICE, MALLORY])
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def rec(lab, idp, hooks, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("web") / "web.yaml"
    c = Central(lab.b, web_config=cfg)
    _web_config(cfg, c.url, idp)
    with c:
        yield c


@pytest.fixture(scope="module")
def target(lab):
    with Postgres(lab.b, port=TARGET_PORT) as pg:
        pg.psql("GRANT CREATE ON SCHEMA public TO PUBLIC; CREATE TABLE holdme (id int, note text); CREATE TABLE holdtoo (id int);"
                " GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;")
        yield pg


@pytest.fixture(scope="module")
def host(lab, rec, tmp_path_factory):
    """Interlock on the agent host, joined to the recorder and shipping to it."""
    pol = tmp_path_factory.mktemp("policy") / "policy.yaml"
    pol.write_text(POLICY)
    inst = Instance(lab.a, instance_name("web"), policy=str(pol), recorder={"server": rec.url})
    try:
        r = inst.cli("join", "--server", rec.url, "--token", rec.token())
        assert r.returncode == 0, r.stderr
        inst.start()
        yield inst
    finally:
        inst.close()


@pytest.fixture(scope="module")
def browser(lab, rec):
    with Browser(lab.b, trust=[rec.state / "server.crt"]) as b:
        yield b


def wait_for(d, by, what: str, timeout: float = 15):
    return Browser.wait(d, by, what, timeout)


def sign_in(browser: Browser, rec: Central, who: str) -> None:
    """Through the provider's own authorization page, as a person would (signing out first when the
    browser's session is someone's already)."""
    from selenium.webdriver.common.by import By

    def go(d):
        d.get(rec.url + "/ui/")
        if d.find_elements(By.ID, "sign-out"):
            d.find_element(By.ID, "sign-out").click()
            wait_for(d, By.ID, "signed-out")
            d.get(rec.url + "/ui/")
        wait_for(d, By.NAME, "sub").send_keys(who)
        d.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        return wait_for(d, By.ID, "who").text

    assert browser.do(go) == {"alice": ALICE, "mallory": MALLORY}[who]["email"]


def sign_out(browser: Browser) -> None:
    from selenium.webdriver.common.by import By

    # the click posts a form: wait for the page it leads to, not the one still on screen
    assert browser.do(lambda d: (d.find_element(By.ID, "sign-out").click(), wait_for(d, By.ID, "signed-out").text)[1]) \
        == "Signed out"


def test_sign_in_sets_a_hardened_session_cookie_and_sign_out_ends_it(browser, rec, idp):
    sign_in(browser, rec, "alice")
    cookies = browser.do(lambda d: d.get_cookies())
    c = [c for c in cookies if c["name"] == "interlock_web"]
    assert c and c[0]["httpOnly"] and c[0]["secure"] and c[0]["sameSite"] == "Lax", cookies
    sign_out(browser)
    # signed out: the page sends the browser back to the provider to sign in
    assert browser.do(lambda d: (d.get(rec.url + "/ui/sessions"), d.current_url)[1]).startswith(idp.issuer + "/oauth2/authorize")


# --- helpers for the held-DELETE tests -------------------------------------------------------

def host_id(inst: Instance) -> str:
    return json.loads((inst.state_dir / "recorder" / "host.json").read_text())["host_id"]


_AGENTS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_agent_outlives_its_test():
    yield
    while _AGENTS:
        p = _AGENTS.pop()
        if p.poll() is None:
            p.kill()
            p.wait(10)


def agent_psql(inst: Instance, lab, sql: str) -> subprocess.Popen:
    """psql as an enrolled agent (uid 65533) against the target PostgreSQL, in the background."""
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
           "setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups",
           "psql", f"host={lab.b.addr4} port={TARGET_PORT} user=postgres dbname=postgres", "-X", "-A", "-t", "-q", "-c", sql]
    started = time.time()
    p = inst.host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.started = started
    _AGENTS.append(p)
    return p


def held(inst: Instance) -> list[dict]:
    return json.loads(inst.cli("approvals", "--json").stdout)


def one_held(inst: Instance, p: subprocess.Popen) -> dict:
    """The hold p's statement made (the newest pending one: an earlier failed test may have left its own)."""
    def mine() -> list[dict]:
        return [a for a in held(inst) if a["created"] >= p.started]

    got = wait_until(lambda: mine() or p.poll() is not None, timeout=30)
    assert got and p.poll() is None, p.communicate()[1] if p.poll() is not None else "nothing held"
    return max(mine(), key=lambda a: a["created"])


def host_store_approval(inst: Instance, approval_id: str) -> dict:
    rows = json.loads(inst.cli("approvals", "--json", "--all").stdout)
    return next(r for r in rows if r["id"] == approval_id)


WATCH_CARDS = """
window.cardSeen = {};
new MutationObserver(() => {
  for (const c of document.querySelectorAll('section.approval'))
    if (!(c.dataset.approval in window.cardSeen)) window.cardSeen[c.dataset.approval] = Date.now();
}).observe(document.getElementById('pending-box'), {childList: true, subtree: true});
"""


def card(d, approval_id: str):
    from selenium.webdriver.common.by import By

    return wait_for(d, By.ID, f"approval-{approval_id}", timeout=30)


def test_a_held_delete_approved_in_the_browser_runs_and_the_replay_names_the_approver(browser, rec, idp, host, target, lab,
                                                                                      hooks):
    """Sign in, see the held DELETE (agent-sent markup shown as text, no script run), approve once:
    the statement runs on the real PostgreSQL; the replay names the approver. The hold was posted to
    both webhooks (signed JSON, Slack's format with the markup escaped), each delivery on record."""
    from selenium.webdriver.common.by import By

    target.psql("DELETE FROM holdme; INSERT INTO holdme VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    sign_in(browser, rec, "alice")
    browser.do(lambda d: d.get(rec.url + "/ui/"))
    title = browser.do(lambda d: d.title)
    browser.do(lambda d: d.execute_script(WATCH_CARDS))  # when each card first shows, by the browser's clock
    p = agent_psql(host, lab, f"delete from holdme /* {XSS} */; select 'after'")
    a = one_held(host, p)
    browser.do(lambda d: card(d, a["id"]))
    hold_to_page = browser.do(lambda d: d.execute_script("return window.cardSeen[arguments[0]]", a["id"])) / 1000 - a["created"]
    assert target.psql("SELECT count(*) FROM holdme") == "3", "nothing reaches the server while held"

    def read_card(d):
        c = card(d, a["id"])
        return {k: c.find_element(By.CSS_SELECTOR, "." + k).text for k in ("agent", "target", "operation", "summary", "rule", "reason")}

    seen = browser.do(read_card)
    assert seen["agent"] == "bot" and seen["target"] == f"{lab.b.addr4}:{TARGET_PORT}"
    assert seen["rule"] == "hold-deletes" and seen["reason"] == "deleting every row needs a DBA"
    assert XSS in seen["summary"], seen  # the agent's markup is shown as text, in full
    assert browser.do(lambda d: d.execute_script("return [document.title, window.pwned === undefined,"
                                                 " document.querySelectorAll('#pending script, #pending img').length]")) \
        == [title, True, 0]

    def approve(d):
        button = card(d, a["id"]).find_element(By.CSS_SELECTOR, "button.approve")
        t = time.time()
        button.click()
        return t

    clicked = browser.do(approve)
    out, err = p.communicate(timeout=60 * SLOWDOWN)
    released = time.time()
    assert p.returncode == 0 and out.strip() == "after", err
    assert target.psql("SELECT count(*) FROM holdme") == "0", "the approved DELETE ran on the server"
    stored = host_store_approval(host, a["id"])
    assert stored["status"] == "approved" and "alice@example.com" in stored["decided_by"] and "oidc sub alice" in stored["decided_by"]
    print(f"\nbench web-approvals: hold-to-page {hold_to_page * 1000:.0f} ms, approve-to-release "
          f"{(stored['decided_at'] - clicked) * 1000:.0f} ms (to the host's store), "
          f"{(released - clicked) * 1000:.0f} ms (to psql's exit)")

    from central.notify import verify

    def posted() -> dict:
        got = [json.loads(x) for x in hooks.read_text().splitlines()]
        return {g["path"]: g for g in got if a["id"] in g["body"]}

    got = wait_until(lambda: len(posted()) == 2 and posted(), timeout=30)
    assert got, hooks.read_text()
    j = got["/json"]
    assert verify(HOOK_SECRET.encode(), j["body"].encode(), j["headers"].get("X-Interlock-Timestamp"),
                  j["headers"].get("X-Interlock-Signature"))
    body = json.loads(j["body"])
    assert body["approval"]["summary"].startswith("delete from holdme") and body["link"].endswith(f"/ui/approvals/{a['id']}")
    assert "&lt;script&gt;" in got["/slack"]["body"] and "<script>" not in got["/slack"]["body"]
    assert rec.psql(f"SELECT count(*) FROM webhook_deliveries WHERE approval = '{a['id']}' AND ok") == "2"

    notice = browser.do(lambda d: wait_for(d, By.ID, "notice").text)
    assert notice.startswith(f"approved: approval {a['id']}")

    def replay(d):
        d.get(f"{rec.url}/ui/sessions/{host_id(host)}/{a['session']}")
        return [e.text for e in d.find_elements(By.CSS_SELECTOR, "#timeline li")]

    lines = wait_until(lambda: [x for x in browser.do(replay) if "approved" in x and "alice@example.com" in x], timeout=30)
    assert lines, browser.do(replay)
    # sessions, filtered: the agent's sessions are listed with a link to this replay; a filter matching none shows none
    def listed(d, query: str) -> list[str]:
        d.get(f"{rec.url}/ui/sessions?{query}")
        return [e.get_attribute("href") for e in d.find_elements(By.CSS_SELECTOR, "#sessions tr.session a")]

    assert any(h.endswith(f"/ui/sessions/{host_id(host)}/{a['session']}") for h in browser.do(listed, "agent=bot"))
    assert browser.do(listed, "agent=nobody") == [] and browser.do(listed, f"target={lab.b.addr4}:{TARGET_PORT}")
    browser.do(replay)
    # the replay shows the agent's statement, markup and all, as text too
    assert any(XSS in x for x in browser.do(replay))
    assert browser.do(lambda d: d.execute_script("return [window.pwned === undefined, document.querySelectorAll('#timeline script,"
                                                 " #timeline img').length]")) == [True, 0]


ATTACKER = """\
import http.server, ssl, sys
page = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "text/html"); self.end_headers(); self.wfile.write(page)
srv = http.server.HTTPServer((sys.argv[2], int(sys.argv[3])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[4], sys.argv[5])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


def post_as(rec: Central, lab, path: str, cookie: str, headers: dict, form: dict) -> tuple[int, str]:
    import ssl

    import httpx

    def go():
        with httpx.Client(verify=ssl.create_default_context(cafile=str(rec.ca_pem)), timeout=30,
                          cookies={"interlock_web": cookie}) as c:
            r = c.post(rec.url + path, data=form, headers=headers)
            return r.status_code, r.text

    return in_host(lab.b, go)


def test_cross_site_and_tokenless_posts_are_refused_and_the_page_s_own_deny_works(browser, rec, idp, host, target, lab, tmp_path):
    """CSRF: a page on another origin of the same site (so the SameSite=Lax cookie IS sent) posts an
    approval: refused by the Origin check, nothing decided. With the cookie but no token, or the token
    but a foreign Origin: refused. Control: the page's own deny (same origin, token) works and the
    agent gets the reason."""
    from selenium.webdriver.common.by import By

    target.psql("DELETE FROM holdme; INSERT INTO holdme VALUES (7, 'keep me')")
    sign_in(browser, rec, "alice")
    p = agent_psql(host, lab, "delete from holdme; select 'after'")
    a = one_held(host, p)
    hid = host_id(host)
    path = f"/ui/approvals/{hid}/{a['id']}"
    page = tmp_path / "evil.html"
    page.write_text(f"""<html><body><form method="post" action="{rec.url}{path}">
        <input name="action" value="approve"><input name="csrf_token" value="guessed"></form>
        <script>document.forms[0].submit()</script></body></html>""")
    evil = lab.b.popen([sys.executable, "-c", ATTACKER, str(page), lab.b.addr4, "9501", str(rec.state / "server.crt"),
                        str(rec.state / "server.key")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from lab.testing import wait_listening

        wait_listening(lab.b, 9501, evil)
        body = browser.do(lambda d: (d.get(f"https://{lab.b.addr4}:9501/"),
                                     wait_until(lambda: "/ui/approvals/" in d.current_url, timeout=15),
                                     d.find_element(By.TAG_NAME, "body").text)[-1])
    finally:
        evil.terminate()
        evil.wait(10)
    assert "Origin check" in body, body
    cookie = next(c["value"] for c in browser.do(lambda d: d.get_cookies()) if c["name"] == "interlock_web")
    browser.do(lambda d: d.get(rec.url + "/ui/"))
    token = browser.do(lambda d: card(d, a["id"]).find_element(By.NAME, "csrf_token").get_attribute("value"))
    assert post_as(rec, lab, path, cookie, {"Origin": rec.url}, {"action": "approve"})[0] == 403  # no token
    assert post_as(rec, lab, path, cookie, {"Origin": rec.url}, {"action": "approve", "csrf_token": "x" + token})[0] == 403
    assert post_as(rec, lab, path, cookie, {"Origin": "https://evil.example"}, {"action": "approve", "csrf_token": token})[0] == 403
    assert post_as(rec, lab, path, cookie, {}, {"action": "approve", "csrf_token": token})[0] == 403  # no Origin, no Referer
    # nothing was decided, on either side; every refusal is on record
    assert rec.psql(f"SELECT count(*) FROM approval_decisions WHERE approval = '{a['id']}'") == "0"
    assert host_store_approval(host, a["id"])["status"] == "pending" and p.poll() is None
    assert int(rec.psql(f"SELECT count(*) FROM refusals WHERE path = '{path}' AND status = 403")) >= 5
    assert target.psql("SELECT count(*) FROM holdme") == "1"

    def deny(d):
        c = card(d, a["id"])
        c.find_element(By.CSS_SELECTOR, "input.deny-reason").send_keys("not during business hours")
        c.find_element(By.CSS_SELECTOR, "button.deny").click()
        return wait_for(d, By.ID, "notice").text

    assert browser.do(deny).startswith(f"denied: approval {a['id']}")
    out, err = p.communicate(timeout=60 * SLOWDOWN)
    assert "the approver said: not during business hours" in err and p.returncode != 0, err
    assert target.psql("SELECT count(*) FROM holdme") == "1", "the denied DELETE never reached the server"
    stored = host_store_approval(host, a["id"])
    assert stored["status"] == "denied" and stored["note"] == "not during business hours" and "alice@example.com" in stored["decided_by"]


def api(rec: Central, lab, method: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    import ssl

    import httpx

    def go():
        with httpx.Client(verify=ssl.create_default_context(cafile=str(rec.ca_pem)), timeout=30) as c:
            r = c.request(method, rec.url + path, json=body, headers={"Authorization": f"Bearer {token}"} if token else {})
            return r.status_code, r.json()

    return in_host(lab.b, go)


def test_automation_answers_with_the_providers_token_and_only_approver_groups_may(rec, idp, host, target, lab):
    """The API takes the provider's ID token as a bearer token: none or a wrong-audience one is
    refused (401), a valid one outside the approver groups is refused (403); alice's approves for
    ten minutes, so the same DELETE runs again without a hold (the host's standing grant)."""
    target.psql("DELETE FROM holdme; INSERT INTO holdme VALUES (1, 'a'), (2, 'b')")
    p = agent_psql(host, lab, "delete from holdme")
    a = one_held(host, p)
    path = f"/ui/api/approvals/{host_id(host)}/{a['id']}"
    listed = wait_until(lambda: [x for x in api(rec, lab, "GET", "/ui/api/approvals", idp.token("alice", CLIENT_ID))[1]
                                 .get("approvals", []) if x["id"] == a["id"]], timeout=30)
    assert listed and listed[0]["approvers"] == {"groups": ["dba"], "four_eyes": True}, listed  # the rule's, from the host's record
    status, body = api(rec, lab, "POST", path, None, {"decision": "approve"})
    assert status == 401 and "Bearer" in body["error"]
    status, body = api(rec, lab, "POST", path, idp.token("alice", "another-client"), {"decision": "approve"})
    assert status == 401 and "audience" in body["error"], body
    status, body = api(rec, lab, "POST", path, idp.token("mallory", CLIENT_ID), {"decision": "approve"})
    assert status == 403 and "not in an approver group" in body["error"], body
    assert host_store_approval(host, a["id"])["status"] == "pending" and p.poll() is None
    assert target.psql("SELECT count(*) FROM holdme") == "2"
    status, body = api(rec, lab, "POST", path, idp.token("alice", CLIENT_ID), {"decision": "approve", "for_seconds": 600})
    assert status == 200, body
    out, err = p.communicate(timeout=60 * SLOWDOWN)
    assert p.returncode == 0 and target.psql("SELECT count(*) FROM holdme") == "0", err
    assert host_store_approval(host, a["id"])["grant_until"] > time.time() + 500
    target.psql("INSERT INTO holdme VALUES (3, 'c')")
    r = agent_psql(host, lab, "delete from holdme")
    r.communicate(timeout=60 * SLOWDOWN)
    assert r.returncode == 0 and target.psql("SELECT count(*) FROM holdme") == "0", "the grant covers the same DELETE"


def test_with_the_recorder_down_a_hold_times_out_into_a_refusal_and_roots_cli_still_answers(rec, host, target, lab):
    """No inbound port, no dependence: while the recorder is stopped a hold nobody answers expires
    into a refusal (nothing reaches the server), and `interlock approve` on the host still works."""
    target.psql("DELETE FROM holdtoo; INSERT INTO holdtoo VALUES (5)")
    rec.stop_server()
    try:
        t0 = time.monotonic()
        r = agent_psql(host, lab, "truncate holdtoo")
        _, err = r.communicate(timeout=60 * SLOWDOWN)
        assert "not approved (expired)" in err and time.monotonic() - t0 > 2.5, err
        assert target.psql("SELECT count(*) FROM holdtoo") == "1"
        p = agent_psql(host, lab, "delete from holdtoo")
        a = one_held(host, p)
        assert host.cli("approve", a["id"]).returncode == 0
        _, err = p.communicate(timeout=60 * SLOWDOWN)
        assert p.returncode == 0 and target.psql("SELECT count(*) FROM holdtoo") == "0", err
    finally:
        rec.start_server()
