"""The record format a host and the central recorder share: records, their hash chain, signed checkpoints.

A host's audit trail is a sequence of records, numbered 1, 2, 3... per host (`seq`, dense). Each
record's hash covers the previous record's hash, so changing, removing or inserting a record breaks
every link after it; at least every few seconds the host signs the head of its chain (a
`Checkpoint`, Ed25519, RFC 8032) with a key that never leaves the host, so whoever runs the central
store cannot rewrite a host's history and re-sign it. docs/RECORDER.md describes the format.

Hash of record n (SHA-256, FIPS 180-4), all integers big-endian, every string UTF-8 and preceded
by its length as 4 bytes:

    H(n) = SHA256("interlock-record-v1" 0x00 || H(n-1) || len+host || seq (8 bytes) || len+kind || len+body)

with H(0) = 32 zero bytes. `body` is the record's JSON text exactly as the host wrote it: it is
never re-encoded (key order, spacing and number spelling are part of what is hashed), so it is
stored and shipped verbatim. A checkpoint signs

    "interlock-checkpoint-v1" 0x00 || len+host || seq (8 bytes) || H(seq) || at (8 bytes, µs since the epoch)

This module imports nothing of the proxy, the daemon or the central service: both sides import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = bytes(32)  # H(0): what the first record of every host links to
RECORD_KINDS = ("session-open", "session-close", "event", "approval")
_RECORD_TAG = b"interlock-record-v1\x00"
_CHECKPOINT_TAG = b"interlock-checkpoint-v1\x00"
_SEQ = struct.Struct(">Q")


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(">I", len(b)) + b


def record_hash(prev: bytes, host: str, seq: int, kind: str, body: str) -> bytes:
    """H(seq) from H(seq-1) and the record's fields (32 bytes); see the module docstring."""
    return hashlib.sha256(_RECORD_TAG + prev + _lp(host) + _SEQ.pack(seq) + _lp(kind) + _lp(body)).digest()


@dataclass(frozen=True)
class Record:
    """One record of a host's chain. `hash` is H(seq) in hex; `body` is JSON text, verbatim."""

    host: str
    seq: int
    kind: str
    body: str
    hash: str

    def links_to(self, prev: bytes) -> bool:
        """Whether this record's stored hash is what its content and `prev` (H(seq-1)) give."""
        return record_hash(prev, self.host, self.seq, self.kind, self.body).hex() == self.hash

    def data(self) -> dict:
        """The body parsed (a dict; {} when the body is not a JSON object)."""
        try:
            d = json.loads(self.body)
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}


def chain(host: str, first_seq: int, prev: bytes, items: Iterable[tuple[str, str]]) -> Iterator[Record]:
    """Records for (kind, body) pairs continuing a chain whose head is (first_seq - 1, prev)."""
    seq = first_seq
    for kind, body in items:
        h = record_hash(prev, host, seq, kind, body)
        yield Record(host, seq, kind, body, h.hex())
        prev, seq = h, seq + 1


# ---- checkpoints ---------------------------------------------------------------------------

def checkpoint_message(host: str, seq: int, head: bytes, at_us: int) -> bytes:
    return _CHECKPOINT_TAG + _lp(host) + _SEQ.pack(seq) + head + _SEQ.pack(at_us)


@dataclass(frozen=True)
class Checkpoint:
    """A host's signature over its chain head: record `seq` has hash `head` (hex) at `at_us`."""

    host: str
    seq: int
    head: str
    at_us: int
    sig: str  # Ed25519 signature, hex (64 bytes)

    def verify(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(bytes.fromhex(self.sig), checkpoint_message(self.host, self.seq, bytes.fromhex(self.head), self.at_us))
            return True
        except (InvalidSignature, ValueError):
            return False


def sign_checkpoint(key: Ed25519PrivateKey, host: str, seq: int, head: bytes, at_us: int) -> Checkpoint:
    sig = key.sign(checkpoint_message(host, seq, head, at_us))
    return Checkpoint(host, seq, head.hex(), at_us, sig.hex())


# ---- keys ----------------------------------------------------------------------------------

def new_signing_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key written to `path` (PKCS#8 PEM, mode 0600, created exclusively)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key in hex: what a host registers and a verifier pins."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Raises ValueError when `text` is not 32 bytes of hex."""
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


# ---- verification --------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One break in a host's chain: `problem` is changed, removed, inserted, bad-checkpoint or unsigned."""

    host: str
    seq: int
    problem: str
    detail: str


def verify_chain(host: str, records: Iterable[Record], checkpoints: Iterable[Checkpoint], key: Ed25519PublicKey,
                 first_seq: int = 1, prev: bytes = GENESIS) -> list[Finding]:
    """Recompute one host's chain and say where it breaks, first break first.

    `records` in seq order from `first_seq` (whose predecessor's hash is `prev`); `checkpoints`
    any order. Each record is checked against its predecessor's *stored* hash, so an edited
    record is named by itself; a missing seq is named as removed; a record that only links when
    its predecessor is skipped names that predecessor as inserted. Every checkpoint must carry a
    valid signature and match the stored hash at its seq; records after the last valid checkpoint
    are reported once as `unsigned` (the host may not have signed them yet). Empty list: intact."""
    findings: list[Finding] = []
    by_seq: dict[int, Record] = {}
    expected, last_seq = first_seq, first_seq - 1
    prev_hash, before_prev = prev, None  # stored H of the last two records seen
    prev_rec: Record | None = None
    for rec in records:
        if rec.host != host:
            findings.append(Finding(host, rec.seq, "inserted", f"record of host {rec.host!r} in this host's chain"))
            continue
        if rec.seq < expected:
            findings.append(Finding(host, rec.seq, "inserted", f"seq {rec.seq} again or out of order (expected {expected})"))
            continue
        if rec.seq > expected:
            gap = f"seq {expected}" if rec.seq == expected + 1 else f"seqs {expected}..{rec.seq - 1}"
            findings.append(Finding(host, expected, "removed", f"{gap} missing before seq {rec.seq}"))
        elif not rec.links_to(prev_hash):
            if prev_rec is not None and before_prev is not None and \
                    record_hash(before_prev, host, rec.seq - 1, rec.kind, rec.body).hex() == rec.hash:
                findings.append(Finding(host, prev_rec.seq, "inserted", f"seq {prev_rec.seq} ({prev_rec.kind}) is not in the "
                                        "host's chain: the record after it links past it"))
            else:
                findings.append(Finding(host, rec.seq, "changed", f"seq {rec.seq} ({rec.kind}): its content does not "
                                        "hash to its recorded hash"))
        by_seq[rec.seq] = rec
        before_prev, prev_hash, prev_rec = prev_hash, bytes.fromhex(rec.hash) if _is_hex32(rec.hash) else bytes(32), rec
        expected, last_seq = rec.seq + 1, rec.seq
    signed_to = first_seq - 1
    for cp in sorted(checkpoints, key=lambda c: c.seq):
        if cp.host != host or cp.seq < first_seq or cp.seq > last_seq:
            continue
        if not cp.verify(key):
            findings.append(Finding(host, cp.seq, "bad-checkpoint", f"checkpoint at seq {cp.seq}: signature does not verify"))
        elif cp.seq in by_seq and by_seq[cp.seq].hash != cp.head:
            findings.append(Finding(host, cp.seq, "bad-checkpoint", f"checkpoint at seq {cp.seq}: the host signed a "
                                    "different chain head (records up to here were rewritten)"))
        else:
            signed_to = max(signed_to, cp.seq)
    if last_seq > signed_to:
        findings.append(Finding(host, signed_to + 1, "unsigned", f"seqs {signed_to + 1}..{last_seq} not yet covered by a checkpoint"))
    order = {"changed": 0, "removed": 0, "inserted": 0, "bad-checkpoint": 1, "unsigned": 2}
    findings.sort(key=lambda f: (order[f.problem], f.seq))
    return findings


def _is_hex32(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == 32
    except ValueError:
        return False


# ---- JSON Lines (export files and the ingest API) -----------------------------------------

def to_json(item: Record | Checkpoint) -> dict:
    return {"type": "record" if isinstance(item, Record) else "checkpoint", **asdict(item)}


def from_json(obj: dict) -> Record | Checkpoint:
    """Raises ValueError (with what is wrong) for anything but a well-formed record or checkpoint."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    kind = obj.get("type")
    try:
        if kind == "record":
            r = Record(str(obj["host"]), _int(obj["seq"]), str(obj["kind"]), obj["body"], str(obj["hash"]))
            if not isinstance(r.body, str) or r.kind not in RECORD_KINDS or not _is_hex32(r.hash):
                raise ValueError("record: body must be text, kind one of " + ", ".join(RECORD_KINDS) + ", hash 32 bytes hex")
            return r
        if kind == "checkpoint":
            return Checkpoint(str(obj["host"]), _int(obj["seq"]), str(obj["head"]), _int(obj["at_us"]), str(obj["sig"]))
    except KeyError as e:
        raise ValueError(f"{kind}: missing field {e}") from None
    raise ValueError(f"unknown type {kind!r}")


def _int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 63:
        raise ValueError(f"not a non-negative 64-bit integer: {v!r}")
    return v
