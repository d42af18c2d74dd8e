"""Held operations and the humans' answers, kept in the recorder's database.

The database is the channel between the proxy (which holds the agent) and the CLI (where a
human approves): both sides survive the other restarting, and every answer is on record with
who gave it and when."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

APPROVAL_COLUMNS = {
    "id": str, "created": float, "session": str, "agent": str, "destination": str, "protocol": str,
    "action": str, "objects": str, "summary": str, "rule": str, "reason": str, "timeout_at": float,
    "status": str, "decided_by": str, "decided_at": float, "note": str, "grant_until": float,
    "approvers": str,  # JSON {"groups": [...], "four_eyes": bool} from the rule: who may answer on the central page
}
GRANT_COLUMNS = {"id": int, "agent": str, "destination": str, "protocol": str, "action": str,
                 "objects": str, "until": float, "approval": str, "created_by": str}
PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"


class ApprovalError(Exception):
    pass


def ensure_schema(db: sqlite_utils.Database) -> None:
    db["approvals"].create(APPROVAL_COLUMNS, pk="id", if_not_exists=True)
    if "approvers" not in db["approvals"].columns_dict:  # a store from before `approvers:`
        db["approvals"].add_column("approvers", str)
    db["approvals"].create_index(["status"], if_not_exists=True)
    db["grants"].create(GRANT_COLUMNS, pk="id", if_not_exists=True)


@dataclass(frozen=True)
class HeldOperation:
    session: str
    agent: str
    destination: str
    protocol: str
    action: str
    objects: tuple[str, ...]
    summary: str
    rule: str
    reason: str
    timeout: float
    approvers: str = ""  # JSON of the rule's `approvers:` ("" when it names none)


def request(conn: sqlite3.Connection, held: HeldOperation) -> str:
    """File a pending approval; durable (synchronous=FULL) before the agent is told to wait."""
    approval_id = secrets.token_hex(4)
    now = time.time()
    conn.execute("PRAGMA synchronous=FULL")
    try:
        conn.execute(
            "INSERT INTO approvals (id, created, session, agent, destination, protocol, action, objects, summary,"
            " rule, reason, timeout_at, status, approvers) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (approval_id, now, held.session, held.agent, held.destination, held.protocol, held.action,
             json.dumps(list(held.objects)), held.summary, held.rule, held.reason, now + held.timeout, PENDING,
             held.approvers or None))
    finally:
        conn.execute("PRAGMA synchronous=NORMAL")
    return approval_id


def statuses(conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[str, str | None, str]]:
    """id → (status, who decided, the note they gave: a denial's reason)."""
    if not ids:
        return {}
    rows = conn.execute(f"SELECT id, status, decided_by, note FROM approvals WHERE id IN ({','.join('?' * len(ids))})",
                        ids)
    return {r[0]: (r[1], r[2], r[3] or "") for r in rows.fetchall()}


class Outcome(str):
    """How a hold ended ('approved', 'denied', 'expired', …), compared as the plain string, with
    the approver's note (a denial's `--reason`) for the agent's refusal and the record."""

    note: str = ""

    def __new__(cls, outcome: str, note: str = "") -> Outcome:
        o = super().__new__(cls, outcome)
        o.note = note
        return o

    def explained(self, rule: str) -> str:
        """The refusal's reason as the agent reads it."""
        return f"approval {self}" + (f" by a human: {self.note}" if self.note else "") + f" (rule {rule})"


def expire(conn: sqlite3.Connection, approval_id: str) -> bool:
    cur = conn.execute("UPDATE approvals SET status=?, decided_at=?, decided_by=? WHERE id=? AND status=?",
                       (EXPIRED, time.time(), "timeout", approval_id, PENDING))
    return cur.rowcount == 1


def granted(conn: sqlite3.Connection, agent: str, destination: str, protocol: str, action: str,
            objects: tuple[str, ...]) -> str | None:
    """The approval id of an unexpired grant for exactly this agent, target and operation."""
    row = conn.execute(
        "SELECT approval FROM grants WHERE agent=? AND destination=? AND protocol=? AND action=? AND objects=? AND until>?",
        (agent, destination, protocol, action, json.dumps(list(objects)), time.time())).fetchone()
    return row[0] if row else None


def decide(db_path: Path, approval_id: str, approve: bool, by: str, for_seconds: float | None = None,
           note: str = "") -> dict:
    """Record a human's answer. A grant (`for_seconds`) also covers later identical operations."""
    if not db_path.exists():
        raise ApprovalError(f"no approval {approval_id}: there are no recordings at {db_path} (is --state-dir right?)")
    conn = sqlite3.connect(str(db_path), timeout=10, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        db = sqlite_utils.Database(conn)
        ensure_schema(db)
        row = conn.execute("SELECT status, agent, destination, protocol, action, objects FROM approvals WHERE id=?",
                           (approval_id,)).fetchone()
        if row is None:
            raise ApprovalError(f"no approval {approval_id}; list them with: interlock approvals")
        if row[0] != PENDING:
            raise ApprovalError(f"approval {approval_id} is already {row[0]}")
        now = time.time()
        until = now + for_seconds if (approve and for_seconds) else None
        conn.execute("BEGIN IMMEDIATE")
        cur = conn.execute(
            "UPDATE approvals SET status=?, decided_by=?, decided_at=?, note=?, grant_until=? WHERE id=? AND status=?",
            (APPROVED if approve else DENIED, by, now, note, until, approval_id, PENDING))
        if cur.rowcount != 1:
            conn.execute("ROLLBACK")
            raise ApprovalError(f"approval {approval_id} was decided meanwhile")
        if until:
            conn.execute("INSERT INTO grants (agent, destination, protocol, action, objects, until, approval, created_by)"
                         " VALUES (?,?,?,?,?,?,?,?)", (*row[1:], until, approval_id, by))
        conn.execute("COMMIT")
        return {"id": approval_id, "status": APPROVED if approve else DENIED, "by": by, "grant_until": until}
    finally:
        conn.close()


def listing(db_path: Path, pending_only: bool = True) -> list[dict]:
    if not db_path.exists():
        return []
    db = sqlite_utils.Database(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10))
    if "approvals" not in db.table_names():
        return []
    where = "status = 'pending'" if pending_only else None
    rows = list(db["approvals"].rows_where(where, order_by="created"))
    for r in rows:
        r["objects"] = json.loads(r["objects"] or "[]")
    return rows
