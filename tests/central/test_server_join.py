"""Joining a host with a single-use, expiring token; revocation; who may call what (mTLS per route).

Every refusal is checked twice: the status and message the caller got, and the row in `refusals`."""

from __future__ import annotations

import threading

from central_kit import Client, call, csr_pem, join_request, last_refusal_id, refusals
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def _subject(pem: str) -> dict:
    cert = x509.load_pem_x509_certificate(pem.encode())
    return {a.oid: a.value for a in cert.subject}


def test_join_with_a_good_token_issues_a_host_certificate(recorder, joined):
    reply, _, signing = join_request(recorder, recorder.token(), name="web-1")
    assert reply.status == 200, reply.body
    got = reply.json()
    subject = _subject(got["cert"])
    # the host id is ours, not the CSR's subject ("ignored"), and the OU is never an operator's
    assert subject[NameOID.COMMON_NAME] == got["host_id"] and subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "host"
    assert got["ca"] == recorder.ca_pem.read_text()
    row = recorder.psql(f"SELECT name, signing_key FROM hosts WHERE host_id = '{got['host_id']}'")
    from recorder.records import public_key_hex
    assert row == f"web-1|{public_key_hex(signing)}"
    assert recorder.psql(f"SELECT seq FROM chain_heads WHERE host_id = '{got['host_id']}'") == "0"
    # the host's certificate works: its head is empty
    h = joined("web-2")
    assert h.get("/v1/head").json() == {"seq": 0, "hash": "00" * 32, "signed_seq": 0}


def test_a_used_token_is_refused(recorder):
    token = recorder.token()
    assert join_request(recorder, token)[0].status == 200
    mark = last_refusal_id(recorder)
    reply, _, _ = join_request(recorder, token)
    assert reply.status == 401 and "already used" in reply.json()["error"]
    assert [(s, "already used" in r) for s, _, r in refusals(recorder, mark)] == [(401, True)]


def test_an_expired_token_is_refused(recorder):
    token = recorder.token(expires="1h")
    token_id = token.split(".")[1]
    recorder.psql(f"UPDATE enrolment_tokens SET expires_at = now() - interval '1 second' WHERE id = '{token_id}'")
    mark = last_refusal_id(recorder)
    reply, _, _ = join_request(recorder, token)
    assert reply.status == 401 and "expired" in reply.json()["error"]
    assert [s for s, _, _ in refusals(recorder, mark)] == [401]
    assert recorder.psql(f"SELECT used_at IS NULL FROM enrolment_tokens WHERE id = '{token_id}'") == "t"


def test_wrong_and_malformed_tokens_are_refused(recorder):
    good = recorder.token()
    prefix, tid, secret, ca = good.split(".")
    wrong_secret = f"{prefix}.{tid}.{'A' * len(secret)}.{ca}"
    unknown_id = f"{prefix}.{'0' * 12}.{secret}.{ca}"
    other_ca = f"{prefix}.{tid}.{secret}.{'ab' * 32}"
    mark = last_refusal_id(recorder)
    for token, words in ((wrong_secret, "invalid token"), (unknown_id, "invalid token"), (other_ca, "another recorder"),
                         ("il1.nonsense", "not an enrolment token"), ("", "not an enrolment token")):
        reply, _, _ = join_request(recorder, token)
        assert reply.status == 401 and words in reply.json()["error"], (token, reply.body)
    assert [s for s, _, _ in refusals(recorder, mark)] == [401] * 5
    # none of that consumed the good token
    assert join_request(recorder, good)[0].status == 200


def test_a_bad_csr_is_refused_and_does_not_consume_the_token(recorder):
    token = recorder.token()
    reply, _, _ = join_request(recorder, token, csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert reply.status == 400 and "csr" in reply.json()["error"]
    reply, _, _ = join_request(recorder, token, csr=csr_pem(rsa.generate_private_key(65537, 1024)))
    assert reply.status == 400 and "RSA >= 2048" in reply.json()["error"]
    assert join_request(recorder, token)[0].status == 200


def test_two_joins_racing_with_one_token_one_wins(recorder):
    token = recorder.token()
    statuses: list[int] = []

    def go():
        statuses.append(join_request(recorder, token)[0].status)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [401] * 5


def test_revoked_host_is_refused_and_recorded(recorder, joined):
    h = joined("to-revoke")
    assert h.ingest(h.records(3)).status == 200
    out = recorder.cli("revoke", h.host_id, "--database", recorder.dsn, "--reason", "decommissioned")
    assert "revoked" in out.stdout
    mark = last_refusal_id(recorder)
    r1 = h.ingest(h.records(2))
    r2 = h.get("/v1/head")
    assert (r1.status, r2.status) == (403, 403) and "revoked" in r1.json()["error"]
    assert [(s, host) for s, host, _ in refusals(recorder, mark)] == [(403, h.host_id), (403, h.host_id)]
    assert recorder.psql(f"SELECT count(*) FROM records WHERE host_id = '{h.host_id}'") == "3"
    # the control: another host still ingests
    other = joined("still-here")
    assert other.ingest(other.records(2)).status == 200


def test_routes_need_the_right_certificate(recorder, joined, tmp_path):
    h = joined("mtls")
    op = recorder.operator("alice")
    anon = Client(recorder.url, recorder.ca_pem)
    mark = last_refusal_id(recorder)
    body = {"host": h.host_id, "records": [], "checkpoints": []}
    assert call(recorder, anon, "POST", "/v1/ingest", body).status == 401   # no certificate
    assert call(recorder, anon, "GET", "/v1/head").status == 401
    assert call(recorder, op, "POST", "/v1/ingest", body).status == 403     # an operator is not a host
    assert h.get("/v1/sessions").status == 403                              # a host does not read the fleet
    assert call(recorder, anon, "GET", "/v1/hosts").status == 401
    assert [s for s, _, _ in refusals(recorder, mark)] == [401, 401, 403, 403, 401]
    # controls: each certificate where it belongs; the CA needs none
    assert h.post(body).status == 200
    assert call(recorder, op, "GET", "/v1/hosts").status == 200
    ca = call(recorder, anon, "GET", "/v1/ca")
    assert ca.status == 200 and ca.body.decode() == recorder.ca_pem.read_text()


def test_a_certificate_from_another_ca_is_not_accepted(recorder, tmp_path):
    """A client certificate the recorder's CA did not sign fails the TLS handshake (no host id to claim)."""
    import ssl

    from central import ca as ca_mod

    other = ca_mod.StateDir(tmp_path / "other")
    ca_mod.init(other, "evil.test", [])
    crt, key = ca_mod.issue_operator(other, "mallory", tmp_path / "mallory")
    mallory = Client(recorder.url, recorder.ca_pem, crt, key)
    try:
        reply = call(recorder, mallory, "GET", "/v1/hosts")
    except (ssl.SSLError, ConnectionError, OSError):
        reply = None
    assert reply is None or reply.status == 401


def test_a_chunked_join_body_past_its_limit_is_refused(recorder):
    """No Content-Length to check first: the recorder stops reading at the route's limit (64 KiB)."""
    import http.client

    from lab.central import in_host

    def send() -> int:
        c = Client(recorder.url, recorder.ca_pem)
        conn = http.client.HTTPSConnection(c.host, c.port, context=c.ctx, timeout=60)
        try:
            conn.request("POST", "/v1/join", body=iter([b"x" * 65536] * 4), headers={"Content-Type": "application/json"},
                         encode_chunked=True)
            return conn.getresponse().status
        finally:
            conn.close()

    mark = last_refusal_id(recorder)
    assert in_host(recorder.host, send) == 413
    assert [s for s, _, _ in refusals(recorder, mark)] == [413]
