"""Record bodies shaped as a host's journal writes them (recorder/journal.py's triggers), for the
tests, the benchmark and the demo that need a host's chain without running a proxy for it.

A session is three records: `session-open` (every session column), one `event` per operation
({"id", "at", "kind", "session", "data"}, a decision as the proxy records it) and `session-close`
(every column again, outcome and byte counts filled in). Bodies are compact JSON in column order,
as SQLite's json_object() writes them."""

from __future__ import annotations

import json
from collections.abc import Iterator

SESSION_KEYS = ("id", "agent", "pid", "tgid", "uid", "gid", "comm", "exe", "cmdline", "cgroup_id", "dst_addr", "dst_port",
                "family", "protocol", "started", "ended", "bytes_up", "bytes_down", "outcome", "detail", "verdict", "rule")


def _j(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def session(sid: str, started: float, *, agent: str = "bot", verdict: str = "allow", rule: str = "web-ok",
            dst: tuple[str, int] = ("10.0.0.2", 5432), protocol: str = "postgres", cmdline: str = "psql -c select 1",
            statements: int = 1, event_id: int = 1) -> list[tuple[str, str]]:
    """(kind, body) of one session: open, `statements` statement decisions, close."""
    row = {"id": sid, "agent": agent, "pid": 4242, "tgid": 4242, "uid": 65533, "gid": 65533, "comm": cmdline.split()[0][:15],
           "exe": f"/usr/bin/{cmdline.split()[0]}", "cmdline": cmdline, "cgroup_id": 9127, "dst_addr": dst[0],
           "dst_port": dst[1], "family": "ipv6" if ":" in dst[0] else "ipv4", "protocol": protocol, "started": started,
           "ended": None, "bytes_up": 0, "bytes_down": 0, "outcome": "open", "detail": None, "verdict": verdict, "rule": rule}
    out = [("session-open", _j(row))]
    for k in range(statements):
        data = {"verdict": verdict, "protocol": protocol, "action": "read", "objects": ["public.orders"],
                "summary": f"SELECT id, total FROM orders WHERE customer = $1 LIMIT {k + 1}", "rule": rule,
                "reason": f"rule {rule}"}
        out.append(("event", _j({"id": event_id + k, "at": started + 0.001 * (k + 1), "kind": "decision", "session": sid,
                                 "data": data})))
    closed = {**row, "ended": started + 0.5, "bytes_up": 120 * statements, "bytes_down": 900 * statements,
              "outcome": "closed" if verdict == "allow" else "refused", "detail": None if verdict == "allow" else f"rule {rule}"}
    out.append(("session-close", _j(closed)))
    return out


def approval(aid: str, sid: str, created: float, *, agent: str = "bot", status: str = "pending",
             summary: str = "DELETE FROM orders") -> tuple[str, str]:
    """(kind, body) of an approval as filed (pending) or answered."""
    return "approval", _j({"id": aid, "created": created, "session": sid, "agent": agent, "destination": "shop-db",
                           "protocol": "postgres", "action": "delete", "objects": '["public.orders"]', "summary": summary,
                           "rule": "deletes-need-a-human", "reason": "held for a human", "timeout_at": created + 120,
                           "status": status, "decided_by": None, "decided_at": None, "note": None, "grant_until": None})


def stream(n: int, start: float = 1_764_500_000.0, statements: int = 3, tag: str = "") -> Iterator[tuple[str, str]]:
    """`n` records (sessions of 2 + `statements` records, the last one cut short): a host's busy spool."""
    i, made, event_id = 0, 0, 1
    while made < n:
        for item in session(f"{int(start * 1e6) + i:x}{tag}{i:08x}", start + i * 0.01, statements=statements, event_id=event_id,
                            agent=f"agent-{i % 7}"):
            if made == n:
                return
            yield item
            made += 1
        i, event_id = i + 1, event_id + statements
