"""The local recorder: SQLite through sqlite-utils, one row per connection plus an event log.

The proxy writes through a group commit: writes queued during one turn of its event loop are
committed in one transaction at the end of the turn, with a future per write that needs it. The proxy
awaits that future before it acts on a connection, so a session row and its decision are on
disk before the first byte goes upstream, and refusals and holds are fsynced (synchronous=FULL)
before they take effect; many connections share one commit under load."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import sqlite_utils

SESSION_COLUMNS = {
    "id": str, "agent": str, "pid": int, "tgid": int, "uid": int, "gid": int, "comm": str,
    "exe": str, "cmdline": str, "cgroup_id": int, "dst_addr": str, "dst_port": int,
    "family": str, "protocol": str, "started": float, "ended": float, "bytes_up": int,
    "bytes_down": int, "outcome": str, "detail": str, "verdict": str, "rule": str,
}
EVENT_COLUMNS = {"id": int, "at": float, "kind": str, "session": str, "data": str}

# Events an operator's log shows as well (logging, to stderr/journald; JSON with --log-format json),
# with their level. Per-operation events (decisions, statements, requests, DNS) stay in the
# recorder only: they are the audit trail, and logging them would tax the data path.
_events_log = logging.getLogger("interlock.events")
LOGGED_EVENTS = {
    "daemon-start": logging.INFO, "daemon-stop": logging.INFO, "proxy-start": logging.INFO,
    "proxy-exit": logging.WARNING, "policy-loaded": logging.INFO, "policy-rejected": logging.ERROR,
    "enrolled": logging.INFO, "unenrolled": logging.INFO, "enroll-refused": logging.WARNING,
    "control-refused": logging.WARNING,
    "lockdown": logging.CRITICAL, "tamper": logging.CRITICAL, "rearm": logging.WARNING,
    "inbound-refused": logging.WARNING,
    "watch-error": logging.ERROR, "recorder-failed": logging.CRITICAL, "recorder-recovered": logging.WARNING,
    "approval-requested": logging.INFO, "approval-approved": logging.INFO, "approval-denied": logging.INFO,
    "approval-expired": logging.INFO, "approval-granted": logging.INFO, "hold-canceled": logging.INFO,
    "ptrace-guard": logging.INFO, "ptrace-refused": logging.WARNING, "socket-refused": logging.WARNING,
    "selector-outside-scope": logging.WARNING,
}


def new_session_id() -> str:
    """Time-ordered ids sort sessions by start without a second column."""
    return f"{time.time_ns() // 1000:x}{os.urandom(4).hex()}"


@dataclass
class SessionRecord:
    id: str
    agent: str
    pid: int
    tgid: int
    uid: int
    gid: int
    comm: str
    exe: str
    cmdline: str
    cgroup_id: int
    dst_addr: str
    dst_port: int
    family: str
    protocol: str = "unknown"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    outcome: str = "open"
    detail: str = ""
    verdict: str = ""  # the connection's own decision, and the rule that made it
    rule: str = ""

    def row(self) -> tuple:
        """Column values in SESSION_COLUMNS order (dataclasses.astuple deep-copies: too slow here)."""
        return (self.id, self.agent, self.pid, self.tgid, self.uid, self.gid, self.comm, self.exe, self.cmdline,
                self.cgroup_id, self.dst_addr, self.dst_port, self.family, self.protocol, self.started, self.ended,
                self.bytes_up, self.bytes_down, self.outcome, self.detail, self.verdict, self.rule)


class GroupWriter:
    """Writes queued during one turn of the event loop, committed together at its end.

    On the loop's own thread: no lock, no thread wake-up, no GIL hand-off per connection; under
    load many connections share one commit."""

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop):
        self.conn, self.loop = conn, loop
        self.batch: list[tuple] = []
        self.scheduled = False
        self.on_commit: Callable[[float, int], None] | None = None  # (seconds, rows): for metrics

    def submit(self, sql: str, params: tuple, durable: bool = False, wait: bool = False) -> asyncio.Future | None:
        fut = self.loop.create_future() if (wait or durable) else None
        self.batch.append((sql, params, durable, fut))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self.scheduled = False
        batch, self.batch = self.batch, []
        if not batch:
            return
        conn = self.conn
        durable = any(b[2] for b in batch)
        error: Exception | None = None
        started = time.perf_counter()
        try:
            if durable:
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN")
            for sql, params, _, _ in batch:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            error = e
            _events_log.error("recorder write failed: %s", e, extra={"event": "recorder-write-failed"})
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        finally:
            if durable:
                conn.execute("PRAGMA synchronous=NORMAL")
        if self.on_commit is not None and error is None:
            self.on_commit(time.perf_counter() - started, len(batch))
        for _, _, _, fut in batch:
            if fut is not None and not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    def close(self) -> None:
        self.flush()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


assert tuple(f.name for f in fields(SessionRecord)) == tuple(SESSION_COLUMNS), "row() follows SESSION_COLUMNS"
_OPEN_SQL = "INSERT INTO sessions ({}) VALUES ({})".format(",".join(SESSION_COLUMNS), ",".join("?" * len(SESSION_COLUMNS)))
_CLOSE_SQL = ("UPDATE sessions SET ended=?, bytes_up=?, bytes_down=?, outcome=?, detail=?, protocol=?, verdict=?, rule=?"
              " WHERE id=?")
_EVENT_SQL = "INSERT INTO events (at, kind, session, data) VALUES (?,?,?,?)"


class Recorder:
    """The one interface the proxy and the daemon report through.

    With a loop (the proxy) writes go through the group commit and durable ones return a
    future; without (daemon, CLI) they are written before the call returns."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path)
        os.chmod(path, 0o600)
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        if "sessions" not in self.db.table_names():
            self.db["sessions"].create(SESSION_COLUMNS, pk="id", if_not_exists=True)
            self.db["sessions"].create_index(["agent"], if_not_exists=True)
        if "events" not in self.db.table_names():
            self.db["events"].create(EVENT_COLUMNS, pk="id", if_not_exists=True)
            self.db["events"].create_index(["session"], if_not_exists=True)
        self.writer = GroupWriter(conn, loop) if loop is not None else None
        self.on_session_close: Callable[[SessionRecord], None] | None = None  # for metrics

    def _write(self, sql: str, params: tuple, durable: bool = False, wait: bool = False) -> asyncio.Future | None:
        if self.writer is not None:
            return self.writer.submit(sql, params, durable, wait)
        if durable:
            self.conn.execute("PRAGMA synchronous=FULL")
        try:
            self.conn.execute(sql, params)
        finally:
            if durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")
        return None

    def session_open(self, rec: SessionRecord) -> None:
        self._write(_OPEN_SQL, rec.row())

    def session_close(self, rec: SessionRecord) -> None:
        if self.on_session_close is not None:
            self.on_session_close(rec)
        self._write(_CLOSE_SQL, (rec.ended or time.time(), rec.bytes_up, rec.bytes_down, rec.outcome, rec.detail,
                                 rec.protocol, rec.verdict, rec.rule, rec.id))

    def event(self, kind: str, data: dict, session: str | None = None, durable: bool = False,
              wait: bool = False) -> asyncio.Future | None:
        level = LOGGED_EVENTS.get(kind)
        if level is not None:
            _events_log.log(level, kind, extra={"event": kind, "session": session, "data": data})
        return self._write(_EVENT_SQL, (time.time(), kind, session, json.dumps(data, sort_keys=True)), durable, wait)

    def decision(self, session: str, op, decision) -> asyncio.Future | None:
        """A decision and its reason. Refusals and holds are flushed to disk (synchronous=FULL)
        before they take effect, so no refusal is ever unrecorded; the future says when."""
        data = {"protocol": op.protocol, "action": op.action, "objects": list(op.objects),
                "risks": list(op.risks), "summary": op.summary, "verdict": decision.verdict.value,
                "rule": decision.rule, "reason": decision.reason}
        return self.event("decision", data, session, durable=decision.verdict.value in ("deny", "approve"), wait=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.conn.close()


def read_sessions(path: Path, agent: str | None = None, limit: int = 1000) -> list[dict]:
    if not path.exists():
        return []
    db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10))
    if "sessions" not in db.table_names():
        return []
    where, args = ("agent = ?", [agent]) if agent else (None, [])
    rows = db["sessions"].rows_where(where, args, order_by="started desc", limit=limit)
    return list(reversed(list(rows)))


def read_events(path: Path, kind: str | None = None, limit: int = 1000) -> list[dict]:
    if not path.exists():
        return []
    db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10))
    if "events" not in db.table_names():
        return []
    where, args = ("kind = ?", [kind]) if kind else (None, [])
    rows = list(db["events"].rows_where(where, args, order_by="id desc", limit=limit))
    for r in rows:
        r["data"] = json.loads(r["data"])
    return list(reversed(rows))


def prune(path: Path, before: float) -> dict[str, int]:
    """Delete what ended before `before` (epoch seconds): closed sessions with their events,
    events of no session, and decided approvals; open sessions and pending holds stay.
    Returns rows deleted per table. The space is given back to the file system (VACUUM)."""
    if not path.exists():
        return {"sessions": 0, "events": 0, "approvals": 0}
    conn = _connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        done = {"sessions": 0, "events": 0, "approvals": 0}
        conn.execute("BEGIN IMMEDIATE")
        if "sessions" in tables:
            old = "SELECT id FROM sessions WHERE ended IS NOT NULL AND ended < ?"
            if "events" in tables:
                done["events"] += conn.execute(f"DELETE FROM events WHERE session IN ({old})", (before,)).rowcount
            done["sessions"] = conn.execute("DELETE FROM sessions WHERE ended IS NOT NULL AND ended < ?", (before,)).rowcount
        if "events" in tables:
            done["events"] += conn.execute("DELETE FROM events WHERE session IS NULL AND at < ?", (before,)).rowcount
        if "approvals" in tables:
            done["approvals"] = conn.execute("DELETE FROM approvals WHERE status != 'pending' AND created < ?",
                                             (before,)).rowcount
        conn.execute("COMMIT")
        conn.execute("VACUUM")
        return done
    finally:
        conn.close()
