"""Identity in the policy, the config and the bindings file, without the kernel: rules on claims,
expiry as a refusal, caches keyed by the binding, config and policy errors that say what to fix."""

from __future__ import annotations

import sqlite3
import time

import pytest

from identity.agents import AgentIdentity, IdentityBook, flatten, save
from interceptor.config import ConfigError
from interceptor.config import load as load_config
from policy.document import PolicyError
from policy.engine import Destination, load
from policy.inspection import opaque_refusal
from policy.model import Operation, Verdict

POLICY = """
targets:
  db: {address: 10.0.0.5, port: 5432}
rules:
  - name: app
    target: db
    identity: {sub: "repo:org/app:*", aud: interlock}
    decision: allow
  - name: ci-namespace
    identity: {"kubernetes.io.namespace": [ci, build]}
    operation: read
    decision: allow
default: deny
"""
DB = Destination("10.0.0.5", 5432, (), "postgres")


def ident(agent: str, claims: dict, exp: float = 600, error: str | None = None) -> AgentIdentity:
    flat = flatten({"iss": "https://i.example", **claims})
    return AgentIdentity(agent, "https://i.example", str(claims.get("sub", "")), time.time() + exp, flat, error=error)


def policy_with(bindings: dict):
    pol = load("p.yaml", text=POLICY)
    pol.identity_of = bindings.get
    return pol


def test_flatten_names_nested_claims_with_dots_and_drops_per_token_claims():
    flat = flatten({"sub": "s", "kubernetes.io": {"namespace": "ci", "pod": {"name": "p"}}, "groups": ["a", "b"],
                    "email_verified": True, "jti": "x", "iat": 1, "exp": 2, "nonce": "n"})
    assert flat == {"sub": "s", "kubernetes.io.namespace": "ci", "kubernetes.io.pod.name": "p", "groups": ["a", "b"],
                    "email_verified": "true"}
    assert flatten({"sub": "s", "iss": "i", "repo": "r", "x": "y"}, keep=["repo"]) == {"sub": "s", "iss": "i", "repo": "r"}


def test_rules_match_verified_claims_only():
    pol = policy_with({
        "app": ident("app", {"sub": "repo:org/app:ref:main", "aud": ["other", "interlock"]}),
        "wrong-aud": ident("wrong-aud", {"sub": "repo:org/app:ref:main", "aud": "other"}),
        "other": ident("other", {"sub": "repo:org/other:ref:main", "aud": "interlock"}),
        "k8s": ident("k8s", {"sub": "system:serviceaccount:build:x", "kubernetes.io": {"namespace": "build"}}),
    })
    connect = Operation("postgres", "connect")
    assert pol.decide("app", DB, connect).rule == "app"
    assert pol.decide("wrong-aud", DB, connect).verdict is Verdict.DENY
    assert pol.decide("other", DB, connect).rule == "default"
    assert pol.decide("nobody", DB, connect).rule == "default"  # no identity never matches identity:
    assert pol.decide("k8s", DB, Operation("postgres", "read")).rule == "ci-namespace"
    assert pol.decide("k8s", DB, Operation("postgres", "delete")).rule == "default"
    assert pol.may_permit("k8s", DB, "postgres", ("read",)) and not pol.may_permit("other", DB, "postgres", ("read",))


def test_expired_or_refused_identity_denies_everything_and_says_why():
    pol = policy_with({"late": ident("late", {"sub": "repo:org/app:x", "aud": "interlock"}, exp=-1),
                       "bad": ident("bad", {"sub": "repo:org/app:x", "aud": "interlock"}, error="audience 'x'")})
    d = pol.decide("late", DB, Operation("postgres", "connect"))
    assert d.verdict is Verdict.DENY and d.rule == "identity" and "expired at" in d.reason
    d = pol.decide("bad", DB, Operation("postgres", "connect"))
    assert d.verdict is Verdict.DENY and d.rule == "identity" and "audience 'x'" in d.reason


def test_a_new_binding_is_not_answered_from_the_memo():
    bindings = {"a": ident("a", {"sub": "repo:org/other:1", "aud": "interlock"})}
    pol = policy_with(bindings)
    op = Operation("postgres", "connect")
    assert pol.decide("a", DB, op).rule == "default"
    bindings["a"] = ident("a", {"sub": "repo:org/app:1", "aud": "interlock"})
    assert pol.decide("a", DB, op).rule == "app"
    bindings["a"] = ident("a", {"sub": "repo:org/app:1", "aud": "interlock"}, exp=-5)
    assert pol.decide("a", DB, op).rule == "identity"


def test_inspection_reads_identity_rules_for_the_agent_they_apply_to():
    text = """
targets:
  db: {address: 10.0.0.5, port: 5432}
rules:
  - name: app-reads
    target: db
    identity: {sub: "repo:org/app:*"}
    operation: read
    decision: allow
  - name: rest
    target: db
    decision: allow
default: deny
"""
    pol = load("p.yaml", text=text)
    bindings = {"app": ident("app", {"sub": "repo:org/app:1"})}
    pol.identity_of = bindings.get
    dest = Destination("10.0.0.5", 5432)
    assert opaque_refusal(pol, "app", dest, "tcp", "rest") == "app-reads"  # would dodge its read rule
    assert opaque_refusal(pol, "plain", dest, "tcp", "rest") is None  # the identity rule is not about it


@pytest.mark.parametrize("rule, message", [
    ("identity: [sub]", "'identity' must map claim names to globs"),
    ("identity: {}", "'identity' must map claim names to globs"),
    ("identity: {sub: []}", "needs a name and at least one glob"),
])
def test_policy_refuses_bad_identity_keys(rule, message):
    with pytest.raises(PolicyError) as e:
        load("p.yaml", text=f"rules:\n  - name: r\n    {rule}\n    decision: allow\n")
    assert message in str(e.value) and "p.yaml:3" in str(e.value)


def test_config_identity(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("identity:\n  issuers:\n    - {issuer: 'https://i.example', audience: interlock}\n  claims: [sub, repo]\n"
                 "agents:\n  - {name: svc, cgroup: [x], identity_token: /run/t}\n")
    cfg = load_config(f)
    assert cfg.identity.issuers[0].audience == ["interlock"] and cfg.identity.leeway == 30
    assert cfg.agents[0].identity_token == "/run/t"
    for text, message in [
        ("identity: {issuers: []}", "needs a list of issuers"),
        ("identity: {issuers: [{issuer: 'https://i', audience: a, algorithms: [HS256]}]}", "never accepted"),
        ("identity: {issuers: [{issuer: 'i', audience: a}]}", "issuer"),
        ("identity: {issuers: [{issuer: 'https://i'}]}", "audience"),
        ("agents: [{name: s, cgroup: [x], identity_token: /t}]", "no 'identity:'"),
        ("identity: {issuers: [{issuer: 'https://i', audience: a}]}\nagents: [{name: s, identity_token: rel}]",
         "absolute path"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(f)


def test_identity_book_follows_the_file_and_fails_closed(tmp_path):
    path = tmp_path / "identities.json"
    book = IdentityBook(path)
    assert book.get("a") is None
    save(path, {"a": ident("a", {"sub": "s1"})})
    book.refresh()
    assert book.get("a").sub == "s1" and book.get("a").refusal() is None
    save(path, {"a": ident("a", {"sub": "s2"})})
    book.refresh()
    assert book.get("a").sub == "s2"
    path.write_text("{not json")
    book.refresh()
    assert "cannot be read" in book.get("a").refusal(), "a damaged file refuses the agents it bound"


def test_old_recordings_get_the_identity_column(tmp_path):
    from recorder.store import Recorder

    db = tmp_path / "recorder.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, agent TEXT)")
    conn.execute("INSERT INTO sessions VALUES ('old', 'bot')")
    conn.commit()
    conn.close()
    rec = Recorder(db, who="test")
    assert "identity" in rec.db["sessions"].columns_dict
    assert rec.db.execute("SELECT identity FROM sessions WHERE id = 'old'").fetchone() == (None,)
    rec.close()


def test_approvers_travel_with_the_hold_decision():
    pol = load("p.yaml", text="""
rules:
  - name: hold
    operation: delete
    decision: approve
    approvers: {groups: [dba, oncall], four_eyes: true}
default: allow
""")
    d = pol.decide("bot", DB, Operation("postgres", "delete"))
    assert d.verdict is Verdict.APPROVE and d.approvers == {"groups": ["dba", "oncall"], "four_eyes": True}
    with pytest.raises(PolicyError, match="'approvers' is for decision: approve only"):
        load("p.yaml", text="rules:\n  - name: r\n    decision: allow\n    approvers: {groups: [a]}\n")
    with pytest.raises(PolicyError, match="four_eyes must be true or false"):
        load("p.yaml", text="rules:\n  - name: r\n    decision: approve\n    approvers: {four_eyes: maybe}\n")


def test_policy_explain_takes_claims(tmp_path, capsys):
    from interceptor.cli import main

    f = tmp_path / "p.yaml"
    f.write_text(POLICY)
    args = ["policy", "explain", "--file", str(f), "--agent", "ci", "--target", "db", "--op", "connect"]
    assert main([*args, "--claim", "sub=repo:org/app:1", "--claim", "aud=x", "--claim", "aud=interlock"]) == 0
    assert capsys.readouterr().out.startswith("ALLOW  rule: app")
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("DENY  rule: default")
