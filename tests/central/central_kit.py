"""Helpers for the central recorder's tests: joined hosts that talk to a real recorder over real
HTTPS with their own client certificates (lab/central.py), and the refusals it stored."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lab.central import Central, Client, Reply, in_host
from recorder.records import GENESIS, Ed25519PrivateKey, Record, chain, public_key_hex, sign_checkpoint, to_json


def csr_pem(key: ec.EllipticCurvePrivateKey, cn: str = "ignored") -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def call(rec: Central, client: Client, method: str, path: str, body=None) -> Reply:
    return in_host(rec.host, client.request, method, path, body)


def join_request(rec: Central, token: str, name: str = "agent-host", csr: str | None = None,
                 signing: Ed25519PrivateKey | None = None) -> tuple[Reply, ec.EllipticCurvePrivateKey, Ed25519PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    signing = signing or Ed25519PrivateKey.generate()
    body = {"token": token, "csr": csr if csr is not None else csr_pem(key), "signing_key": public_key_hex(signing), "name": name}
    return call(rec, Client(rec.url, rec.ca_pem), "POST", "/v1/join", body), key, signing


@dataclass
class Joined:
    """A host that joined: its id, HTTPS client (its own client certificate), signing key, and chain head."""

    rec: Central
    host_id: str
    client: Client
    signing: Ed25519PrivateKey
    seq: int = 0
    head: bytes = GENESIS
    sent: list[Record] = field(default_factory=list)

    def records(self, n: int, session: str = "s1", first_kind: str | None = None) -> list[Record]:
        """The next n records of this host's chain (not sent): events of `session`."""
        items = []
        for i in range(n):
            kind = first_kind if (i == 0 and first_kind) else "event"
            body = {"id": self.seq + i + 1, "at": time.time(), "kind": "statement", "session": session, "data": {"sql": f"select {i}"}}
            items.append((kind, json.dumps(body)))
        return self.extend(items)

    def extend(self, items: list[tuple[str, str]]) -> list[Record]:
        recs = list(chain(self.host_id, self.seq + 1, self.head, items))
        if recs:
            self.seq, self.head = recs[-1].seq, bytes.fromhex(recs[-1].hash)
            self.sent += recs
        return recs

    def checkpoint(self, rec: Record, key: Ed25519PrivateKey | None = None):
        return sign_checkpoint(key or self.signing, self.host_id, rec.seq, bytes.fromhex(rec.hash), time.time_ns() // 1000)

    def ingest(self, records: list[Record], checkpoints=None, host: str | None = None) -> Reply:
        body = {"host": host or self.host_id, "records": [to_json(r) for r in records],
                "checkpoints": [to_json(c) for c in (checkpoints or [])]}
        return self.post(body)

    def post(self, body) -> Reply:
        return call(self.rec, self.client, "POST", "/v1/ingest", body)

    def get(self, path: str) -> Reply:
        return call(self.rec, self.client, "GET", path)


def join(rec: Central, tmp: Path, name: str = "agent-host") -> Joined:
    reply, key, signing = join_request(rec, rec.token(), name)
    assert reply.status == 200, reply.body
    got = reply.json()
    d = tmp / got["host_id"]
    d.mkdir(parents=True)
    (d / "tls.crt").write_text(got["cert"])
    (d / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return Joined(rec, got["host_id"], Client(rec.url, rec.ca_pem, d / "tls.crt", d / "tls.key"), signing)


def refusals(rec: Central, since_id: int = 0) -> list[tuple[int, str, str]]:
    """(status, claimed_host, reason) of refusals stored after `since_id`."""
    out = rec.psql(f"SELECT status, coalesce(claimed_host, ''), reason FROM refusals WHERE id > {since_id} ORDER BY id")
    return [(int(s), h, r) for s, h, r in (line.split("|", 2) for line in out.splitlines() if line)]


def last_refusal_id(rec: Central) -> int:
    return int(rec.psql("SELECT coalesce(max(id), 0) FROM refusals"))
