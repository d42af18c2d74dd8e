"""Agents with an OIDC identity, end to end: a real provider (oidc-provider-mock) and a key issuer
on the agent host's loopback, the daemon validating tokens at enrolment, rules on claims, the
echo server's own log as the evidence of what arrived.

Attack: an agent (unprivileged, uid 65533) presenting a token that is not good — expired, for
another audience, from another issuer, unsigned, signed with another key, HMAC-signed with the
issuer's public key — or borrowing an identity it did not present, or going on after its token
expired. Defence: the daemon refuses the enrolment (the command never runs), the proxy refuses
new connections of an expired identity, and rules keyed on `identity:` match only verified claims."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lab.instance import Instance
from lab.oidc import KeyIssuer, MockProvider
from lab.testing import ECHO_PORT, SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath

AUD = "interlock"
APP_SUB = "repo:org/app:ref:refs/heads/main"
OTHER_SUB = "repo:org/other:ref:refs/heads/main"
SVC_SUB = "system:serviceaccount:ci:builder"
UNPRIVILEGED = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]


@pytest.fixture(scope="module")
def issuers(lab):
    p = MockProvider(host=lab.a, users=[{"sub": APP_SUB, "repository": "org/app"}, {"sub": OTHER_SUB},
                                        {"sub": SVC_SUB, "kubernetes.io": {"namespace": "ci"}}])
    k = KeyIssuer(host=lab.a)
    yield p, k
    p.stop()
    k.stop()


@pytest.fixture(scope="module")
def inst(lab, issuers, tmp_path_factory):
    provider, keys = issuers
    d = tmp_path_factory.mktemp("identity")
    policy = d / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "targets": {"echo": {"address": lab.b.addr4, "port": ECHO_PORT}},
        "rules": [{"name": "app-may-connect", "target": "echo", "identity": {"sub": "repo:org/app:*"}, "decision": "allow"},
                  {"name": "ci-services", "target": "echo", "identity": {"kubernetes.io.namespace": "ci"},
                   "decision": "allow"}],
        "default": "deny"}))
    token_file = d / "svc.token"
    token_file.write_text(provider.token(SVC_SUB, AUD))
    name = instance_name("id")
    scope = str(lab.cgroup.relative_to(lab.cgroup.parent))
    (lab.cgroup / "svc").mkdir(exist_ok=True)
    i = Instance(lab.a, name, proxy_port=16501, dns_port=16553, policy=str(policy),
                 cgroup_root=f"{scope}/interlock-{name}", capture_cgroup=scope,
                 identity={"issuers": [{"issuer": provider.issuer, "audience": AUD},
                                       {"issuer": keys.issuer, "audience": [AUD]}], "leeway": 0},
                 agents=[{"name": "svc", "cgroup": [f"{scope}/svc"], "identity_token": str(token_file)}])
    i.start()
    i.token_file = token_file
    yield i
    i.close()


@pytest.fixture
def out_dir():
    """Where the unprivileged agent may leave a marker (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="identity-out-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_agent(inst: Instance, tmp_path, agent: str, token: str | None, cmd: list[str], timeout: float = 60):
    args = ["run", "--agent", agent]
    if token is not None:
        f = tmp_path / f"{agent}-{time.monotonic_ns()}.jwt"
        f.write_text(token)
        args += ["--identity-token", str(f)]
    return inst.cli(*args, "--", *UNPRIVILEGED, *cmd, timeout=timeout * SLOWDOWN)


def probe(lab) -> list[str]:
    return [sys.executable, "-m", "lab.probe", "tcp", lab.b.addr4, str(ECHO_PORT)]


def result(r: subprocess.CompletedProcess) -> dict:
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"ok": False, "stdout": r.stdout, "stderr": r.stderr}


def sessions_of(inst: Instance, pid: int) -> list[dict]:
    return [s for s in inst.sessions() if s["tgid"] == pid]


def test_identity_rule_allows_a_matching_subject_and_denies_another(inst, lab, echo, issuers, tmp_path):
    provider, _ = issuers
    before = len(echo.seen("tcp"))
    # control: the app's own token, its subject matches the rule — the connection arrives
    ok = result(run_agent(inst, tmp_path, "app", provider.token(APP_SUB, AUD), probe(lab)))
    assert ok["ok"], ok
    assert len(echo.seen("tcp")) == before + 1
    # another repository's valid token: same command, same destination — nothing arrives
    r = run_agent(inst, tmp_path, "other", provider.token(OTHER_SUB, AUD), probe(lab))
    denied = result(r)
    assert not denied["ok"], denied
    time.sleep(0.3)
    assert len(echo.seen("tcp")) == before + 1, "the server saw a connection the policy refused"
    # on record: each session carries the verified identity; the refusal names the default
    row = wait_until(lambda: [s for s in inst.sessions("app") if s["identity"] and s["verdict"]])
    assert row and json.loads(row[-1]["identity"])["sub"] == APP_SUB
    assert json.loads(row[-1]["identity"])["claims"]["repository"] == "org/app"
    assert json.loads(row[-1]["identity"])["iss"] == provider.issuer
    assert f"identity {APP_SUB}" in inst.cli("replay", row[-1]["id"]).stdout
    other = wait_until(lambda: [s for s in inst.sessions("other") if s["ended"]])
    assert other and json.loads(other[-1]["identity"])["sub"] == OTHER_SUB
    decisions = [e["data"] for e in inst.events("decision") if e["session"] in {s["id"] for s in other}]
    assert any(d["verdict"] == "deny" for d in decisions) or other[-1]["verdict"] == "deny", (other, decisions)
    enrolled = [e["data"] for e in inst.events("enrolled") if e["data"].get("agent") == "app"]
    assert enrolled and enrolled[-1]["identity"]["sub"] == APP_SUB


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bad_tokens(provider: MockProvider, keys: KeyIssuer, foreign: KeyIssuer) -> dict[str, tuple[str, str]]:
    """name -> (token, the reason the daemon must give)."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = keys.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = _b64(json.dumps(keys.claims(APP_SUB, AUD)).encode())
    hs = f"{head}.{body}.{_b64(hmac.new(pem, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"
    return {
        "expired": (keys.sign(keys.claims(APP_SUB, AUD, lifetime=-120)), "expired at"),
        "wrong-audience": (provider.token(APP_SUB, "someone-else"), "audience"),
        "wrong-issuer": (foreign.sign(foreign.claims(APP_SUB, AUD)), "is not accepted"),
        "alg-none": (jwt.encode(keys.claims(APP_SUB, AUD), None, algorithm="none"), "unsigned (alg: none)"),
        "wrong-key": (keys.sign(keys.claims(APP_SUB, AUD), key=other, kid="rsa-1"), "does not verify"),
        "hs256-public-key": (hs, "HS256"),
    }


def test_bad_tokens_refuse_enrolment_with_a_message_and_a_record(inst, lab, echo, issuers, tmp_path, out_dir):
    provider, keys = issuers
    foreign = KeyIssuer(host=lab.a)  # a real issuer, just not one this daemon accepts
    try:
        cases = bad_tokens(provider, keys, foreign)
    finally:
        foreign.stop()
    before = len(echo.seen("tcp"))
    for name, (token, why) in cases.items():
        marker = out_dir / f"ran-{name}"
        r = run_agent(inst, tmp_path, f"bad-{name}", token, ["touch", str(marker)])
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert "identity token refused" in r.stderr and why in r.stderr, (name, r.stderr)
        assert not marker.exists(), f"{name}: the command ran although its token was refused"
        refusals = [e["data"] for e in inst.events("identity-refused") if e["data"].get("agent") == f"bad-{name}"]
        assert refusals and why in refusals[-1]["error"], (name, refusals)
        assert token not in json.dumps(refusals), "the token itself is never recorded"
        assert any(f"bad-{name}" == e["data"]["asked"].get("agent") for e in inst.events("control-refused"))
    # control: the same command with a good token runs
    marker = out_dir / "ran-good"
    r = run_agent(inst, tmp_path, "good", provider.token(APP_SUB, AUD), ["touch", str(marker)])
    assert r.returncode == 0 and marker.exists(), r.stderr
    assert len(echo.seen("tcp")) == before


def test_expired_token_ends_new_connections(inst, lab, echo, issuers, tmp_path):
    _, keys = issuers
    lifetime = 8 * SLOWDOWN
    claims = keys.claims("repo:org/app:ref:refs/heads/short", AUD, lifetime=lifetime)
    wait = f"import time; time.sleep(max(0.0, {claims['exp']} - time.time() + 1.5))"
    p = " ".join(probe(lab))
    script = f"{p}; {sys.executable} -c '{wait}'; {p}"
    before = len(echo.seen("tcp"))
    r = run_agent(inst, tmp_path, "short", keys.sign(claims), ["sh", "-c", script], timeout=60 + lifetime)
    first, second = [json.loads(x) for x in r.stdout.strip().splitlines()[-2:]]
    assert first["ok"], (first, r.stderr)  # control: while the token is valid, the connection goes through
    assert not second["ok"], second
    time.sleep(0.3)
    assert len(echo.seen("tcp")) == before + 1, "a connection after the token's expiry reached the server"
    refused = wait_until(lambda: [s for s in inst.sessions("short") if s["outcome"] == "refused"])
    assert refused and refused[-1]["rule"] == "identity" and "expired at" in refused[-1]["detail"], refused
    assert wait_until(lambda: [e for e in inst.events("identity-expired") if e["data"]["agent"] == "short"])


def test_no_process_borrows_an_identity(inst, lab, issuers, tmp_path, out_dir):
    provider, _ = issuers
    sleeper = tmp_path / "app.jwt"
    sleeper.write_text(provider.token(APP_SUB, AUD))
    proc = inst.host.popen([sys.executable, "-m", "interceptor.cli", "run", "--state-dir", str(inst.state_dir), "--agent",
                            "holder", "--identity-token", str(sleeper), "--", *UNPRIVILEGED, "sleep", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: any(e["data"].get("agent") == "holder" for e in inst.events("enrolled")))
        marker = out_dir / "borrowed"
        for token, why in ((None, "carries the identity"), (provider.token(OTHER_SUB, AUD), "not 'repo:org/other")):
            r = run_agent(inst, tmp_path, "holder", token, ["touch", str(marker)])
            assert r.returncode == 2 and why in r.stderr, r.stderr
            assert not marker.exists()
        # the selector's agent takes its identity from the config only
        r = run_agent(inst, tmp_path, "svc", provider.token(APP_SUB, AUD), ["touch", str(marker)])
        assert r.returncode == 2 and "daemon config" in r.stderr and not marker.exists(), r.stderr
        # control: the same identity may join its own agent
        r = run_agent(inst, tmp_path, "holder", provider.token(APP_SUB, AUD), ["touch", str(marker)])
        assert r.returncode == 0 and marker.exists(), r.stderr
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_selector_token_file_binds_a_service_and_a_bad_rotation_refuses_it(inst, lab, echo, issuers):
    provider, _ = issuers
    svc = lab.cgroup / "svc"
    script = (f"import os,sys; open('{svc}/cgroup.procs','w').write(str(os.getpid())); "
              f"os.setresgid(65533,65533,65533); os.setgroups([]); os.setresuid(65533,65533,65533); "
              f"os.execv(sys.executable,[sys.executable,'-m','lab.probe','tcp','{lab.b.addr4}','{ECHO_PORT}'])")
    before = len(echo.seen("tcp"))
    r = lab.a.run([sys.executable, "-c", script])
    assert '"ok": true' in r.stdout, r.stdout + r.stderr  # control: the service's identity is in the ci namespace
    assert len(echo.seen("tcp")) == before + 1
    row = wait_until(lambda: [s for s in inst.sessions("svc") if s["identity"]])
    ident = json.loads(row[-1]["identity"])
    assert ident["sub"] == SVC_SUB and ident["claims"]["kubernetes.io.namespace"] == "ci"
    # the token file is rotated to a token for another audience: the daemon refuses it, the service is cut off
    inst.token_file.write_text(provider.token(SVC_SUB, "not-interlock"))
    assert wait_until(lambda: [e for e in inst.events("identity-refused") if e["data"].get("agent") == "svc"
                               and e["data"]["reason"] == "audience"], timeout=20)
    r = lab.a.run([sys.executable, "-c", script])
    assert '"ok": true' not in r.stdout, r.stdout
    time.sleep(0.3)
    assert len(echo.seen("tcp")) == before + 1, "a service whose token was refused reached the server"
    refused = wait_until(lambda: [s for s in inst.sessions("svc") if s["outcome"] == "refused" and s["rule"] == "identity"])
    assert refused and "audience" in refused[-1]["detail"], refused
