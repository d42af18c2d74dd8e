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
    assert "bad.yaml:3: rule 'a': 'decision' must be" in text
    assert "bad.yaml:5: rule 'b': unknown target 'nowhere'" in text
    assert "bad.yaml:9: rule 'c': timeout:" in text
    assert "bad.yaml:12: target 't': port '99999'" in text


def test_every_problem_of_a_rule_is_reported_on_its_own_line():
    bad = ("rules:\n  - name: a\n    target: nowhere\n    decision: maybe\n    timeout: soon\n    bogus: 1\n"
           "  - name: b\n    decision: mask\n  - name: c\n    decision: deny\n    timeout: 5m\n    mask: [email]\n")
    with pytest.raises(PolicyError) as e:
        load("bad.yaml", bad)
    assert e.value.problems == [
        "bad.yaml:6: rule 'a': unknown key 'bogus' (known: " + e.value.problems[0].split("(known: ")[1],
        "bad.yaml:4: rule 'a': 'decision' must be allow, deny, approve or mask, got 'maybe'",
        "bad.yaml:5: rule 'a': timeout: 'soon' is not a duration (examples: 30s, 5m, 2h, 30d)",
        "bad.yaml:3: rule 'a': unknown target 'nowhere' (defined: none)",
        "bad.yaml:8: rule 'b': decision mask needs a 'mask:' list (detectors such as email, or column:NAME / JSON field names)",
        "bad.yaml:11: rule 'c': 'timeout' is for decision: approve only",
        "bad.yaml:12: rule 'c': 'mask' is for decision: mask only",
    ]


def test_a_daemon_config_checked_as_a_policy_names_each_keys_line():
    with pytest.raises(PolicyError) as e:
        load("config.yaml", "instance: default\nproxy_port: 15001\n")
    assert [p.split(": unknown")[0] for p in e.value.problems] == ["config.yaml:1", "config.yaml:2"]


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
