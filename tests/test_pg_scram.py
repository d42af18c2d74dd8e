"""Client-side SCRAM-SHA-256, md5 and the upstream authenticator, against the RFC test vectors
and hand-built server messages. tests/test_pg_live.py runs the same code against a real server."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from proxy.postgres import scram, wire
from proxy.postgres.scram import AuthenticationError, ScramClient, ScramError, UpstreamAuthenticator


def test_rfc7677_sha256_vector():
    c = ScramClient("pencil", username="user", nonce="rOprNGfwEbeRWgbNEkqO")
    assert c.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = c.client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                           b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert c.state == "verified"


def test_rfc5802_sha1_vector():
    c = ScramClient("pencil", username="user", nonce="fyko+d2lbbFgONRv9qkxdawL", hash_name="sha1")
    assert c.client_first() == b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
    final = c.client_final(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
    assert final == b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    c.verify_server_final(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")


class FakeScramServer:
    """A server side written from RFC 5802 §3, to exercise the client beyond the fixed vectors."""

    def __init__(self, password: bytes, salt=b"saltsalt", iterations=4096, cbind: bytes = b""):
        self.salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        self.salt, self.iterations, self.cbind = salt, iterations, cbind

    def first(self, client_first: bytes, server_nonce="SRV") -> bytes:
        gs2, self.bare = client_first.decode().split(",,", 1)
        self.gs2 = gs2 + ",,"
        self.nonce = dict(kv.split("=", 1) for kv in self.bare.split(","))["r"] + server_nonce
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
        return self.server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        text = client_final.decode()
        without_proof, _, proof_b64 = text.rpartition(",p=")
        attrs = dict(kv.split("=", 1) for kv in without_proof.split(","))
        assert base64.b64decode(attrs["c"]) == self.gs2.encode() + self.cbind
        auth = f"{self.bare},{self.server_first},{without_proof}".encode()
        client_key = hmac.new(self.salted, b"Client Key", "sha256").digest()
        stored = hashlib.sha256(client_key).digest()
        sig = hmac.new(stored, auth, "sha256").digest()
        proof = base64.b64decode(proof_b64)
        recovered = bytes(a ^ b for a, b in zip(proof, sig, strict=True))
        if hashlib.sha256(recovered).digest() != stored:
            return b"e=invalid-proof"
        server_key = hmac.new(self.salted, b"Server Key", "sha256").digest()
        return b"v=" + base64.b64encode(hmac.new(server_key, auth, "sha256").digest())


def test_client_against_fake_server():
    srv = FakeScramServer(b"s3cret")
    c = ScramClient("s3cret")
    final = c.client_final(srv.first(c.client_first()))
    c.verify_server_final(srv.final(final))


def test_wrong_password_is_detected_by_server():
    srv = FakeScramServer(b"right")
    c = ScramClient("wrong")
    assert srv.final(c.client_final(srv.first(c.client_first()))) == b"e=invalid-proof"
    with pytest.raises(ScramError, match="invalid-proof"):
        c.verify_server_final(b"e=invalid-proof")


def test_server_that_does_not_know_the_password_is_caught():
    impostor = FakeScramServer(b"guess")
    c = ScramClient("real")
    c.client_final(impostor.first(c.client_first()))
    forged = b"v=" + base64.b64encode(b"\0" * 32)
    with pytest.raises(ScramError, match="signature mismatch"):
        c.verify_server_final(forged)


def test_channel_binding_plus():
    cb = scram.tls_server_end_point(b"\x11" * 32)
    srv = FakeScramServer(b"pw", cbind=cb[1])
    c = ScramClient("pw", channel_binding=cb)
    first = c.client_first()
    assert first.startswith(b"p=tls-server-end-point,,") and c.mechanism == "SCRAM-SHA-256-PLUS"
    c.verify_server_final(srv.final(c.client_final(srv.first(first))))


def test_y_flag_when_binding_possible_but_not_offered():
    c = ScramClient("pw", client_supports_binding=True)
    assert c.client_first().startswith(b"y,,")
    final = c.client_final(b"r=" + c.nonce.encode() + b"X,s=c2FsdA==,i=1")
    assert final.startswith(b"c=eSws,")  # base64("y,,")


@pytest.mark.parametrize("server_first,match", [
    (b"r=OTHERNONCE,s=c2FsdA==,i=4096", "does not extend"),
    (b"r={n},s=c2FsdA==,i=4096", "does not extend"),  # must add server entropy
    (b"m=ext,r={n}x,s=c2FsdA==,i=4096", "extension"),
    (b"r={n}x,s=!!!,i=4096", "not base64"),
    (b"r={n}x,s=,i=4096", "empty salt"),
    (b"r={n}x,s=c2FsdA==,i=0", "out of range"),
    (b"r={n}x,s=c2FsdA==,i=99999999999", "out of range"),
    (b"r={n}x,s=c2FsdA==", "must start with"),
    (b"garbage", "malformed"),
    (b"\xff", "not UTF-8"),
])
def test_bad_server_first(server_first, match):
    c = ScramClient("pw", nonce="abc")
    c.client_first()
    with pytest.raises(ScramError, match=match):
        c.client_final(server_first.replace(b"{n}", b"abc"))


def test_state_machine_order_is_enforced():
    c = ScramClient("pw")
    with pytest.raises(ScramError):
        c.client_final(b"r=x,s=c2FsdA==,i=1")
    with pytest.raises(ScramError):
        c.verify_server_final(b"v=AAAA")
    c.client_first()
    with pytest.raises(ScramError):
        c.client_first()


def test_username_escaping_and_nonce_checks():
    c = ScramClient("pw", username="a=b,c", nonce="n")
    assert c.client_first() == b"n,,n=a=3Db=2Cc,r=n"
    with pytest.raises(ValueError):
        ScramClient("pw", nonce="a,b")


# --------------------------------------------------------------------------------------------
# SASLprep (RFC 4013 §3 examples) and password normalization


@pytest.mark.parametrize("given,expected", [
    ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
    ("user", "user"),
    ("USER", "USER"),
    ("\u00aa", "a"),  # NFKC
    ("\u2168", "IX"),
    ("a\u00a0b", "a b"),  # non-ASCII space to space
])
def test_saslprep_rfc4013_examples(given, expected):
    assert scram.saslprep(given) == expected


@pytest.mark.parametrize("given", ["\u0007", "\u0627\u0031", "\ue000"])
def test_saslprep_prohibited(given):
    with pytest.raises(ValueError):
        scram.saslprep(given)


def test_normalize_password_falls_back_like_postgres():
    assert scram.normalize_password("plain\x07ascii") == b"plain\x07ascii"  # ASCII: untouched
    assert scram.normalize_password("\u2168") == b"IX"
    assert scram.normalize_password("\ue000x") == "\ue000x".encode()  # prohibited: raw bytes
    assert scram.normalize_password(b"\xff\xfe") == b"\xff\xfe"  # not UTF-8: raw bytes


def test_md5_password():
    inner = hashlib.md5(b"secretbob").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"salt").hexdigest()
    assert scram.md5_password("bob", "secret", b"salt") == expected
    assert len(expected) == 35


# --------------------------------------------------------------------------------------------
# UpstreamAuthenticator


def _drive_scram(auth: UpstreamAuthenticator, password: bytes, mechanisms=("SCRAM-SHA-256",)):
    srv = FakeScramServer(password)
    first = auth.handle(wire.AuthenticationSASL(mechanisms))
    (p,) = wire.read_messages("frontend", first, startup=False)
    init = p.as_sasl_initial_response()
    cont = auth.handle(wire.AuthenticationSASLContinue(srv.first(init.data)))
    (p,) = wire.read_messages("frontend", cont, startup=False)
    assert auth.handle(wire.AuthenticationSASLFinal(srv.final(p.data))) is None
    return init


def test_authenticator_scram_happy_path():
    auth = UpstreamAuthenticator("app", "pw")
    init = _drive_scram(auth, b"pw")
    assert init.mechanism == "SCRAM-SHA-256"
    assert auth.handle(wire.AuthenticationOk()) is None
    assert auth.done and auth.method == "scram-sha-256"
    assert auth.handle(wire.ParameterStatus("a", "b")) is None  # after done: ignored


def test_authenticator_prefers_plus_with_channel_binding():
    auth = UpstreamAuthenticator("app", "pw", channel_binding=("tls-server-end-point", b""))
    first = auth.handle(wire.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")))
    (p,) = wire.read_messages("frontend", first, startup=False)
    assert p.as_sasl_initial_response().mechanism == "SCRAM-SHA-256-PLUS"


def test_authenticator_requires_channel_binding():
    auth = UpstreamAuthenticator("app", "pw", channel_binding=("tls-server-end-point", b"h"),
                                 require_channel_binding=True)
    with pytest.raises(ScramError, match="channel binding is required"):
        auth.handle(wire.AuthenticationSASL(("SCRAM-SHA-256",)))


def test_authenticator_refuses_ok_without_scram_proof():
    auth = UpstreamAuthenticator("app", "pw")
    auth.handle(wire.AuthenticationSASL(("SCRAM-SHA-256",)))
    with pytest.raises(ScramError, match="without completing"):
        auth.handle(wire.AuthenticationOk())


def test_authenticator_refuses_cleartext_and_md5_by_default():
    with pytest.raises(AuthenticationError, match="password authentication"):
        UpstreamAuthenticator("app", "pw").handle(wire.AuthenticationCleartextPassword())
    with pytest.raises(AuthenticationError, match="md5"):
        UpstreamAuthenticator("app", "pw").handle(wire.AuthenticationMD5Password(b"salt"))


def test_authenticator_md5_and_cleartext_when_allowed():
    auth = UpstreamAuthenticator("bob", "secret", allow=("md5",))
    (p,) = wire.read_messages("frontend", auth.handle(wire.AuthenticationMD5Password(b"salt")), startup=False)
    assert p.as_password() == scram.md5_password("bob", "secret", b"salt")
    auth = UpstreamAuthenticator("bob", "secret", allow=("password",))
    (p,) = wire.read_messages("frontend", auth.handle(wire.AuthenticationCleartextPassword()), startup=False)
    assert p.as_password() == "secret"


def test_authenticator_reports_server_errors_and_oddities():
    auth = UpstreamAuthenticator("app", "pw")
    with pytest.raises(AuthenticationError) as e:
        auth.handle(wire.ErrorResponse({"S": "FATAL", "C": "28P01", "M": "password authentication failed"}))
    assert e.value.code == "28P01"
    with pytest.raises(AuthenticationError, match="code 7"):
        UpstreamAuthenticator("a", "b").handle(wire.AuthenticationOther(7))
    with pytest.raises(AuthenticationError, match="no supported SASL"):
        UpstreamAuthenticator("a", "b").handle(wire.AuthenticationSASL(("OAUTHBEARER",)))
    with pytest.raises(AuthenticationError, match="unexpected"):
        UpstreamAuthenticator("a", "b").handle(wire.DataRow(()))
    with pytest.raises(ScramError):
        UpstreamAuthenticator("a", "b").handle(wire.AuthenticationSASLContinue(b""))
    with pytest.raises(ValueError):
        UpstreamAuthenticator("a", "b", allow=("kerberos",))


def test_authenticator_trust_upstream():
    auth = UpstreamAuthenticator("app", "pw")
    auth.handle(wire.AuthenticationOk())
    assert auth.done and auth.method == "trust"
