"""The fleet read API for operators: hosts, sessions (filters), one session's replay, approvals,
findings, refusals, and the export of a host's chain as JSON Lines.

Sessions and approvals come from the derived tables (an index kept at ingest); replay and export
read `records`, the truth."""

from __future__ import annotations

import datetime as dt
import json

from aiohttp import web
from psycopg.rows import dict_row

from central.ingest import Refused

MAX_LIMIT = 10_000
SESSION_OUT = ["host", "host_name", "id", "agent", "uid", "exe", "dst_addr", "dst_port", "protocol", "outcome",
               "verdict", "rule", "started", "ended", "bytes_up", "bytes_down"]


def _time(name: str, text: str) -> float:
    """Epoch seconds, or ISO 8601 (a naive time is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise Refused(400, f"{name}={text!r}: give epoch seconds or an ISO 8601 time (2026-11-30T14:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def _limit(q, default: int = 200) -> int:
    try:
        n = int(q.get("limit", default))
    except ValueError:
        raise Refused(400, "limit: a number") from None
    if not 1 <= n <= MAX_LIMIT:
        raise Refused(400, f"limit: 1..{MAX_LIMIT}")
    return n


def _iso(v):
    return v.isoformat() if isinstance(v, dt.datetime) else v


def session_query(q) -> tuple[str, list]:
    where, args = [], []
    if q.get("host"):
        where.append("(s.host_id = %s OR h.name = %s)")
        args += [q["host"], q["host"]]
    for name in ("agent", "verdict", "outcome", "protocol"):
        if q.get(name):
            where.append(f"s.{name} = %s")
            args.append(q[name])
    if q.get("target"):
        addr, _, port = q["target"].rpartition(":") if q["target"].count(":") == 1 or q["target"].startswith("[") else ("", "", "")
        if addr and port.isdigit():
            where.append("s.dst_addr = %s AND s.dst_port = %s")
            args += [addr.strip("[]"), int(port)]
        else:
            where.append("s.dst_addr = %s")
            args.append(q["target"].strip("[]"))
    if q.get("since"):
        where.append("s.started >= %s")
        args.append(_time("since", q["since"]))
    if q.get("until"):
        where.append("s.started < %s")
        args.append(_time("until", q["until"]))
    cols = ", ".join(f"s.{c}" for c in SESSION_OUT[2:])
    sql = (f"SELECT s.host_id AS host, h.name AS host_name, {cols} FROM sessions s JOIN hosts h USING (host_id)"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY s.started DESC NULLS LAST, s.host_id, s.id LIMIT %s")
    return sql, [*args, _limit(q)]


def add_routes(app: web.Application, pool_key, need_operator) -> None:
    async def rows(sql: str, args=()) -> list[dict]:
        async with app[pool_key].connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, args)
            return [{k: _iso(v) for k, v in r.items()} for r in await cur.fetchall()]

    async def hosts(request: web.Request) -> web.Response:
        need_operator(request)
        out = await rows("SELECT h.host_id AS host, h.name, h.signing_key AS key, h.joined_at, h.revoked_at, h.revoked_reason,"
                         " c.seq AS head_seq, c.signed_seq, c.updated_at AS last_ingest,"
                         " (SELECT count(*) FROM findings f WHERE f.host_id = h.host_id) AS findings"
                         " FROM hosts h LEFT JOIN chain_heads c USING (host_id) ORDER BY h.joined_at, h.host_id")
        return web.json_response({"hosts": out})

    async def sessions(request: web.Request) -> web.Response:
        need_operator(request)
        sql, args = session_query(request.query)
        return web.json_response({"sessions": await rows(sql, args)})

    async def replay(request: web.Request) -> web.Response:
        need_operator(request)
        host, sid = request.match_info["host"], request.match_info["id"]
        cols = ", ".join(f"s.{c}" for c in SESSION_OUT[2:])
        found = await rows(f"SELECT s.host_id AS host, h.name AS host_name, {cols}, s.pid, s.gid, s.comm, s.cmdline, s.family,"
                           " s.detail FROM sessions s JOIN hosts h USING (host_id) WHERE s.host_id = %s AND s.id = %s", (host, sid))
        if not found:
            raise Refused(404, f"no session {sid} of host {host}")
        recs = await rows("SELECT seq, kind, body FROM records WHERE host_id = %s AND session = %s ORDER BY seq", (host, sid))
        events, approvals = [], []
        for r in recs:
            try:
                body = json.loads(r["body"])
            except ValueError:
                body = {"unreadable": r["body"]}
            if r["kind"] == "event":
                events.append({"seq": r["seq"], **body} if isinstance(body, dict) else {"seq": r["seq"], "body": body})
            elif r["kind"] == "approval":
                approvals.append({"seq": r["seq"], **body} if isinstance(body, dict) else {"seq": r["seq"], "body": body})
        return web.json_response({"session": found[0], "events": events, "approvals": approvals})

    async def approvals(request: web.Request) -> web.Response:
        need_operator(request)
        q = request.query
        where, args = [], []
        if q.get("status"):
            where.append("a.status = %s")
            args.append(q["status"])
        if q.get("host"):
            where.append("(a.host_id = %s OR h.name = %s)")
            args += [q["host"], q["host"]]
        out = await rows("SELECT a.host_id AS host, h.name AS host_name, a.* FROM approvals a JOIN hosts h USING (host_id)"
                         + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY a.created DESC LIMIT %s",
                         [*args, _limit(q)])
        for r in out:
            r.pop("host_id", None)
        return web.json_response({"approvals": out})

    async def findings(request: web.Request) -> web.Response:
        need_operator(request)
        q = request.query
        where, args = ("WHERE host_id = %s", [q["host"]]) if q.get("host") else ("", [])
        out = await rows(f"SELECT host_id AS host, seq, problem, detail, at FROM findings {where} ORDER BY at DESC LIMIT %s",
                         [*args, _limit(q)])
        return web.json_response({"findings": out})

    async def refusals(request: web.Request) -> web.Response:
        need_operator(request)
        out = await rows("SELECT at, peer, path, cert_subject, claimed_host, status, reason FROM refusals ORDER BY id DESC LIMIT %s",
                         [_limit(request.query)])
        return web.json_response({"refusals": out})

    async def export(request: web.Request) -> web.StreamResponse:
        """JSON Lines: per host {"type": "host", host, name, key}, then its records and checkpoints in seq order."""
        need_operator(request)
        host = request.query.get("host")
        hs = await rows("SELECT host_id, name, signing_key FROM hosts" + (" WHERE host_id = %s OR name = %s" if host else "")
                        + " ORDER BY host_id", (host, host) if host else ())
        if host and not hs:
            raise Refused(404, f"no host {host}")
        resp = web.StreamResponse(headers={"Content-Type": "application/jsonl; charset=utf-8"})
        await resp.prepare(request)
        async with app[pool_key].connection() as conn, conn.transaction():
            for h in hs:
                hid = h["host_id"]
                await resp.write((json.dumps({"type": "host", "host": hid, "name": h["name"], "key": h["signing_key"]}) + "\n").encode())
                cur = conn.cursor(name="export")
                await cur.execute("SELECT 0 AS t, seq, kind, body, hash, 0::bigint AS at_us, NULL::bytea AS sig FROM records WHERE host_id = %s"
                                  " UNION ALL SELECT 1, seq, NULL, NULL, head, at_us, sig FROM checkpoints WHERE host_id = %s"
                                  " ORDER BY seq, t, at_us", (hid, hid))
                while True:
                    chunk = await cur.fetchmany(2000)
                    if not chunk:
                        break
                    lines = []
                    for t, seq, kind, body, hsh, at_us, sig in chunk:
                        if t == 0:
                            item = {"type": "record", "host": hid, "seq": seq, "kind": kind, "body": body, "hash": bytes(hsh).hex()}
                        else:
                            item = {"type": "checkpoint", "host": hid, "seq": seq, "head": bytes(hsh).hex(), "at_us": at_us,
                                    "sig": bytes(sig).hex()}
                        lines.append(json.dumps(item))
                    await resp.write(("\n".join(lines) + "\n").encode())
                await cur.close()
        await resp.write_eof()
        return resp

    app.router.add_get("/v1/hosts", hosts)
    app.router.add_get("/v1/sessions", sessions)
    app.router.add_get("/v1/sessions/{host}/{id}", replay)
    app.router.add_get("/v1/approvals", approvals)
    app.router.add_get("/v1/findings", findings)
    app.router.add_get("/v1/refusals", refusals)
    app.router.add_get("/v1/export", export)
