"""The policy model without a network: loading, line-numbered errors, first-match decisions."""

from __future__ import annotations

import pytest

from policy.engine import Destination, PolicyError, load, load_default, parse_duration
from policy.model import Operation, Verdict

POLICY = """\
agents:
  ci-bot: {groups: [bots]}
targets:
  db:
    cidr: 10.0.0.0/24
    port: 5432
    protocol: postgres
  github:
    hostname: "*.github.com"
    port: 443
  anything-local:
    address: 127.0.0.1
rules:
  - name: no-drops
    target: db
    risk: drop
    decision: deny
  - name: hold-deletes
    agent: group:bots
    target: db
    operation: delete
    decision: approve
    timeout: 90s
  - name: bots-read-db
    agent: [ci-bot]
    target: db
    operation: [read, insert]
    decision: allow
  - name: mask-users
    target: db
    object: "public.users*"
    decision: mask
    mask: [email]
  - name: github-api
    target: github
    operation: "*"
    decision: allow
"""

DB = Destination("10.0.0.7", 5432, (), "postgres")


@pytest.fixture
def pol():
    return load("p.yaml", POLICY)


def test_first_matching_rule_wins_in_file_order(pol):
    d = pol.decide("ci-bot", DB, Operation("postgres", "drop", ("t",), ("drop",)))
    assert (d.verdict, d.rule) == (Verdict.DENY, "no-drops")
    d = pol.decide("ci-bot", DB, Operation("postgres", "delete", ("t",)))
    assert (d.verdict, d.rule, d.approval_timeout) == (Verdict.APPROVE, "hold-deletes", 90.0)
    assert pol.decide("ci-bot", DB, Operation("postgres", "read", ("t",))).verdict is Verdict.ALLOW


def test_default_is_deny_when_the_file_does_not_say(pol):
    d = pol.decide("other-agent", DB, Operation("postgres", "delete", ("t",)))
    assert (d.verdict, d.rule) == (Verdict.DENY, "default")


def test_group_membership_and_object_globs(pol):
    d = pol.decide("intruder", DB, Operation("postgres", "read", ("public.users",)))
    assert (d.verdict, d.mask) == (Verdict.MASK, ("email",))


def test_targets_match_by_cidr_port_protocol_and_hostname(pol):
    assert {t.name for t in pol.targets_for(DB)} == {"db"}
    assert not pol.targets_for(Destination("10.0.0.7", 5433, (), "postgres"))
    assert not pol.targets_for(Destination("10.0.0.7", 5432, (), "http"))
    gh = Destination("140.82.112.3", 443, ("api.github.com",), "tls")
    assert {t.name for t in pol.targets_for(gh)} == {"github"}
    assert pol.decide("x", gh, Operation("tls", "connect")).verdict is Verdict.ALLOW
    assert not pol.targets_for(Destination("140.82.112.3", 443, ("github.com.evil.test",), "tls"))


def test_errors_name_their_lines():
    bad = "rules:\n  - name: a\n    decision: maybe\n  - name: b\n    target: nowhere\n    decision: allow\n" \
          "  - name: c\n    decision: approve\n    timeout: soon\ntargets:\n  t:\n    port: 99999\n"
    with pytest.raises(PolicyError) as e:
        load("bad.yaml", bad)
    text = str(e.value)
    assert "bad.yaml:2: rule 'a': 'decision' must be" in text
    assert "bad.yaml:4: rule 'b': unknown target 'nowhere'" in text
    assert "bad.yaml:7: rule 'c': timeout:" in text
    assert "bad.yaml:12: target 't': port '99999'" in text


def test_yaml_syntax_errors_have_a_line():
    with pytest.raises(PolicyError) as e:
        load("x.yaml", "rules:\n  - name: a\n   decision: [allow\n")
    assert e.value.problems[0].startswith("x.yaml:")


def test_durations():
    assert parse_duration("15m") == 900 and parse_duration("2h") == 7200 and parse_duration(30) == 30
    with pytest.raises(ValueError):
        parse_duration("a while")


def test_embedded_default_holds_destruction_and_allows_the_rest():
    pol = load_default()
    dest = Destination("192.0.2.1", 5432, (), "postgres")
    assert pol.decide("a", dest, Operation("postgres", "drop", ("t",), ("drop",))).verdict is Verdict.APPROVE
    assert pol.decide("a", dest, Operation("postgres", "copy", (), ("program-execution",))).verdict is Verdict.DENY
    assert pol.decide("a", dest, Operation("tcp", "connect")).verdict is Verdict.ALLOW
    assert pol.decide("a", dest, Operation("postgres", "unparseable")).verdict is Verdict.DENY
