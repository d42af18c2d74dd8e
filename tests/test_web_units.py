"""The approval page's rules without a browser: PKCE (RFC 7636's own example), who may answer
(groups from the claim, the rule's approvers, four eyes against the agent's OIDC identity), the
Origin check, and the web config's refusals."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import make_mocked_request

from central.web import auth, config
from central.web.oidc import pkce_pair, s256
from central.web.store import Approver

ALICE = Approver(sub="alice", issuer="https://idp.example", email="alice@example.com", groups=("dba",))
RULES = auth.ApproverRules(groups=("dba",), four_eyes=True)


def test_pkce_s256_matches_rfc_7636_appendix_b():
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128 and challenge == s256(verifier) and "=" not in challenge


def test_groups_come_from_the_configured_claim():
    a = auth.approver_from_claims({"sub": "bob", "iss": "i", "roles": ["dba", 7, None], "groups": ["x"]}, "roles")
    assert a.groups == ("dba", "7") and a.email == ""
    assert auth.approver_from_claims({"sub": "c", "iss": "i", "groups": "dba"}, "groups").groups == ("dba",)


def test_who_may_answer():
    approval = {"rule": "hold-deletes", "approvers": None}
    assert auth.may_answer(ALICE, approval, None, RULES) is None
    dev = Approver(sub="mallory", issuer="i", groups=("devs",))
    assert "not in an approver group" in auth.may_answer(dev, approval, None, RULES)
    # a rule's approvers replace the recorder's default groups
    assert "not in an approver group" in auth.may_answer(ALICE, {"rule": "r", "approvers": {"groups": ["oncall"]}}, None, RULES)
    assert auth.may_answer(dev, {"rule": "r", "approvers": {"groups": ["devs"]}}, None, RULES) is None
    # none configured anywhere: nobody answers from the page
    assert "no approver groups" in auth.may_answer(ALICE, approval, None, auth.ApproverRules())


def test_four_eyes_bars_the_agents_own_owner():
    session = {"identity": json.dumps({"iss": "https://ci.example", "sub": "alice", "exp": 1, "claims": {"email": "x@y"}})}
    assert "four eyes" in auth.may_answer(ALICE, {"rule": "r"}, session, RULES)
    by_mail = {"identity": json.dumps({"iss": "i", "sub": "svc-7", "claims": {"email": "alice@example.com"}})}
    assert "four eyes" in auth.may_answer(ALICE, {"rule": "r"}, by_mail, RULES)
    assert auth.may_answer(ALICE, {"rule": "r"}, {"identity": None}, RULES) is None  # no identity: no owner to bar
    off = auth.ApproverRules(groups=("dba",), four_eyes=False)
    assert auth.may_answer(ALICE, {"rule": "r"}, session, off) is None
    assert "four eyes" in auth.may_answer(ALICE, {"rule": "r", "approvers": {"four_eyes": True}}, session, off)


@pytest.mark.parametrize("headers,ok", [
    ({"Origin": "https://rec.example:8443"}, True),
    ({"Origin": "https://rec.example:8443/"}, True),
    ({"Origin": "https://rec.example:8444"}, False),
    ({"Origin": "http://rec.example:8443"}, False),
    ({"Origin": "null"}, False),
    ({"Referer": "https://rec.example:8443/ui/"}, True),
    ({"Referer": "https://rec.example:8443.evil.example/ui/"}, False),
    ({"Origin": "https://evil.example", "Referer": "https://rec.example:8443/ui/"}, False),
    ({}, False),
])
def test_the_origin_check(headers, ok):
    req = make_mocked_request("POST", "/ui/approvals/h/1", headers=headers)
    assert auth.same_origin(req, "https://rec.example:8443") is ok


def test_web_config_refusals(tmp_path):
    f = tmp_path / "web.yaml"
    for text, msg in [("origin: http://r:1\noidc: {issuer: i, client_id: c}\n", "origin must be https"),
                      ("origin: https://r:1\n", "oidc needs issuer and client_id"),
                      ("origin: https://r:1\noidc: {issuer: i, client_id: c}\nextra: 1\n", "unknown keys"),
                      ("origin: https://r:1\noidc: {issuer: i, client_id: c}\napprovers: {groups: dba}\n", "approvers must be"),
                      ("origin: https://r:1\noidc: {issuer: i, client_id: c}\nwebhooks: [{name: w, url: 'https://h/x'}]\n",
                       "needs a secret")]:
        f.write_text(text)
        with pytest.raises(config.WebConfigError, match=msg):
            config.load(f, tmp_path)
    f.write_text("origin: https://r:1/\noidc: {issuer: https://idp, client_id: c}\napprovers: {groups: [dba], four_eyes: false}\n")
    s = config.load(f, tmp_path)
    assert s.oidc.redirect_uri == "https://r:1/ui/auth/callback" and s.rules == auth.ApproverRules(("dba",), False)
    assert len(s.session_key) == 32 and (tmp_path / "web-session.key").stat().st_mode & 0o777 == 0o600
    assert config.load(f, tmp_path).session_key == s.session_key  # every instance shares one key


def test_the_approver_as_the_host_records_them():
    assert ALICE.label() == "alice@example.com (oidc sub alice at https://idp.example)"
