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
default: allow
"""


def _web_config(path, rec_url: str, idp: MockProvider):
    path.write_text(yaml.safe_dump({
        "origin": rec_url,
        "oidc": {"issuer": idp.issuer, "client_id": CLIENT_ID, "client_secret": "web-client-secret", "groups_claim": "groups"},
        "approvers": {"groups": ["dba"], "four_eyes": True}}))
    return path


@pytest.fixture(scope="module")
def idp(lab):
    p = MockProvider(lab.b, users=[ALICE, MALLORY])
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def rec(lab, idp, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("web") / "web.yaml"
    c = Central(lab.b, web_config=cfg)
    _web_config(cfg, c.url, idp)
    with c:
        yield c


@pytest.fixture(scope="module")
def target(lab):
    with Postgres(lab.b, port=TARGET_PORT) as pg:
        pg.psql("GRANT CREATE ON SCHEMA public TO PUBLIC; CREATE TABLE holdme (id int, note text);"
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


def wait_for(d, by, what, timeout: float = 15):
    """The element, once the page shows it; the failure names the URL and the page as it is."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, timeout * SLOWDOWN, poll_frequency=0.05).until(ec.presence_of_element_located((by, what)))
    except TimeoutException:
        raise AssertionError(f"no {what} on {d.current_url}: {d.find_element(By.TAG_NAME, 'body').text[:3000]}") from None


def sign_in(browser: Browser, rec: Central, who: str) -> None:
    """Through the provider's own authorization page, as a person would."""
    from selenium.webdriver.common.by import By

    def go(d):
        d.get(rec.url + "/ui/")
        d.find_element(By.NAME, "sub").send_keys(who)
        d.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        return wait_for(d, By.ID, "who").text

    assert browser.do(go) == {"alice": ALICE, "mallory": MALLORY}[who]["email"]


def sign_out(browser: Browser) -> None:
    from selenium.webdriver.common.by import By

    assert browser.do(lambda d: (d.find_element(By.ID, "sign-out").click(), d.find_element(By.ID, "signed-out").text)[1]) \
        == "Signed out"


def test_sign_in_sets_a_hardened_session_cookie_and_sign_out_ends_it(browser, rec, idp):
    sign_in(browser, rec, "alice")
    cookies = browser.do(lambda d: d.get_cookies())
    c = [c for c in cookies if c["name"] == "interlock_web"]
    assert c and c[0]["httpOnly"] and c[0]["secure"] and c[0]["sameSite"] == "Lax", cookies
    sign_out(browser)
    # signed out: the page sends the browser back to the provider to sign in
    assert browser.do(lambda d: (d.get(rec.url + "/ui/sessions"), d.current_url)[1]).startswith(idp.issuer + "/oauth2/authorize")
