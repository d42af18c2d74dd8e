"""The connection gate through the real capture path: allow, deny, hold for a human, grants,
timeouts, policy reload, and the replay a reviewer reads afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lab.instance import INTERLOCK, Instance
from lab.testing import ECHO_PORT, SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath
OTHER_PORT = 7100
WEB_PORT = 7180
HOLD_SECONDS = 3 * SLOWDOWN  # long enough for the CLI calls that answer a hold


def policy_text(b4: str, b6: str, allow_echo: bool = True) -> str:
    return f"""\
targets:
  echo: {{address: {b4}, port: {ECHO_PORT}}}
  other: {{address: {b4}, port: {OTHER_PORT}}}
  echo-v6: {{address: "{b6}", port: {ECHO_PORT}}}
  web-v6: {{address: "{b6}", port: {WEB_PORT}}}
  web-v4: {{address: {b4}, port: {WEB_PORT}}}
rules:
  - name: no-web-v4
    target: web-v4
    decision: deny
    reason: use the v6 door
  - name: hold-v6
    target: [echo-v6, web-v6]
    decision: approve
    timeout: {HOLD_SECONDS:g}s
  - name: echo-ok
    target: echo
    decision: {"allow" if allow_echo else "deny"}
  - name: no-other
    target: other
    decision: deny
    reason: the other service is off limits
"""


@pytest.fixture(scope="module")
def other(echo_at):
    return echo_at(OTHER_PORT)


@pytest.fixture(scope="module")
def gated(lab, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(policy_text(lab.b.addr4, lab.b.addr6))
    inst = Instance(lab.a, instance_name("g"), proxy_port=15701, dns_port=15753, policy=str(policy))
    inst.policy_file = policy
    inst.start()
    yield inst
    inst.close()


def background_probe(inst: Instance, host: str) -> subprocess.Popen:
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
           sys.executable, "-m", "lab.probe", "tcp", host, str(ECHO_PORT)]
    return inst.host.popen(cmd, stdout=subprocess.PIPE, text=True)


def pending(inst: Instance) -> list[dict]:
    return json.loads(inst.cli("approvals", "--json").stdout)


def test_allowed_target_works_and_the_decision_is_recorded(gated, lab, echo):
    r = gated.probe("tcp", lab.b.addr4, str(ECHO_PORT))
    assert r["ok"], r
    # a connect decision that cannot depend on the protocol is kept on the session row itself
    s = wait_until(lambda: next((x for x in gated.sessions() if x["tgid"] == r["pid"]), None))
    assert (s["verdict"], s["rule"]) == ("allow", "echo-ok")
    assert "ALLOW" in gated.cli("replay", s["id"]).stdout


def test_denied_target_never_sees_the_connection(gated, lab, other):
    before = len(other.seen())
    r = gated.probe("tcp", lab.b.addr4, str(OTHER_PORT))
    assert not r["ok"], r
    time.sleep(0.3)
    assert len(other.seen()) == before
    s = wait_until(lambda: next((x for x in gated.sessions() if x["tgid"] == r["pid"]), None))
    assert s["outcome"] == "denied" and "off limits" in s["detail"]


def test_unlisted_destination_falls_to_default_deny(gated, lab, dns_echo):
    r = gated.probe("tcp", lab.b.addr4, "53")
    assert not r["ok"]
    assert any(e["data"]["rule"] == "default" and e["data"]["verdict"] == "deny" for e in gated.events("decision"))


def test_held_connection_waits_for_approval_then_runs(gated, lab, echo):
    before = len(echo.seen())
    p = background_probe(gated, lab.b.addr6)
    held = wait_until(lambda: pending(gated))
    assert held and held[0]["rule"] == "hold-v6" and held[0]["agent"] == "bot"
    time.sleep(0.5)
    assert len(echo.seen()) == before, "nothing reaches the server while the agent is held"
    r = gated.cli("approve", held[0]["id"])
    assert r.returncode == 0, r.stderr
    out, _ = p.communicate(timeout=20 * SLOWDOWN)
    assert json.loads(out.strip().splitlines()[-1])["ok"]
    rows = json.loads(gated.cli("approvals", "--all", "--json").stdout)
    row = next(x for x in rows if x["id"] == held[0]["id"])
    assert row["status"] == "approved" and "uid 0" in row["decided_by"]
    # the replay tells the story in order
    replay = gated.cli("replay", row["session"]).stdout
    assert replay.index("APPROVE") < replay.index("approval-requested") < replay.index("approval-approved")
    tl = json.loads(gated.cli("replay", row["session"], "--json").stdout)
    assert tl["session"]["outcome"] == "closed" and tl["session"]["bytes_down"] > 0


@pytest.fixture(scope="module")
def web6(lab, tmp_path_factory):
    from lab.testing import stop_process, wait_listening

    root = tmp_path_factory.mktemp("web6")
    (root / "index.html").write_text("held page\n")
    log = root.parent / "web6.log"
    with open(log, "w") as err:
        srv = lab.b.popen([sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(root), str(WEB_PORT)],
                          stdout=subprocess.DEVNULL, stderr=err)
    wait_listening(lab.b, WEB_PORT, srv, log)
    yield log
    stop_process(srv)


def test_one_approval_releases_an_http_call_held_by_a_whole_connection_rule(gated, lab, web6):
    """A rule naming no operation detail holds the connection once; the request on it is not held again."""
    url = f"http://[{lab.b.addr6}]:{WEB_PORT}/index.html"
    p = gated.host.popen([*INTERLOCK, "run", "--state-dir", str(gated.state_dir), "--agent", "bot", "--",
                          "curl", "-sS", "--max-time", str(int(30 * SLOWDOWN)), url], stdout=subprocess.PIPE, text=True)
    held = wait_until(lambda: pending(gated))
    assert held and held[0]["rule"] == "hold-v6"
    assert '"GET ' not in web6.read_text(), "nothing reaches the server while held"
    assert gated.cli("approve", held[0]["id"]).returncode == 0
    out, _ = p.communicate(timeout=40 * SLOWDOWN)
    assert p.returncode == 0 and out == "held page\n"
    assert web6.read_text().count('"GET /index.html') == 1
    rows = [x for x in json.loads(gated.cli("approvals", "--all", "--json").stdout) if x["session"] == held[0]["session"]]
    assert len(rows) == 1, rows
    granted = [e for e in gated.events("approval-granted") if e["session"] == held[0]["session"]]
    assert granted and granted[0]["data"]["by"] == "the connection's approval"


def test_a_connect_level_refusal_of_http_is_a_403_naming_the_rule(gated, lab, web6):
    r = gated.agent(["curl", "-sS", "--max-time", str(int(20 * SLOWDOWN)), f"http://{lab.b.addr4}:{WEB_PORT}/index.html"])
    assert r.returncode == 0, r.stderr  # an HTTP answer, not an empty reply
    body = json.loads(r.stdout)
    assert body == {"error": "blocked_by_policy", "rule": "no-web-v4", "reason": "use the v6 door"}
    assert lab.a.addr4 not in web6.read_text(), "the server saw nothing from the agent's v4 address"


def test_a_human_s_denial_reason_reaches_the_agent_and_the_replay(gated, lab, web6):
    url = f"http://[{lab.b.addr6}]:{WEB_PORT}/index.html"
    p = gated.host.popen([*INTERLOCK, "run", "--state-dir", str(gated.state_dir), "--agent", "bot", "--",
                          "curl", "-sS", "--max-time", str(int(30 * SLOWDOWN)), url], stdout=subprocess.PIPE, text=True)
    held = wait_until(lambda: pending(gated))
    assert held
    assert gated.cli("deny", held[0]["id"], "--reason", "not during the freeze").returncode == 0
    out, _ = p.communicate(timeout=40 * SLOWDOWN)
    body = json.loads(out)
    assert body["rule"] == "hold-v6" and "not during the freeze" in body["reason"], body
    assert "not during the freeze" in gated.cli("replay", held[0]["session"]).stdout


def test_denied_by_a_human_and_timeout(gated, lab, echo):
    p = background_probe(gated, lab.b.addr6)
    held = wait_until(lambda: pending(gated))
    assert gated.cli("deny", held[0]["id"], "--reason", "not today").returncode == 0
    out, _ = p.communicate(timeout=20 * SLOWDOWN)
    assert not json.loads(out.strip().splitlines()[-1])["ok"]
    # nobody answers: the hold expires after the rule's timeout and the agent is refused
    t0 = time.monotonic()
    p = background_probe(gated, lab.b.addr6)
    out, _ = p.communicate(timeout=30 * SLOWDOWN)
    assert not json.loads(out.strip().splitlines()[-1])["ok"]
    assert HOLD_SECONDS - 0.5 < time.monotonic() - t0 < HOLD_SECONDS + 12 * SLOWDOWN
    rows = json.loads(gated.cli("approvals", "--all", "--json").stdout)
    assert {r["status"] for r in rows} >= {"denied", "expired"}


def test_a_grant_covers_the_same_operation_until_it_expires(gated, lab, echo):
    p = background_probe(gated, lab.b.addr6)
    held = wait_until(lambda: pending(gated))
    assert gated.cli("approve", held[0]["id"], "--for", "10m").returncode == 0
    p.communicate(timeout=20 * SLOWDOWN)
    r = gated.probe("tcp", lab.b.addr6, str(ECHO_PORT))
    assert r["ok"] and not pending(gated), "the grant let the identical connection through"
    assert any(e["data"].get("by") == "standing grant" for e in gated.events("approval-granted"))


def test_policy_reload_and_a_rejected_reload(gated, lab, echo):
    gated.policy_file.write_text(policy_text(lab.b.addr4, lab.b.addr6, allow_echo=False))
    assert wait_until(lambda: any(e["kind"] == "policy-loaded" for e in gated.events("policy-loaded")), timeout=5)
    assert not gated.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
    gated.policy_file.write_text("rules:\n  - decision: perhaps\n")
    assert wait_until(lambda: gated.events("policy-rejected"), timeout=5)
    assert not gated.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"], "the last valid policy stays in force"
    gated.policy_file.write_text(policy_text(lab.b.addr4, lab.b.addr6))
    time.sleep(1.5)
    assert gated.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]


def test_policy_cli_check_and_explain(gated, tmp_path):
    r = gated.cli("policy", "check", str(gated.policy_file))
    assert r.returncode == 0 and "valid" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    decision: perhaps\n")
    r = gated.cli("policy", "check", str(bad))
    assert r.returncode == 1 and f"{bad}:3: rule 'x'" in r.stderr and "Traceback" not in r.stderr  # the line of decision:
    r = gated.cli("policy", "explain", "--file", str(gated.policy_file), "--agent", "bot", "--target", "other", "--op", "connect")
    assert r.stdout.startswith("DENY") and "no-other" in r.stdout


def test_daemon_refuses_an_invalid_policy(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: 7\n")
    inst = Instance(lab.a, instance_name("bad"), proxy_port=15801, dns_port=15853, policy=str(bad))
    try:
        with pytest.raises(RuntimeError, match="policy .* is invalid"):
            inst.start(timeout=30)
    finally:
        inst.close()
