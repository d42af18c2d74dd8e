"""`interlock policy check` accepts exactly the keys docs/POLICY.md documents, and names the line of any
other; `created_in_session` means what the docs say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from policy import engine
from policy.document import PolicyError
from policy.engine import Destination
from policy.model import Operation, Verdict

REPO = Path(__file__).resolve().parent.parent


def documented() -> dict[str, set[str]]:
    """The key lists under "Every key there is." in docs/POLICY.md."""
    text = (REPO / "docs" / "POLICY.md").read_text()
    section = text.split("**Every key there is.**", 1)[1].split("\n\n", 2)[1]
    out: dict[str, set[str]] = {}
    for item in re.split(r"\n- ", "\n" + section)[1:]:
        level, _, rest = item.partition(":")
        rest = rest.split("(", 1)[0]  # a parenthesis explains, it lists no keys
        out[level.strip()] = set(re.findall(r"`([a-z_]+)`", rest))
    return out


def test_docs_and_loader_agree_on_every_key():
    docs = documented()
    assert docs["top level"] == {"agents", "targets", "rules", "default"}
    assert docs["agent"] == engine._AGENT_KEYS
    assert docs["target"] == engine._TARGET_KEYS
    assert docs["rule"] == engine._RULE_KEYS


@pytest.mark.parametrize("text,line,word", [
    ("defaults: deny\n", 1, "unknown top-level key 'defaults'"),
    ("agents:\n  bot:\n    groups: [a]\n    uid: 1000\n", 4, "unknown key 'uid'"),
    ("agents:\n  bot: {exe: /bin/x}\n", 2, "daemon config"),
    ("targets:\n  db:\n    address: 10.0.0.1\n    hostnames: [x]\n", 4, "unknown key 'hostnames'"),
    ("rules:\n  - name: a\n    decision: allow\n  - name: b\n    operations: [read]\n    decision: allow\n", 5,
     "unknown key 'operations'"),
    ("rules:\n  - decision: allow\n    created_in_session: maybe\n", 3, "must be true or false"),
])
def test_undocumented_keys_are_refused_with_their_line(text, line, word):
    with pytest.raises(PolicyError) as e:
        engine.load("p.yaml", text)
    assert any(p.startswith(f"p.yaml:{line}:") and word in p for p in e.value.problems), e.value.problems


def test_policy_check_cli_names_the_line(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("rules:\n  - name: ok\n    decision: allow\n  - name: typo\n    objects: [t]\n    decision: deny\n")
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "policy", "check", str(f)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode != 0 and f"{f}:5:" in r.stdout + r.stderr and "objects" in r.stdout + r.stderr


def test_a_policy_that_is_not_utf8_is_a_problem_with_its_line_not_a_traceback(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes(b"rules:\n  - name: caf\xe9\n    decision: allow\n")  # latin-1, as an editor may save it
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "policy", "check", str(f)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and f"{f}:2: not UTF-8 text (byte 0xe9" in out and "Traceback" not in out, out
    f.write_text("rules:\n  - name: café\n    decision: allow\n")  # control: the same policy as UTF-8 is valid
    r = subprocess.run([sys.executable, "-m", "interceptor.cli", "policy", "check", str(f)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_documented_key_loads():
    engine.load("p.yaml", """\
agents:
  bot: {groups: [bots]}
targets:
  db: {address: 10.0.0.1, cidr: 10.0.1.0/24, hostname: db.example, port: 5432, protocol: postgres,
       credentials: c, upstream_user: u, tls: intercept}
rules:
  - {name: r, agent: bot, target: db, protocol: postgres, operation: read, object: t, risk: drop,
     decision: approve, timeout: 1m, reason: why, created_in_session: false}
  - {name: m, decision: mask, mask: [email]}
  - {name: h, method: GET, host: x, path: /a, query: "b=*", header: {x-a: b}, decision: deny}
default: deny
""")


def test_created_in_session_splits_own_objects_from_the_rest():
    pol = engine.load("p.yaml", """\
rules:
  - name: hold-drops
    risk: [drop, truncate]
    created_in_session: false
    decision: approve
  - name: own
    created_in_session: true
    decision: allow
default: deny
""")
    dest = Destination("10.0.0.1", 5432, (), "postgres")
    drop = Operation("postgres", "drop", ("t",), ("drop",))
    own_drop = Operation("postgres", "drop", ("t",), ("drop",), attributes={"created_in_session": "1"})
    assert pol.decide("a", dest, drop).rule == "hold-drops"
    assert pol.decide("a", dest, own_drop).rule == "own"
    assert pol.decide("a", dest, own_drop).verdict is Verdict.ALLOW
    # the memo tells them apart; an operation that does not say is not the agent's own
    assert pol.decide("a", dest, drop).verdict is Verdict.APPROVE
    assert pol.decide("a", dest, Operation("http", "DELETE", ("x",), ("drop",))).rule == "hold-drops"


def test_the_default_holds_drops_of_what_the_agent_did_not_make():
    pol = engine.load_default()
    dest = Destination("10.0.0.1", 5432, (), "postgres")
    for op in (Operation("postgres", "drop", ("t",), ("drop",)), Operation("postgres", "truncate", ("t",), ("truncate",))):
        assert pol.decide("a", dest, op).verdict is Verdict.APPROVE
        mine = Operation(op.protocol, op.action, op.objects, op.risks, attributes={"created_in_session": "1"})
        assert pol.decide("a", dest, mine).verdict is Verdict.ALLOW
    unbounded = Operation("postgres", "delete", ("t",), ("delete-without-where",), attributes={"created_in_session": "1"})
    assert pol.decide("a", dest, unbounded).verdict is Verdict.APPROVE
