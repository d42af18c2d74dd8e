"""policy.inspection: when relaying a connection unread would dodge a rule (docs/POLICY.md,
"Connections Interlock cannot read")."""

from __future__ import annotations

import pytest

from policy.engine import Destination, load, load_default
from policy.inspection import opaque_refusal
from policy.model import Operation

POLICY = """\
default: deny
agents:
  ci: {groups: [bots]}
targets:
  echo: {address: 10.0.0.2, port: 7000}
  queue: {address: 10.0.0.2, port: 5555, protocol: tcp}
  web: {address: 10.0.0.2, port: 80}
  db: {address: 10.0.0.3, port: 5432}
  open-db: {address: 10.0.0.4, port: 5432}
  cache: {address: 10.0.0.5, port: 6379}
rules:
  - {name: echo-ok, target: echo, decision: allow}
  - {name: queue-ok, target: queue, decision: allow}
  - {name: no-admin, target: web, path: "/admin*", decision: deny}
  - {name: web-ok, target: web, decision: allow}
  - {name: db-connect, target: db, operation: connect, decision: allow}
  - {name: db-reads, agent: "group:bots", target: db, operation: read, decision: allow}
  - {name: open-db-all, target: open-db, decision: allow}
  - {name: no-flush, target: cache, protocol: redis, operation: flushall, decision: deny}
  - {name: cache-ok, target: cache, decision: allow}
"""


def refusal(policy, addr: str, port: int, label: str, agent: str = "bot") -> str | None:
    dest = Destination(addr, port, (), label)
    allowed_by = policy.decide(agent, dest, Operation(label, "connect")).rule
    return opaque_refusal(policy, agent, dest, label, allowed_by)


@pytest.fixture(scope="module")
def policy():
    return load("p.yaml", text=POLICY)


@pytest.mark.parametrize(("addr", "port", "label", "want"), [
    ("10.0.0.2", 7000, "tcp", None),           # a catch-all allow: connect decides everything
    ("10.0.0.2", 5555, "tcp", None),           # the operator said tcp
    ("10.0.0.2", 80, "tcp", "no-admin"),       # an HTTP path rule would go unheard
    ("10.0.0.2", 80, "http2", "no-admin"),     # HTTP we do not parse
    ("10.0.0.2", 80, "redis", None),           # no rule names redis here
    ("10.0.0.3", 5432, "tcp", "db-reads"),     # agent ci (group bots): a statement rule applies
    ("10.0.0.4", 5432, "tcp", None),
    ("10.0.0.5", 6379, "redis", "no-flush"),   # a rule on redis operations we cannot read
    ("10.0.0.5", 6379, "ssh", None),
])
def test_which_unreadable_connections_dodge_a_rule(policy, addr, port, label, want):
    agent = "ci" if (addr, port) == ("10.0.0.3", 5432) else "bot"
    assert refusal(policy, addr, port, label, agent) == want


def test_default_deny_behind_a_connect_only_allow(policy):
    """bot may connect to db but has no statement rule: its statements meet the default deny."""
    assert refusal(policy, "10.0.0.3", 5432, "tcp", "bot") == "default"


def test_embedded_default_refuses_unrecognised_bytes_everywhere_but_not_known_protocols():
    p = load_default()
    for label, want in (("tcp", "no-server-side-files"), ("http2", "no-server-side-files"),
                        ("redis", None), ("ssh", None), ("mongodb", None), ("dns", None)):
        assert refusal(p, "192.0.2.1", 1234, label) == want, label


def test_a_rule_shadowed_by_an_earlier_catch_all_does_not_count():
    p = load("p.yaml", text="""\
targets:
  t: {address: 10.0.0.9}
rules:
  - {name: all, target: t, decision: allow}
  - {name: unreachable, target: t, risk: [drop], decision: deny}
""")
    assert refusal(p, "10.0.0.9", 1, "tcp") is None


def test_a_protocol_keyed_connect_refusal_counts():
    p = load("p.yaml", text="""\
default: allow
rules:
  - {name: no-postgres, protocol: postgres, decision: deny}
""")
    assert refusal(p, "10.0.0.9", 5432, "tcp") == "no-postgres"
    assert refusal(p, "10.0.0.9", 5432, "redis") is None
