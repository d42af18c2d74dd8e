"""identity/oidc.py against real issuers on loopback: oidc-provider-mock (a real OpenID provider,
its tokens from its own code flow) and a key issuer whose tokens the test signs for the bad cases.
Every refusal names what failed; nothing of an issuer that is not accepted is fetched."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from identity.oidc import Issuer, TokenError, Verifier, validate
from lab.oidc import KeyIssuer, MockProvider

AUD = "interlock"


@pytest.fixture(scope="module")
def provider():
    p = MockProvider(users=[{"sub": "repo:org/app:ref:refs/heads/main", "repository": "org/app",
                             "kubernetes.io": {"namespace": "ci"}}])
    yield p
    p.stop()


@pytest.fixture(scope="module")
def keys():
    k = KeyIssuer()
    yield k
    k.stop()


@pytest.fixture(scope="module")
def verifier(provider, keys):
    return Verifier([Issuer(provider.issuer, (AUD,)), Issuer(keys.issuer, (AUD,))], leeway=5)


def refused(verifier: Verifier, token: str, **kw) -> TokenError:
    with pytest.raises(TokenError) as e:
        verifier.validate(token, **kw)
    return e.value


def test_provider_token_is_accepted_with_its_claims(provider, verifier):
    token = provider.token("repo:org/app:ref:refs/heads/main", AUD, nonce="n-1")
    claims = verifier.validate(token, nonce="n-1")
    assert claims["sub"] == "repo:org/app:ref:refs/heads/main" and claims["iss"] == provider.issuer
    assert claims["repository"] == "org/app" and claims["kubernetes.io"] == {"namespace": "ci"}
    # the one-issuer form, discovering the keys itself
    assert validate(token, issuer=provider.issuer, audience=AUD)["sub"] == claims["sub"]


def test_nonce_must_match(provider, verifier):
    token = provider.token("someone", AUD, nonce="mine")
    e = refused(verifier, token, nonce="another")
    assert e.reason == "nonce" and "nonce does not match" in str(e)


def test_wrong_audience(provider, verifier):
    token = provider.token("someone", "another-client")  # the provider's aud is the client id
    e = refused(verifier, token)
    assert e.reason == "audience" and "another-client" in str(e) and "expected: interlock" in str(e)


def test_expired_provider_token(tmp_path):
    short = MockProvider(token_max_age=1)
    try:
        token = short.token("someone", AUD)
        time.sleep(2.5)
        e = refused(Verifier([Issuer(short.issuer, (AUD,))], leeway=0), token)
        assert e.reason == "expired" and "expired at" in str(e) and "fresh token" in str(e)
    finally:
        short.stop()


def test_expired_beyond_leeway(keys, verifier):
    e = refused(verifier, keys.sign(keys.claims("someone", AUD, lifetime=-60)))
    assert e.reason == "expired" and "leeway 5s" in str(e)
    # within the leeway it still counts (clock skew)
    assert verifier.validate(keys.sign(keys.claims("someone", AUD, lifetime=-2)))["sub"] == "someone"


def test_not_yet_valid(keys, verifier):
    claims = keys.claims("someone", AUD)
    claims["nbf"] = claims["iat"] = int(time.time()) + 600
    e = refused(verifier, keys.sign(claims))
    assert e.reason == "not-yet-valid"


def test_wrong_issuer_fetches_nothing(provider, keys):
    only_provider = Verifier([Issuer(provider.issuer, (AUD,))])
    served = (keys.dir / "server.log").read_text()
    e = refused(only_provider, keys.sign(keys.claims("someone", AUD)))
    assert e.reason == "issuer" and keys.issuer in str(e) and provider.issuer in str(e)
    time.sleep(0.3)
    assert (keys.dir / "server.log").read_text() == served, "an issuer that is not accepted is never contacted"


def test_unsigned_alg_none_is_refused(keys, verifier):
    token = jwt.encode(keys.claims("someone", AUD), None, algorithm="none")
    e = refused(verifier, token)
    assert e.reason == "algorithm" and "unsigned (alg: none)" in str(e)
    # a forged header claiming RS256 with an empty signature does not pass either
    head, body, _ = keys.sign(keys.claims("someone", AUD)).split(".")
    forged = f"{head}.{_b64(json.dumps(keys.claims('admin', AUD)).encode())}."
    assert refused(verifier, forged).reason in ("signature", "malformed")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_hmac_with_the_public_key_is_refused(keys, verifier):
    """The classic confusion: HS256 keyed with the issuer's public key, which anyone can fetch."""
    pem = keys.rsa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = _b64(json.dumps(keys.claims("admin", AUD)).encode())
    sig = _b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    e = refused(verifier, f"{head}.{body}.{sig}")
    assert e.reason == "algorithm" and "HS256" in str(e) and "HMAC" in str(e)


def test_wrong_key_is_refused(keys, verifier):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = refused(verifier, keys.sign(keys.claims("admin", AUD), key=other, kid="rsa-1"))
    assert e.reason == "signature" and "does not verify with key 'rsa-1'" in str(e)
    e = refused(verifier, keys.sign(keys.claims("admin", AUD), key=other, kid="attacker-key"))
    assert e.reason == "key" and "attacker-key" in str(e) and "does not publish" in str(e)


def test_key_type_must_fit_the_algorithm(keys, verifier):
    # signed with the issuer's own EC key, but naming its RSA key
    token = keys.sign(keys.claims("someone", AUD), alg="ES256", key=keys.ec, kid="rsa-1")
    e = refused(verifier, token)
    assert e.reason == "algorithm" and "EC key" in str(e)
    assert verifier.validate(keys.sign(keys.claims("someone", AUD), alg="ES256"))["sub"] == "someone"


def test_altered_claims_and_missing_claims(keys, verifier):
    head, _, sig = keys.sign(keys.claims("someone", AUD)).split(".")
    body = _b64(json.dumps(keys.claims("admin", AUD)).encode())
    assert refused(verifier, f"{head}.{body}.{sig}").reason == "signature"
    claims = keys.claims("someone", AUD)
    del claims["exp"]
    e = refused(verifier, keys.sign(claims))
    assert e.reason == "claim" and "'exp'" in str(e)


def test_malformed_input(verifier):
    for bad in ("", "abc", "a.b", "a.b.c", "x" * 20000, 42):
        e = refused(verifier, bad)
        assert e.reason == "malformed", (bad, e)


def test_algorithm_allow_list_is_asymmetric_only():
    with pytest.raises(ValueError, match="asymmetric only"):
        Issuer("https://i.example", ("a",), algorithms=("HS256",))
    with pytest.raises(ValueError, match="asymmetric only"):
        Issuer("https://i.example", ("a",), algorithms=("none",))


def test_unreachable_issuer_is_a_clear_refusal(keys):
    from lab.oidc import free_port

    gone = f"http://127.0.0.1:{free_port()}"
    claims = {**keys.claims("someone", AUD), "iss": gone}
    e = refused(Verifier([Issuer(gone, (AUD,))], timeout=2), keys.sign(claims))
    assert e.reason == "discovery" and "cannot fetch" in str(e)
