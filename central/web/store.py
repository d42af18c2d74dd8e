"""What the approval page reads and writes in the central PostgreSQL.

Reads come from the hosts' records as shipped (the `records` table, bodies verbatim): an approval's
current state is its host's latest `approval` record (found through ingest's `approvals` index), a
session's its latest `session-open` / `session-close` record, a replay the session's `event` and
`approval` records in order. So the page shows what the hosts put on record, nothing the web layer
made up (the approval body carries the rule's `approvers`, which the index does not).

Writes: a human's answer is a row of `approval_decisions` (migration 0101), one per (host,
approval), inserted only while the host's latest record still says pending; the host fetches it
over its outbound channel (central/stream.py), applies it to its own store, and the approval record
it ships back then names the approver.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

DECISIONS_CHANNEL = "interlock_decisions"  # NOTIFY payload: the host id a decision is waiting for


class DecisionError(Exception):
    """The answer cannot be taken; str(e) is shown to the approver (HTTP 409/403)."""


@dataclass(frozen=True)
class Approver:
    """Who signed in, as the provider asserted it in a validated ID token."""

    sub: str
    issuer: str
    email: str = ""
    name: str = ""
    groups: tuple[str, ...] = ()

    def label(self) -> str:
        """How the host's record names the approver: e-mail (or name) and subject, issuer."""
        who = self.email or self.name or self.sub
        return f"{who} (oidc sub {self.sub} at {self.issuer})"


def _approval(row: dict) -> dict:
    a = json.loads(row["body"])
    a["host"] = row["host"]
    a["host_name"] = row.get("host_name") or row["host"]
    a["seq"] = row["seq"]
    for k in ("objects", "approvers"):
        if isinstance(a.get(k), str):
            try:
                a[k] = json.loads(a[k])
            except ValueError:
                pass
    objects = a.get("objects")  # the page lists them: a host's number or object here is shown as one item
    if objects is not None and not isinstance(objects, list):
        a["objects"] = [objects]
    a["time_left"] = _time_left(a.get("timeout_at"))
    a["decision"] = row.get("d_approve")
    a["decision_by"] = row.get("d_email") or row.get("d_sub")
    return a


def _time_left(timeout_at: object) -> float:
    """Seconds until `timeout_at` (what the host wrote: anything but a finite number counts as 0, so one
    host's odd record cannot break the page every approver shares)."""
    if type(timeout_at) not in (int, float) or not math.isfinite(timeout_at):
        return 0.0
    return min(max(0.0, timeout_at - time.time()), 366 * 86400.0)


_APPROVALS = """
SELECT r.host_id AS host, r.seq, r.body, h.name AS host_name,
       d.approve AS d_approve, d.approver_email AS d_email, d.approver_sub AS d_sub
FROM approvals a JOIN records r ON r.host_id = a.host_id AND r.seq = a.last_seq
LEFT JOIN hosts h ON h.host_id = a.host_id
LEFT JOIN approval_decisions d ON d.host = a.host_id AND d.approval = a.id
WHERE {where} ORDER BY a.created LIMIT 1000"""


class WebStore:
    def __init__(self, pool: AsyncConnectionPool):
        self.pool = pool

    async def approvals(self, status: str | None = "pending") -> list[dict]:
        """Each approval's latest record (ingest's `approvals` index finds it: records at its last_seq)."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_APPROVALS.format(where="a.status = %s" if status else "TRUE"), (status,) if status else ())
            return [_approval(r) for r in await cur.fetchall()]

    async def approval(self, host: str, approval_id: str) -> dict | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_APPROVALS.format(where="a.host_id = %s AND a.id = %s"), (host, approval_id))
            row = await cur.fetchone()
        return _approval(row) if row else None

    async def session_open(self, host: str, session_id: str) -> dict | None:
        rows = await self._session_rows(host, session_id)
        return rows[0] if rows else None

    async def _session_rows(self, host: str | None, session_id: str | None, limit: int = 500) -> list[dict]:
        where, args = ["r.kind IN ('session-open', 'session-close')"], []
        if host:
            where.append("r.host_id = %s")
            args.append(host)
        if session_id:
            where.append("r.session = %s")
            args.append(session_id)
        sql = ("SELECT * FROM (SELECT DISTINCT ON (r.host_id, r.body::jsonb->>'id') r.host_id AS host, r.seq, r.body, h.name AS host_name"
               " FROM records r LEFT JOIN hosts h ON h.host_id = r.host_id WHERE " + " AND ".join(where) +
               " ORDER BY r.host_id, r.body::jsonb->>'id', r.seq DESC) s ORDER BY s.seq DESC LIMIT %s")
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, (*args, limit))
            out = []
            for r in await cur.fetchall():
                s = json.loads(r["body"])
                s["host"], s["host_name"] = r["host"], r["host_name"] or r["host"]
                out.append(s)
        return out

    async def sessions(self, host: str = "", agent: str = "", target: str = "", verdict: str = "",
                       limit: int = 200) -> list[dict]:
        """Sessions newest first from the index ingest keeps (`sessions`); host is a host id or name,
        agent and target ("addr:port") substrings, verdict exact."""
        where, args = ["TRUE"], []
        if host:
            where.append("(s.host_id = %s OR h.name = %s)")
            args += [host, host]
        if agent:
            where.append("strpos(lower(s.agent), lower(%s)) > 0")
            args.append(agent)
        if target:
            where.append("strpos(lower(s.dst_addr || ':' || s.dst_port), lower(%s)) > 0")
            args.append(target)
        if verdict:
            where.append("s.verdict = %s")
            args.append(verdict)
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT s.*, s.host_id AS host, coalesce(h.name, s.host_id) AS host_name FROM sessions s"
                              " LEFT JOIN hosts h ON h.host_id = s.host_id WHERE " + " AND ".join(where) +
                              " ORDER BY s.started DESC NULLS LAST LIMIT %s", (*args, limit))
            return list(await cur.fetchall())

    async def events(self, host: str, session_id: str) -> list[dict]:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT seq, body FROM records WHERE host_id = %s AND kind = 'event'"
                              " AND session = %s ORDER BY seq", (host, session_id))
            out = []
            for r in await cur.fetchall():
                e = json.loads(r["body"])
                if isinstance(e.get("data"), str):
                    try:
                        e["data"] = json.loads(e["data"])
                    except ValueError:
                        pass
                e["seq"] = r["seq"]
                out.append(e)
            await cur.execute(
                "SELECT DISTINCT ON (body::jsonb->>'id') seq, body FROM records WHERE host_id = %s AND kind = 'approval'"
                " AND session = %s ORDER BY body::jsonb->>'id', seq DESC", (host, session_id))
            for r in await cur.fetchall():
                a = json.loads(r["body"])
                out.append({"seq": r["seq"], "at": a.get("decided_at") or a.get("created"), "kind": "approval",
                            "session": session_id, "data": a})
        return sorted(out, key=lambda e: (e.get("at") or 0, e["seq"]))

    async def decide(self, host: str, approval_id: str, approver: Approver, approve: bool,
                     for_seconds: float | None, note: str) -> None:
        """File a human's answer for the host to fetch. DecisionError when the approval is unknown,
        no longer pending on record, or already answered here."""
        current = await self.approval(host, approval_id)
        if current is None:
            raise DecisionError(f"no approval {approval_id} from host {host}")
        if current.get("status") != "pending":
            raise DecisionError(f"approval {approval_id} is already {current.get('status')}")
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO approval_decisions (host, approval, approve, for_seconds, note, approver_sub,"
                " approver_email, approver_issuer, approver_label) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (host, approval) DO NOTHING",
                (host, approval_id, approve, for_seconds, note, approver.sub, approver.email, approver.issuer,
                 approver.label()))
            if cur.rowcount != 1:
                raise DecisionError(f"approval {approval_id} was answered meanwhile")
            await conn.execute("SELECT pg_notify(%s, %s)", (DECISIONS_CHANNEL, host))

    async def undelivered(self, host: str) -> list[dict]:
        """Answers waiting for a host, oldest first (what its channel fetches)."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT approval, approve, for_seconds, note, approver_label AS by FROM approval_decisions"
                " WHERE host = %s AND delivered_at IS NULL ORDER BY decided_at", (host,))
            return list(await cur.fetchall())

    async def delivered(self, host: str, results: list[dict]) -> int:
        """The host applied these answers (result: 'approved', 'denied', or the host's error text)."""
        n = 0
        async with self.pool.connection() as conn:
            for r in results:
                cur = await conn.execute(
                    "UPDATE approval_decisions SET delivered_at = now(), host_result = %s"
                    " WHERE host = %s AND approval = %s AND delivered_at IS NULL",
                    (str(r.get("result", ""))[:500], host, str(r.get("approval", ""))))
                n += cur.rowcount
        return n
