"""The local recorder: SQLite through sqlite-utils, one row per connection plus an event log.

Rows are written synchronously on the proxy's loop (WAL, no fsync per commit): a session row
exists before the first byte goes upstream, so a crash loses no session."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlite_utils

SESSION_COLUMNS = {
    "id": str, "agent": str, "pid": int, "tgid": int, "uid": int, "gid": int, "comm": str,
    "exe": str, "cmdline": str, "cgroup_id": int, "dst_addr": str, "dst_port": int,
    "family": str, "protocol": str, "started": float, "ended": float, "bytes_up": int,
    "bytes_down": int, "outcome": str, "detail": str,
}
EVENT_COLUMNS = {"id": int, "at": float, "kind": str, "session": str, "data": str}


def new_session_id() -> str:
    """Time-ordered ids sort sessions by start without a second column."""
    return f"{time.time_ns() // 1000:x}{uuid.uuid4().hex[:8]}"


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


class Recorder:
    """One writer per process; readers (the CLI) open their own."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        os.chmod(path, 0o600)
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        if "sessions" not in self.db.table_names():
            self.db["sessions"].create(SESSION_COLUMNS, pk="id", if_not_exists=True)
            self.db["sessions"].create_index(["agent"], if_not_exists=True)
        if "events" not in self.db.table_names():
            self.db["events"].create(EVENT_COLUMNS, pk="id", if_not_exists=True)
            self.db["events"].create_index(["session"], if_not_exists=True)
        self.open_sql = "INSERT INTO sessions ({}) VALUES ({})".format(
            ",".join(SESSION_COLUMNS), ",".join("?" * len(SESSION_COLUMNS)))

    def session_open(self, rec: SessionRecord) -> None:
        self.conn.execute(self.open_sql, tuple(asdict(rec).values()))

    def session_close(self, rec: SessionRecord) -> None:
        self.conn.execute(
            "UPDATE sessions SET ended=?, bytes_up=?, bytes_down=?, outcome=?, detail=?, protocol=?"
            " WHERE id=?",
            (rec.ended or time.time(), rec.bytes_up, rec.bytes_down, rec.outcome, rec.detail,
             rec.protocol, rec.id))

    def event(self, kind: str, data: dict, session: str | None = None) -> None:
        self.conn.execute("INSERT INTO events (at, kind, session, data) VALUES (?,?,?,?)",
                           (time.time(), kind, session, json.dumps(data, sort_keys=True)))

    def decision(self, session: str, op, decision) -> None:
        """A decision and its reason. Refusals and holds are flushed to disk (synchronous=FULL)
        before they take effect, so no refusal is ever unrecorded."""
        data = {"protocol": op.protocol, "action": op.action, "objects": list(op.objects),
                "risks": list(op.risks), "summary": op.summary, "verdict": decision.verdict.value,
                "rule": decision.rule, "reason": decision.reason}
        durable = decision.verdict.value in ("deny", "approve")
        if durable:
            self.conn.execute("PRAGMA synchronous=FULL")
        try:
            self.event("decision", data, session)
        finally:
            if durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
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
