"""The journal: this host's records for the central recorder, kept in the local SQLite spool.

SQLite triggers append a row to `journal` inside the writer's own transaction whenever a session
opens, leaves 'open', an event is written, or an approval is filed or answered: the proxy, the
daemon and the CLI all write the same file, and none of them runs Python for it (the cost is one
extra row in a commit they make anyway). Kinds and bodies follow docs/RECORDER.md:

    session-open   INSERT sessions                       every session column
    session-close  UPDATE sessions, outcome leaves open  every session column (close_out's bulk update too)
    event          INSERT events                         {"id","at","kind","session","data": <the event's JSON>}
    approval       INSERT/UPDATE approvals               every approval column

Byte-count flushes (outcome stays 'open') are not journaled. The data path builds no JSON: a
session row's trigger copies its columns into `journal_sessions`, an event's row points at the
event (events are never updated); the chainer renders those bodies, off the data path, before it
hashes them (an event pruned before that is rendered in SQL as it is deleted). Approval bodies
(rare) are json_object with floats at 17 significant digits. Every body parses back to the values
stored.

The `Chainer` (a daemon thread) numbers new rows densely (seq 1, 2, …), stores H(seq)
(recorder.records) and signs a checkpoint of the head with the host's Ed25519 key at most every
CHECKPOINT_INTERVAL while the head moves, all in one SQLite transaction: a process killed
mid-chain leaves either the whole round or none of it, so the chain never forks or skips. The
commit is not fsynced under the write lock (the proxy's commits would wait for the disk); the
chainer fsyncs the WAL and the database file right after, and only seqs up to `durable_seq` are
shipped, so a power loss cannot re-chain a shipped seq differently. `journal_state` (one row)
holds the head, the last signature and what the server acked."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recorder import records

CHAIN_INTERVAL = 0.1  # seconds between looks for new journal rows (records reach the shipper within this)
CHECKPOINT_INTERVAL = 1.0  # at most one signature per this many seconds while the head moves
CHAIN_BATCH = 1000  # rows numbered per transaction (the write lock is held only for the UPDATEs)
_FLOAT_TYPES = ("REAL", "FLOAT", "DOUBLE")

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,  -- commit order, dense (prune keeps the newest row, so ids are never reused)
    at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),  -- epoch seconds, for the lag
    kind TEXT NOT NULL,
    body TEXT,    -- NULL until the chainer renders it (session rows: journal_sessions; events: `ref`)
    ref INTEGER,  -- an event row's events.id
    seq INTEGER,  -- NULL until chained
    hash TEXT     -- H(seq), hex
);
CREATE UNIQUE INDEX IF NOT EXISTS journal_seq ON journal(seq) WHERE seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_checkpoints (
    seq INTEGER PRIMARY KEY, head TEXT NOT NULL, at_us INTEGER NOT NULL, sig TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_state (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    host TEXT NOT NULL,
    head_seq INTEGER NOT NULL DEFAULT 0, head_hash TEXT NOT NULL, head_id INTEGER NOT NULL DEFAULT 0,
    signed_seq INTEGER NOT NULL DEFAULT 0, signed_at REAL NOT NULL DEFAULT 0,
    acked_seq INTEGER NOT NULL DEFAULT 0, acked_id INTEGER NOT NULL DEFAULT 0, acked_at REAL,
    cp_shipped INTEGER NOT NULL DEFAULT 0
);
"""
TRIGGERS = ("journal_session_open", "journal_session_close", "journal_event", "journal_event_kept",
            "journal_approval_new", "journal_approval_change")


class JournalError(RuntimeError):
    """The journal cannot be used as configured (message says what to do)."""


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(r[1], (r[2] or "").upper()) for r in conn.execute(f"PRAGMA table_info({table})")]


_FINITE = "abs({0}) <= 1.7976931348623157e308"  # json() would refuse printf's Inf: the insert must never fail


def _value(name: str, typ: str) -> str:
    col = f'NEW."{name}"'
    if any(t in typ for t in _FLOAT_TYPES):  # SQLite's JSON keeps 15 digits: not enough to round-trip
        return (f"CASE WHEN typeof({col}) = 'real' AND {_FINITE.format(col)} THEN json(printf('%!.17g', {col})) "
                f"ELSE {col} END")
    return col


def _float_text(col: str) -> str:
    """A REAL column as JSON text (17 digits), for bodies built by concatenation; never NULL."""
    return (f"CASE WHEN typeof({col}) = 'real' AND {_FINITE.format(col)} THEN printf('%!.17g', {col}) "
            f"WHEN typeof({col}) = 'integer' THEN {col} ELSE json_quote({col}) END")


def _object(cols: list[tuple[str, str]]) -> str:
    return "json_object(" + ", ".join(f"'{n}', {_value(n, t)}" for n, t in cols) + ")"


def install(conn: sqlite3.Connection, host: str) -> None:
    """Create the journal tables and (re)create the triggers from the tables' current columns.

    Idempotent; raises JournalError when the journal already chains for another host id (the
    host re-joined: its old chain cannot continue under a new id)."""
    import sqlite_utils

    from recorder import approvals, store  # the tables the triggers watch must exist, as the recorder makes them

    db = sqlite_utils.Database(conn)
    db["sessions"].create(store.SESSION_COLUMNS, pk="id", if_not_exists=True)
    db["events"].create(store.EVENT_COLUMNS, pk="id", if_not_exists=True)
    approvals.ensure_schema(db)
    conn.executescript(SCHEMA)
    row = conn.execute("SELECT host, head_seq FROM journal_state").fetchone()
    if row is None:
        conn.execute("INSERT INTO journal_state (one, host, head_hash) VALUES (1, ?, ?)", (host, records.GENESIS.hex()))
    elif row[0] != host:
        if row[1]:
            raise JournalError(f"this host's journal chains records as host {row[0]} ({row[1]} so far), but it has "
                               f"joined as {host}: one host id per journal")
        conn.execute("UPDATE journal_state SET host = ?", (host,))
    sessions, events, approvals_ = (_columns(conn, t) for t in ("sessions", "events", "approvals"))
    _snapshot_table(conn, sessions)
    snap_cols = ", ".join(f'"{n}"' for n, _ in sessions)
    snap_vals = ", ".join(f'NEW."{n}"' for n, _ in sessions)

    def session_row(kind: str) -> str:
        # A copy of the row's columns, no JSON: the chainer renders the body off the data path.
        return (f"INSERT INTO journal (kind, body) VALUES ('{kind}', NULL); "
                f"INSERT INTO journal_sessions (jid, {snap_cols}) VALUES (last_insert_rowid(), {snap_vals});")

    # Events are the per-operation path (statements, requests): the row only points at the event
    # (events are never updated) and the chainer renders the body. An event deleted before that
    # (prune) gets its body rendered here first, by concatenation around its own JSON text.
    kept_body = ("""'{"id":' || OLD.id || ',"at":' || """ + _float_text("OLD.at") +
                 """ || ',"kind":' || json_quote(OLD.kind) || ',"session":' || json_quote(OLD.session) || """
                 """',"data":' || CASE WHEN json_valid(OLD.data) THEN OLD.data ELSE json_quote(OLD.data) END || '}'""")
    statements = [
        f"CREATE TRIGGER journal_session_open AFTER INSERT ON sessions BEGIN {session_row('session-open')} END",
        f"CREATE TRIGGER journal_session_close AFTER UPDATE OF outcome ON sessions "
        f"WHEN OLD.outcome = 'open' AND NEW.outcome IS NOT 'open' BEGIN {session_row('session-close')} END",
        "CREATE TRIGGER journal_event AFTER INSERT ON events BEGIN "
        "INSERT INTO journal (kind, body, ref) VALUES ('event', NULL, NEW.id); END",
        f"CREATE TRIGGER journal_event_kept BEFORE DELETE ON events BEGIN "
        f"UPDATE journal SET body = {kept_body} WHERE id > (SELECT head_id FROM journal_state) "
        f"AND ref = OLD.id AND body IS NULL; END",
        f"CREATE TRIGGER journal_approval_new AFTER INSERT ON approvals BEGIN "
        f"INSERT INTO journal (kind, body) VALUES ('approval', {_object(approvals_)}); END",
        f"CREATE TRIGGER journal_approval_change AFTER UPDATE ON approvals BEGIN "
        f"INSERT INTO journal (kind, body) VALUES ('approval', {_object(approvals_)}); END",
    ]
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name in TRIGGERS:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        for sql in statements:
            conn.execute(sql)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _snapshot_table(conn: sqlite3.Connection, sessions: list[tuple[str, str]]) -> None:
    """journal_sessions: the session columns (same declared types, so the same values) keyed by
    the journal row; columns the sessions table gained since are added."""
    have = {n for n, _ in _columns(conn, "journal_sessions")}
    if not have:
        cols = ", ".join(f'"{n}" {t}' for n, t in sessions)
        conn.execute(f"CREATE TABLE journal_sessions (jid INTEGER PRIMARY KEY, {cols})")
        return
    for n, t in sessions:
        if n not in have:
            conn.execute(f'ALTER TABLE journal_sessions ADD COLUMN "{n}" {t}')


def _in(ids: list[int]) -> str:
    return f"({','.join('?' * len(ids))})"


def render(conn: sqlite3.Connection, rows: list[tuple[int, str, int | None]]) -> dict[int, str]:
    """Bodies for journal rows the triggers left unrendered, (id, kind, ref) → {journal id: body}.

    Session rows: every column from the snapshot, in the table's order. Events:
    {"id","at","kind","session","data"} with the event's JSON text as written (a string when it
    is not JSON). Floats as Python writes them: they parse back to the same value."""
    out: dict[int, str] = {}
    snaps = [r[0] for r in rows if r[1] != "event"]
    if snaps:
        cur = conn.execute(f"SELECT * FROM journal_sessions WHERE jid IN {_in(snaps)}", snaps)
        names = [d[0] for d in cur.description][1:]
        for row in cur.fetchall():
            out[row[0]] = json.dumps(dict(zip(names, row[1:], strict=True)), separators=(",", ":"), ensure_ascii=False)
    events = {r[2]: r[0] for r in rows if r[1] == "event" and r[2] is not None}
    if events:
        refs = list(events)
        for eid, at, kind, session, data in conn.execute(
                f"SELECT id, at, kind, session, data FROM events WHERE id IN {_in(refs)}", refs):
            try:
                json.loads(data)
                text = data
            except (TypeError, ValueError):
                text = json.dumps(data, ensure_ascii=False)
            out[events[eid]] = (f'{{"id":{eid},"at":{json.dumps(at)},"kind":{json.dumps(kind, ensure_ascii=False)},'
                                f'"session":{json.dumps(session, ensure_ascii=False)},"data":{text}}}')
    return out


def uninstall(conn: sqlite3.Connection) -> None:
    """Stop journaling (shipping is no longer configured); rows already journaled stay."""
    for name in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")


def installed(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'journal_state'").fetchone() is not None


# ---- the spool as the proxy, status and prune read it ----------------------------------------

@dataclass(frozen=True)
class Spool:
    """What waits to be shipped: `unshipped` journal rows (chained or not) and the age in
    seconds of the oldest (`lag`, 0 when none); the chain head and the server's ack."""

    host: str
    head_seq: int
    acked_seq: int
    acked_at: float | None
    unshipped: int
    lag: float

    def as_dict(self) -> dict:
        return {"host_id": self.host, "head_seq": self.head_seq, "acked_seq": self.acked_seq,
                "acked_at": self.acked_at, "unshipped": self.unshipped, "lag_seconds": round(self.lag, 3)}


def spool(conn: sqlite3.Connection, now: float | None = None) -> Spool | None:
    """The spool's depth in two index lookups (None without a journal). Cheap enough for every second."""
    try:
        st = conn.execute("SELECT host, head_seq, acked_seq, acked_id, acked_at FROM journal_state").fetchone()
    except sqlite3.OperationalError:
        return None
    if st is None:
        return None
    top = conn.execute("SELECT max(id) FROM journal").fetchone()[0] or 0
    oldest = conn.execute("SELECT at FROM journal WHERE id > ? ORDER BY id LIMIT 1", (st[3],)).fetchone()
    lag = max(0.0, (now or time.time()) - oldest[0]) if oldest else 0.0
    return Spool(st[0], st[1], st[2], st[4], max(0, top - st[3]), lag)


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Delete journal rows the server acknowledged and written before `before` (epoch seconds),
    with their checkpoints. Unshipped rows are never deleted. Inside the caller's transaction."""
    if not installed(conn):
        return 0
    acked = conn.execute("SELECT acked_seq, cp_shipped FROM journal_state").fetchone()
    if acked is None:
        return 0
    n = conn.execute("DELETE FROM journal WHERE seq IS NOT NULL AND seq <= ? AND at < ? AND id < (SELECT max(id) FROM journal)",
                     (acked[0], before)).rowcount  # the newest row stays: a new row's id is max(id) + 1
    conn.execute("DELETE FROM journal_checkpoints WHERE seq <= ? AND seq <= ? AND at_us < ?",
                 (acked[0], acked[1], int(before * 1e6)))
    return n


# ---- the chainer ----------------------------------------------------------------------------

def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


class Chainer:
    """Numbers journal rows, hashes them into the host's chain and signs checkpoints.

    One per journal (the daemon's). `run_once()` does one round; `start()` runs rounds every
    CHAIN_INTERVAL on a thread and calls `on_chained(head_seq)` after a round that moved the head."""

    def __init__(self, path: Path, host: str, key: Ed25519PrivateKey,
                 on_chained: Callable[[int], None] | None = None):
        self.conn = connect(path)
        self.path = path
        st = self.conn.execute("SELECT head_seq FROM journal_state").fetchone()
        self.sync()
        self.durable_seq = st[0] if st else 0  # chained and on disk: what the shipper may send
        self.host, self.key, self.on_chained = host, key, on_chained
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> None:
        """fsync the WAL and the database file (outside any lock): every commit so far is on disk.
        A frame is either still in the WAL, or a completed checkpoint put it in the database file."""
        for name in (f"{self.path}-wal", str(self.path)):
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def run_once(self, now: float | None = None) -> int:
        """Chain what is new and sign when due; the number of rows chained."""
        c = self.conn
        st = c.execute("SELECT host, head_seq, head_hash, head_id, signed_seq, signed_at FROM journal_state").fetchone()
        if st is None:
            return 0
        host, head_seq, head_hash, head_id, signed_seq, signed_at = st
        if host != self.host:
            raise records_error(host, self.host)
        rows = c.execute("SELECT id, kind, body, ref FROM journal WHERE id > ? ORDER BY id LIMIT ?",
                         (head_id, CHAIN_BATCH)).fetchall()
        rendered = render(c, [(i, k, ref) for i, k, b, ref in rows if b is None])
        rows = [(i, k, b if b is not None else rendered.get(i, "{}")) for i, k, b, _ in rows]  # lost source: {}
        chained = list(records.chain(host, head_seq + 1, bytes.fromhex(head_hash), ((r[1], r[2]) for r in rows)))
        now = time.time() if now is None else now
        new_seq = chained[-1].seq if chained else head_seq
        new_hash = chained[-1].hash if chained else head_hash
        sign = new_seq > signed_seq and now - signed_at >= CHECKPOINT_INTERVAL
        if not chained and not sign:
            return 0
        c.execute("BEGIN IMMEDIATE")
        try:
            if c.execute("SELECT head_id FROM journal_state").fetchone()[0] != head_id:
                c.execute("ROLLBACK")  # another chainer got here first: start over from its head
                return 0
            c.executemany("UPDATE journal SET seq = ?, hash = ?, body = ? WHERE id = ?",
                          [(r.seq, r.hash, r.body, row[0]) for r, row in zip(chained, rows, strict=True)])
            if rendered:
                c.execute(f"DELETE FROM journal_sessions WHERE jid IN {_in(list(rendered))}", list(rendered))
            state = {"head_seq": new_seq, "head_hash": new_hash, "head_id": rows[-1][0] if rows else head_id}
            if sign:
                at_us = int(now * 1e6)
                cp = records.sign_checkpoint(self.key, host, new_seq, bytes.fromhex(new_hash), at_us)
                c.execute("INSERT OR REPLACE INTO journal_checkpoints (seq, head, at_us, sig) VALUES (?,?,?,?)",
                          (cp.seq, cp.head, cp.at_us, cp.sig))
                state.update(signed_seq=new_seq, signed_at=now)
            c.execute("UPDATE journal_state SET " + ", ".join(f"{k} = ?" for k in state), tuple(state.values()))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        self.sync()
        self.durable_seq = new_seq
        try:  # checkpoints here, off the data path: the WAL rarely grows to the proxy's auto-checkpoint
            c.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass
        if chained and self.on_chained is not None:
            self.on_chained(new_seq)
        return len(chained)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.run_once()
                self.error = None
            except (sqlite3.Error, JournalError) as e:
                self.error, n = f"chainer: {e}", 0
            if n < CHAIN_BATCH:
                self._stop.wait(CHAIN_INTERVAL)

    def start(self) -> Chainer:
        self._thread = threading.Thread(target=self._loop, name="chainer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.run_once()  # what was written until now is chained and signed before we go
            self.run_once(now=time.time() + CHECKPOINT_INTERVAL)
        except (sqlite3.Error, JournalError):
            pass
        self.conn.close()


def records_error(stored: str, mine: str) -> JournalError:
    return JournalError(f"the journal chains as host {stored}, but this host's id is {mine}")
