"""Logs and metrics on real traffic: the proxy's Prometheus endpoint after an agent's allowed,
refused and held connections; the daemon's JSON log lines for start, ready, enrolment, a
rejected policy reload and a held operation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from lab.instance import INTERLOCK
from lab.testing import ECHO_PORT, SLOWDOWN, wait_until

pytestmark = pytest.mark.datapath
METRICS_PORT = 15690


def policy_text(b4: str) -> str:
    return f"""\
targets:
  echo: {{address: {b4}, port: {ECHO_PORT}}}
  other: {{address: {b4}, port: 7101}}
  held: {{address: {b4}, port: 7102}}
rules:
  - name: echo-ok
    target: echo
    decision: allow
  - name: no-other
    target: other
    decision: deny
  - name: hold-it
    target: held
    decision: approve
    timeout: 60s
"""


def scrape(inst) -> dict[str, float]:
    """name{labels} -> value, from the proxy's /metrics inside the agent host's namespace."""
    fetch = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"
    r = inst.host.run([sys.executable, "-c", fetch])
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.fixture
def watched(make_instance, lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(lab.b.addr4))
    inst = make_instance("m", proxy_port=15691, dns_port=15692, policy=str(policy),
                         metrics_address=f"127.0.0.1:{METRICS_PORT}", log_format="json")
    inst.policy_file = policy
    return inst


def test_metrics_count_real_traffic(watched, lab, echo):
    inst = watched
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
    assert not inst.probe("tcp", lab.b.addr4, "7101")["ok"]
    held = inst.host.popen([*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
                            sys.executable, "-m", "lab.probe", "tcp", lab.b.addr4, "7102"], stdout=subprocess.DEVNULL)
    try:
        m = wait_until(lambda: (x := scrape(inst)).get("interlock_holds_pending") == 1 and x)
        assert m, "the held connection shows as pending"
        time.sleep(1.1)
        m = scrape(inst)
        assert m["interlock_hold_oldest_seconds"] >= 1
        def ops(decision: str) -> float:
            return sum(v for k, v in m.items()
                       if k.startswith('interlock_operations_total{agent="bot"') and f'decision="{decision}"' in k)

        assert ops("deny") >= 1 and ops("approve") >= 1 and ops("allow") >= 1
        closed = [v for k, v in m.items() if k.startswith('interlock_connections_total{agent="bot"')]
        assert sum(closed) >= 2
        up = sum(v for k, v in m.items() if k.startswith("interlock_bytes_total") and 'direction="up"' in k)
        assert up >= len("hello interlock\n")
        assert m["interlock_policy_generation"] == 1 and m["interlock_policy_rules"] == 3
        assert m["interlock_lockdown"] == 0 and m["interlock_recorder_commit_seconds_count"] > 0
        assert m["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in m
    finally:
        held.kill()
        held.wait()


def test_json_log_lines_for_what_an_operator_watches(watched, lab, echo):
    inst = watched
    assert inst.probe("tcp", lab.b.addr4, str(ECHO_PORT))["ok"]
    inst.policy_file.write_text("rules: [{decision: maybe}]\n")  # rejected: the old policy stays
    lines = lambda: [json.loads(x) for x in inst.log.read_text().splitlines() if x.startswith("{")]  # noqa: E731
    seen = wait_until(lambda: (ls := lines()) and any(x.get("event") == "policy-rejected" for x in ls) and ls,
                      timeout=10 * SLOWDOWN)
    assert seen, inst.log.read_text()[-2000:]
    events = {x.get("event") for x in seen}
    assert {"daemon-start", "ready", "proxy-start", "policy-rejected"} <= events, events
    rejected = next(x for x in seen if x.get("event") == "policy-rejected")
    assert rejected["level"] == "ERROR" and rejected["data"]["problems"] and rejected["process"] == "proxy"
    assert all({"time", "level", "logger", "message"} <= set(x) for x in seen)
