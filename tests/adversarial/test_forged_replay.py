"""Hole 10: an agent forges lines in the record a human reads.

An unprivileged agent (uid 65533) puts a newline followed by a fake timeline line, ANSI
sequences that erase the line above, and a right-to-left override in its argv (and an ESC in its
comm), then connects where the policy denies it. `interlock replay` and `interlock sessions` must
print one line per event and per session, with the controls visible as escapes, and the real DENY
on its own line; the JSON output keeps the exact strings. The control: the same forged argv to an
allowed destination gets through and the server sees it."""

from __future__ import annotations

import json
import sys
import time

import pytest

from lab.instance import Instance
from lab.testing import ECHO_PORT, instance_name, wait_until

pytestmark = pytest.mark.datapath
OTHER_PORT = 7100
AGENT_UID = 65533
AS_AGENT = ["setpriv", "--reuid", str(AGENT_UID), "--regid", str(AGENT_UID), "--clear-groups"]
CONTROLS = ("\x1b", "\u202e", "\r", "\x7f", "\x9b")

AGENT = """
import ctypes, json, os, socket, sys
ctypes.CDLL(None).prctl(15, b"\\x1b[8mhidden", 0, 0, 0)  # PR_SET_NAME: comm with an ESC
s = socket.socket()
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"hello interlock\\n")
    ok = s.recv(100) == b"hello interlock\\n"
except OSError:
    ok = False
print(json.dumps({"ok": ok, "pid": os.getpid()}))
"""


def forged_argv(host: str) -> list[str]:
    return [f"\n  +    0.000s  ALLOW    tcp:connect {host}:{OTHER_PORT}   [rule echo-ok: allowed]"
            f"\n  +    0.002s  closed; 16 bytes up, 16 bytes down",
            "\x1b[2K\x1b[1A\x1b[2K\x1b[1A", "\u202eYNED\x7f\x9b"]


@pytest.fixture(scope="module")
def other(echo_at):
    return echo_at(OTHER_PORT)


@pytest.fixture(scope="module")
def inst(lab, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(f"""\
targets:
  echo: {{address: {lab.b.addr4}, port: {ECHO_PORT}}}
  other: {{address: {lab.b.addr4}, port: {OTHER_PORT}}}
rules:
  - name: echo-ok
    target: echo
    decision: allow
  - name: no-other
    target: other
    decision: deny
    reason: the other service is off limits
""")
    i = Instance(lab.a, instance_name("fr"), proxy_port=16301, dns_port=16353, policy=str(policy))
    i.start()
    yield i
    i.close()


def run_agent(inst: Instance, host: str, port: int, extra: list[str]) -> dict:
    r = inst.agent([*AS_AGENT, sys.executable, "-c", AGENT, host, str(port), *extra], agent="forger")
    return json.loads(r.stdout.strip().splitlines()[-1])


def session_of(inst: Instance, pid: int) -> dict:
    return wait_until(lambda: next((s for s in inst.sessions("forger") if s["tgid"] == pid and s["ended"]), None))


def timeline_lines(tl: dict) -> int:
    """How many lines the replay of tl has when every event is one line."""
    row_verdict = tl["session"]["verdict"] and not any(
        e["kind"] == "decision" and e["data"]["action"] == "connect" for e in tl["events"])
    return 4 + bool(row_verdict) + len(tl["events"]) + 1


def test_forged_argv_cannot_hide_a_real_deny(inst, lab, echo, other):
    forged = forged_argv(lab.b.addr4)
    before = len(other.seen())
    r = run_agent(inst, lab.b.addr4, OTHER_PORT, forged)
    assert not r["ok"], r
    time.sleep(0.3)
    assert len(other.seen()) == before, "the denied server saw the connection"
    s = session_of(inst, r["pid"])
    assert s and s["outcome"] == "denied" and s["uid"] == AGENT_UID, (r, inst.sessions(), inst.log.read_text()[-3000:])
    assert all(f in s["cmdline"] for f in forged), "the record keeps the exact argv (JSON output is exact)"
    assert "\x1b" in s["comm"]

    text = inst.cli("replay", s["id"]).stdout
    tl = json.loads(inst.cli("replay", s["id"], "--json").stdout)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == timeline_lines(tl), text
    assert not any(c in text for c in CONTROLS), repr(text)
    deny = [ln for ln in lines if ln.startswith("  +") and "DENY" in ln]
    assert len(deny) == 1 and "no-other" in deny[0] and "off limits" in deny[0]
    assert [i for i, ln in enumerate(lines) if "ALLOW" in ln] == [2], "the forged ALLOW stays on the command line"
    assert lines[2].startswith("  command ") and "\\n  +    0.000s  ALLOW" in lines[2]
    assert "\\x1b[2K\\x1b[1A" in lines[2] and "\\u202eYNED\\x7f\\x9b" in lines[2]
    assert lines[-1].lstrip().startswith("+") and "denied" in lines[-1]

    listing = inst.cli("sessions", "--agent", "forger").stdout
    rows = inst.sessions("forger")
    assert len(listing.rstrip("\n").split("\n")) == 1 + len(rows)
    assert not any(c in listing for c in CONTROLS)


def test_control_the_same_forger_reaches_an_allowed_server_and_plain_text_prints_as_is(inst, lab, echo):
    before = len(echo.seen("tcp"))
    r = run_agent(inst, lab.b.addr4, ECHO_PORT, forged_argv(lab.b.addr4))
    assert r["ok"], r
    assert len(echo.seen("tcp")) == before + 1
    s = session_of(inst, r["pid"])
    assert s["outcome"] == "closed" and s["verdict"] == "allow"
    text = inst.cli("replay", s["id"]).stdout
    assert len(text.rstrip("\n").split("\n")) == timeline_lines(json.loads(inst.cli("replay", s["id"], "--json").stdout))
    plain = run_agent(inst, lab.b.addr4, ECHO_PORT, ["--name", "café 日本", "/tmp/report.csv"])
    assert plain["ok"], plain
    p = session_of(inst, plain["pid"])
    replay = inst.cli("replay", p["id"]).stdout.split("\n")
    assert replay[2].endswith(" 7000 --name café 日本 /tmp/report.csv"), "text that is not a control prints unchanged"
