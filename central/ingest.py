"""Ingest: a host's batch of records and checkpoints, checked and stored in one transaction.

A batch (CENTRAL.md, POST /v1/ingest) is checked in two steps. `parse_batch` needs no database: size
and shape (400), the host named in the batch and in every record is the certificate's host (403),
seqs contiguous and in order, every record after the first links to the one before it. `store`
then takes the host's chain head FOR UPDATE (two recorder instances never interleave one host's
batches) and decides against what is stored:

- first seq past head + 1: a gap, 409 {"expected": head + 1};
- seqs at or below the head are resends: equal hashes are duplicates (a batch sent twice is stored
  once), a different hash is a fork, 409 + finding;
- the first new record must link to the stored H(seq - 1), else 409 {"expected"} + finding;
- every checkpoint's Ed25519 signature (the host's registered key) and signed head must match,
  else 409 + finding and nothing of the batch is stored.

New records go in with one COPY straight into `records`: with the head row locked, no stored row
can have a seq above the head, so nothing can conflict. Derived rows (sessions, approvals) are
upserted set-wise from a per-connection staging table, latest record winning."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from hashlib import sha256

import psycopg

try:
    import orjson
except ImportError:  # a recorder installed without it parses with json alone, same answers, slower
    orjson = None

from recorder.records import GENESIS, RECORD_KINDS, Checkpoint, Record, from_json, public_key_from_hex

MAX_BYTES = 8 * 1024 * 1024
MAX_RECORDS = 10_000
MAX_CHECKPOINTS = 1_000
_MAX_SEQ = 1 << 63
_KINDS = frozenset(RECORD_KINDS)
_RECORD_TAG = b"interlock-record-v1\x00"  # recorder.records' tag: _Hasher must hash exactly as record_hash does
_SEQ, _LEN = struct.Struct(">Q"), struct.Struct(">I")

SESSION_FIELDS = {
    "agent": str, "pid": int, "uid": int, "gid": int, "comm": str, "exe": str, "cmdline": str,
    "dst_addr": str, "dst_port": int, "family": str, "protocol": str, "started": float, "ended": float,
    "bytes_up": int, "bytes_down": int, "outcome": str, "detail": str, "verdict": str, "rule": str,
}
APPROVAL_FIELDS = {
    "created": float, "session": str, "agent": str, "destination": str, "protocol": str, "action": str,
    "objects": str, "summary": str, "rule": str, "reason": str, "timeout_at": float, "status": str,
    "decided_by": str, "decided_at": float, "note": str, "grant_until": float,
}


@dataclass
class Refused(Exception):
    """A refused request: HTTP `status`, `reason` for the reply and the refusals table, `extra`
    fields for the reply, and a finding (seq, problem, detail) to flag on the host's chain."""

    status: int
    reason: str
    extra: dict = field(default_factory=dict)
    finding: tuple[int, str, str] | None = None

    def reply(self) -> dict:
        return {"error": self.reason, **self.extra}


@dataclass
class Batch:
    host: str
    records: list[Record]
    checkpoints: list[Checkpoint]
    sessions: list[str | None]  # per record: the session it belongs to (derived)
    docs: list[dict | None]  # per record: the body as an object, for session/approval kinds


def parse_batch(raw: bytes, host_id: str) -> Batch:
    if len(raw) > MAX_BYTES:
        raise Refused(413, f"batch of {len(raw)} bytes: at most {MAX_BYTES} per request")
    try:
        doc = _loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(400, f"the body is not JSON: {e}") from None
    except RecursionError:
        raise Refused(400, "the body is not JSON this recorder reads: nested too deeply") from None
    if not isinstance(doc, dict):
        raise Refused(400, 'the body must be a JSON object {"host", "records", "checkpoints"}')
    claimed = doc.get("host")
    if not isinstance(claimed, str):
        raise Refused(400, '"host" (this host\'s id, a string) is missing')
    if claimed != host_id:
        raise Refused(403, f"batch for host {claimed!r} sent with the certificate of host {host_id!r}")
    items, cps = doc.get("records", []), doc.get("checkpoints", [])
    if not isinstance(items, list) or not isinstance(cps, list):
        raise Refused(400, '"records" and "checkpoints" must be lists')
    if len(items) > MAX_RECORDS:
        raise Refused(413, f"{len(items)} records in one batch: at most {MAX_RECORDS}")
    if len(cps) > MAX_CHECKPOINTS:
        raise Refused(413, f"{len(cps)} checkpoints in one batch: at most {MAX_CHECKPOINTS}")
    records: list[Record] = []
    sessions: list[str | None] = []
    docs: list[dict | None] = []
    hasher = _Hasher(host_id)
    prev: bytes | None = None
    for i, item in enumerate(items):
        r = _record(item, i)
        if r.host != host_id:
            raise Refused(403, f"records[{i}] is of host {r.host!r}: a host sends only its own records")
        if r.seq < 1 or (records and r.seq != records[-1].seq + 1):
            raise Refused(400, f"records[{i}] has seq {r.seq}: seqs start at 1 and are contiguous and in order within a batch")
        if "\x00" in r.body:
            raise Refused(400, f"record seq {r.seq}: the body contains a NUL character (not JSON text)")
        try:
            if prev is not None:
                h = hasher.hash(prev, r.seq, r.kind, r.body)
                if h.hex() != r.hash:
                    raise Refused(400, f"record seq {r.seq} does not link to seq {r.seq - 1}: its hash is not H(seq) of its "
                                       "content and the previous record's hash")
                prev = h
            else:
                r.body.encode("utf-8")
                prev = bytes.fromhex(r.hash)
        except UnicodeEncodeError:
            raise Refused(400, f"record seq {r.seq}: the body is not valid Unicode text (a lone surrogate)") from None
        except ValueError:
            raise Refused(400, f"record seq {r.seq}: hash is not 32 bytes hex") from None
        records.append(r)
        session, d = _derive(r)
        sessions.append(session)
        docs.append(d)
    checkpoints: list[Checkpoint] = []
    for i, item in enumerate(cps):
        try:
            c = from_json(item)
            if not isinstance(c, Checkpoint):
                raise ValueError("a record among the checkpoints")
            if len(bytes.fromhex(c.head)) != 32 or len(bytes.fromhex(c.sig)) != 64:
                raise ValueError("head is 32 bytes hex, sig 64 bytes hex")
        except ValueError as e:
            raise Refused(400, f"checkpoints[{i}]: {e}") from None
        if c.host != host_id:
            raise Refused(403, f"checkpoints[{i}] is of host {c.host!r}: a host sends only its own checkpoints")
        if c.seq < 1:
            raise Refused(400, f"checkpoints[{i}]: seq starts at 1")
        checkpoints.append(c)
    return Batch(host_id, records, checkpoints, sessions, docs)


def _loads(raw: bytes) -> object:
    """json.loads, by orjson (about twice as fast on a batch) when it takes the text. Anything
    orjson refuses (lone surrogates, integers past 64 bits, NaN…) goes to json.loads, so what is
    accepted, and every refusal's message, is json's."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def _record(item: object, i: int) -> Record:
    """recorder.records.from_json for the hot path: the common well-formed case without its
    per-field conversions; anything unusual goes through from_json for the same answer."""
    if type(item) is dict and item.get("type") == "record" and len(item) == 6:
        seq, kind, body, h = item.get("seq"), item.get("kind"), item.get("body"), item.get("hash")
        if type(seq) is int and 0 <= seq < _MAX_SEQ and kind in _KINDS and type(body) is str and type(h) is str \
                and len(h) == 64 and type(item.get("host")) is str:
            return Record(item["host"], seq, kind, body, h)
    try:
        r = from_json(item)
    except ValueError as e:
        raise Refused(400, f"records[{i}]: {e}") from None
    if not isinstance(r, Record):
        raise Refused(400, f"records[{i}]: a checkpoint among the records")
    return r


class _Hasher:
    """recorder.records.record_hash with the per-batch constant parts (tag, host, kinds) encoded once;
    tests/central check it equals record_hash."""

    def __init__(self, host: str):
        self.host = _lp(host)
        self.kinds = {k: _lp(k) for k in RECORD_KINDS}

    def hash(self, prev: bytes, seq: int, kind: str, body: str) -> bytes:
        b = body.encode("utf-8")
        k = self.kinds.get(kind) or _lp(kind)
        return sha256(b"".join((_RECORD_TAG, prev, self.host, _SEQ.pack(seq), k, _LEN.pack(len(b)), b))).digest()


def _lp(s: str) -> bytes:
    b = s.encode("utf-8")
    return _LEN.pack(len(b)) + b


# The journal's event body as SQLite's json_object writes it: the session id without a JSON parse.
_EVENT_HEAD = re.compile(r'\{"id":-?[0-9]+,"at":[-+.eE0-9]+,"kind":"[^"\\]*","session":(?:null|"([^"\\]*)")[,}]')
# A session row's body as the chainer writes it (json.dumps of the row, "id" first): its id alone.
_SESSION_HEAD = re.compile(r'\{"id":"([^"\\]*)"[,}]')


def _derive(r: Record) -> tuple[str | None, dict | None]:
    """The session a record belongs to, and its body as an object when it feeds a derived table.
    A session row's body is parsed later, and only when it is the latest of its session in the
    batch (`_derived`): here None stands for "not parsed yet" when the id was read by _SESSION_HEAD."""
    if r.kind == "event":
        m = _EVENT_HEAD.match(r.body)
        if m:
            return m.group(1), None
    elif r.kind != "approval":
        m = _SESSION_HEAD.match(r.body)
        if m:
            return m.group(1), None
    try:
        d = json.loads(r.body)
    except (ValueError, RecursionError):  # stored verbatim all the same; it only feeds no index
        return None, None
    if not isinstance(d, dict):
        return None, None
    s = d.get("id") if r.kind in ("session-open", "session-close") else d.get("session")
    return (_text(s) if s is not None else None), (d if r.kind != "event" else None)


def _text(v: object) -> str:
    """Text PostgreSQL accepts (derived columns are an index: a NUL or lone surrogate is replaced)."""
    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    if not s.isascii():
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s.replace("\x00", "\ufffd")


def _typed(v: object, t: type) -> object:
    tv = type(v)
    if tv is t and t is not str:  # the common case: a float column holding a float, an int an int
        return v if t is float or -(1 << 63) <= v < (1 << 63) else None
    if v is None:
        return None
    if t is str:
        return _text(v)
    if tv is bool or not isinstance(v, (int, float)):
        return None
    if t is int:
        return int(v) if -(1 << 63) <= v < (1 << 63) else None
    return float(v) if tv is float or -(1 << 1000) < v < (1 << 1000) else None  # an int past a float's range: none


@lru_cache(maxsize=4096)
def _key(hex_key: str):
    return public_key_from_hex(hex_key)


async def store(conn: psycopg.AsyncConnection, batch: Batch) -> dict:
    """Check `batch` against the stored chain and store what is new, in one transaction.
    Returns {"acked", "stored", "duplicates"}; raises Refused (nothing stored)."""
    host = batch.host
    async with conn.transaction():
        cur = await conn.execute("SELECT c.seq, c.hash, h.revoked_at, h.signing_key FROM chain_heads c"
                                 " JOIN hosts h USING (host_id) WHERE c.host_id = %s FOR UPDATE OF c", (host,))
        row = await cur.fetchone()
        if row is None:
            raise Refused(401, f"unknown host {host!r}: join it with a token first")
        head_seq, head_hash, revoked_at, signing_key = row
        if revoked_at is not None:
            raise Refused(403, f"host {host!r} was revoked at {revoked_at.isoformat()}")
        recs = batch.records
        new_from = 0  # index of the first record not stored yet
        hashes: dict[int, str] = {}
        if recs:
            first, last = recs[0].seq, recs[-1].seq
            if first > head_seq + 1:
                raise Refused(409, f"gap: the batch starts at seq {first}, the stored chain ends at {head_seq}",
                              {"expected": head_seq + 1}, (head_seq + 1, "gap", f"seqs {head_seq + 1}..{first - 1} never arrived"))
            stored: dict[int, bytes] = {}
            if first <= head_seq or first > 1:
                lo, hi = max(first - 1, 1), min(last, head_seq)
                if first - 1 == head_seq:
                    stored[head_seq] = bytes(head_hash)
                else:
                    cur = await conn.execute("SELECT seq, hash FROM records WHERE host_id = %s AND seq BETWEEN %s AND %s",
                                             (host, lo, hi))
                    stored = {s: bytes(h) for s, h in await cur.fetchall()}
            prev = GENESIS if first == 1 else stored.get(first - 1)
            if prev is None:
                raise Refused(409, f"seq {first - 1} is not in the store", {"expected": head_seq + 1})
            for i, r in enumerate(recs):
                if r.seq > head_seq:
                    break
                have = stored.get(r.seq)
                if have is not None and have.hex() != r.hash:
                    raise Refused(409, f"fork at seq {r.seq}: the stored record has another hash",
                                  {"expected": head_seq + 1, "seq": r.seq},
                                  (r.seq, "fork", f"seq {r.seq} resent with hash {r.hash}, stored {have.hex()}"))
                new_from = i + 1
            if not recs[0].links_to(prev):
                if first <= head_seq:
                    raise Refused(400, f"record seq {first}: its content does not hash to its hash")
                raise Refused(409, f"seq {first} does not link to the stored head (seq {head_seq})",
                              {"expected": head_seq + 1},
                              (first, "unlinked", f"seq {first} does not link to stored H({head_seq}) = {bytes(head_hash).hex()}"))
            for r in recs:
                hashes[r.seq] = r.hash
        new = recs[new_from:]
        top = max(head_seq, recs[-1].seq if recs else 0)
        signed = await _check_checkpoints(conn, batch, top, hashes, signing_key)
        cur = conn.cursor()
        if new:
            async with cur.copy("COPY records (host_id, seq, kind, body, hash, session) FROM STDIN") as copy:
                await copy.write(_copy_text(host, recs, batch.sessions, new_from))
            await _derived(conn, batch, new_from)
        if batch.checkpoints:
            await cur.executemany("INSERT INTO checkpoints (host_id, seq, head, at_us, sig) VALUES (%s, %s, %s, %s, %s)"
                                  " ON CONFLICT DO NOTHING",
                                  [(host, c.seq, bytes.fromhex(c.head), c.at_us, bytes.fromhex(c.sig)) for c in batch.checkpoints])
        if new or signed:
            await conn.execute("UPDATE chain_heads SET seq = %s, hash = %s, signed_seq = GREATEST(signed_seq, %s), updated_at = now()"
                               " WHERE host_id = %s",
                               (top, bytes.fromhex(new[-1].hash) if new else bytes(head_hash), signed, host))
    return {"acked": top, "stored": len(new), "duplicates": len(recs) - len(new)}


def _esc(s: str) -> str:
    """A value in PostgreSQL's COPY text format (backslash, tab, newline, carriage return escaped)."""
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        s = s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return s


def _copy_text(host: str, recs: list[Record], sessions: list[str | None], start: int) -> str:
    """COPY text for records[start:], built in one pass (psycopg's write_row per row costs more here).
    The hash goes in as bytea hex input (\\x…): it is already 64 hex digits, checked against the
    computed hash (a record whose hash is not the computed one never gets here)."""
    h = _esc(host)
    return "".join([f"{h}\t{r.seq}\t{_esc(r.kind)}\t{_esc(r.body)}\t\\\\x{r.hash}\t{_esc(sess) if sess is not None else NULL}\n"
                    for r, sess in zip(recs[start:], sessions[start:], strict=True)])


NULL = "\\N"


async def _check_checkpoints(conn, batch: Batch, top: int, hashes: dict[int, str], signing_key: str) -> int:
    """The highest seq the batch's checkpoints cover; Refused for a bad one."""
    if not batch.checkpoints:
        return 0
    missing = [c.seq for c in batch.checkpoints if c.seq not in hashes and c.seq <= top]
    if missing:
        cur = await conn.execute("SELECT seq, hash FROM records WHERE host_id = %s AND seq = ANY(%s)", (batch.host, missing))
        for s, h in await cur.fetchall():
            hashes[s] = bytes(h).hex()
    key = _key(signing_key)
    signed = 0
    for c in batch.checkpoints:
        if c.seq > top:
            raise Refused(400, f"checkpoint at seq {c.seq} is past the last record stored or sent (seq {top})")
        if not c.verify(key):
            raise Refused(409, f"checkpoint at seq {c.seq}: the signature does not verify with this host's key",
                          {"seq": c.seq}, (c.seq, "bad-checkpoint", "signature does not verify with the registered key"))
        if hashes.get(c.seq) != c.head:
            raise Refused(409, f"checkpoint at seq {c.seq}: the host signed a head that is not the stored H({c.seq})",
                          {"seq": c.seq}, (c.seq, "bad-checkpoint", f"signed head {c.head}, stored {hashes.get(c.seq)}"))
        signed = max(signed, c.seq)
    return signed


_S_COLS = ["host_id", "id", *SESSION_FIELDS, "last_seq"]
_A_COLS = ["host_id", "id", *APPROVAL_FIELDS, "last_seq"]


def _upsert(table: str, cols: list[str]) -> str:
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[2:])
    return (f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM stage_{table}"
            f" ON CONFLICT (host_id, id) DO UPDATE SET {sets} WHERE {table}.last_seq < EXCLUDED.last_seq")


async def _derived(conn, batch: Batch, start: int) -> None:
    """Upsert sessions and approvals from the new records, set-wise (latest record per id wins).
    Only the latest record of each id in the batch is parsed and converted."""
    latest: dict[tuple[bool, str], int] = {}
    for i in range(start, len(batch.records)):
        kind = batch.records[i].kind
        if kind == "event":
            continue
        d = batch.docs[i]
        if d is None and kind != "approval" and batch.sessions[i] is not None:
            latest[(False, batch.sessions[i])] = i  # id read by _SESSION_HEAD; parsed below if it wins
        elif d is not None and d.get("id") is not None:
            latest[(kind == "approval", _text(d["id"]))] = i
    sess: list[tuple] = []
    appr: list[tuple] = []
    for (is_approval, ident), i in latest.items():
        d = batch.docs[i]
        if d is None:
            try:
                d = json.loads(batch.records[i].body)
            except (ValueError, RecursionError):
                continue
            if not isinstance(d, dict):
                continue
        r = batch.records[i]
        if is_approval:
            appr.append((batch.host, ident, *(_typed(d.get(k), t) for k, t in APPROVAL_FIELDS.items()), r.seq))
        else:
            sess.append((batch.host, ident, *(_typed(d.get(k), t) for k, t in SESSION_FIELDS.items()), r.seq))
    for table, cols, rows in (("sessions", _S_COLS, sess), ("approvals", _A_COLS, appr)):
        if not rows:
            continue
        cur = conn.cursor()
        async with cur.copy(f"COPY stage_{table} ({', '.join(cols)}) FROM STDIN") as copy:
            for row in rows:
                await copy.write_row(row)
        await conn.execute(_upsert(table, cols))
