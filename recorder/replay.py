"""A session as a reviewer reads it: who, where, then every event in order with its offset."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

from recorder.printable import printable


def timeline(db_path: Path, session: str) -> dict | None:
    if not db_path.exists():
        return None
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM sessions WHERE id = ? OR id LIKE ? ORDER BY started LIMIT 2",
                           (session, session + "%")).fetchall()
        if len(row) != 1:
            return None
        s = dict(row[0])
        events = [dict(e) for e in conn.execute("SELECT at, kind, data FROM events WHERE session = ? ORDER BY id", (s["id"],))]
    finally:
        conn.close()
    for e in events:
        e["data"] = json.loads(e["data"])
        e["offset"] = round(e["at"] - s["started"], 6)
    return {"session": s, "events": events}


def render(tl: dict) -> str:
    """The timeline as text, one line per event. Every recorded string goes through printable():
    the agent chose most of them, and a newline or escape sequence must not forge a line."""
    p = printable
    s = tl["session"]
    start = datetime.fromtimestamp(s["started"])
    dur = f"{s['ended'] - s['started']:.3f}s" if s["ended"] else "still open"
    lines = [
        f"session {p(s['id'])}  {start:%Y-%m-%d %H:%M:%S}  ({dur})",
        f"  agent   {p(s['agent'])}  pid {s['tgid']} (thread {s['pid']})  uid {s['uid']}  {p(s['exe'])}",
        f"  command {p(s['cmdline'])}",
        f"  to      {p(s['dst_addr'])}:{s['dst_port']}  protocol {p(s['protocol'])}",
    ]
    if s.get("identity"):  # the agent's verified OIDC identity (identity/agents.py)
        try:
            ident = json.loads(s["identity"])
            lines.insert(2, f"  identity {p(ident.get('sub'))}  issuer {p(ident.get('iss'))}")
        except (ValueError, AttributeError):
            lines.insert(2, f"  identity {p(s['identity'])}")
    judged_by_event = any(e["kind"] == "decision" and e["data"].get("action") == "connect" for e in tl["events"])
    if s.get("verdict") and not judged_by_event:
        lines.append(f"  +{0:9.3f}s  {p(s['verdict'].upper()):8} connect   [rule {p(s['rule'])}]")
    for e in tl["events"]:
        d = e["data"]
        if e["kind"] == "decision":
            what = f"{p(d['verdict'].upper()):8} {p(d['protocol'])}:{p(d['action'])} " \
                   f"{p(d['summary'] or ' '.join(map(str, d['objects'])))}".rstrip()
            what += f"   [rule {p(d['rule'])}: {p(d['reason'])}]"
        elif e["kind"] == "http":
            what = f"{'http':18} {p(d['method'])} {p(d['host'])}{p(d['path'])} -> {p(d['status'])}  " \
                   f"{p(d.get('action', ''))}".rstrip()
            what += f"  ({d['up']} B up, {d['down']} B down, {d['ms']} ms; {p(d.get('verdict', '-'))}, {p(d['outcome'])})"
        elif e["kind"] == "statement":  # one SQL statement and what came of it (proxy/postgres)
            result = d.get("error") or d.get("tag") or "-"
            what = f"{'statement':18} {p(d['verdict'].upper()):8} {p(d['summary'])}"
            if d.get("params"):
                what += f"  params ({', '.join(map(p, d['params']))})"
            what += f"  -> {p(result)} ({d['duration_ms']} ms)"
            if d.get("masked"):
                what += "  masked " + ", ".join(f"{p(k)} x{v}" for k, v in d["masked"].items())
        elif e["kind"].startswith("approval-"):
            what = f"{p(e['kind']):18} {p(d.get('approval', ''))} {p(d.get('summary', ''))}".rstrip()
            if d.get("by"):
                what += f"  by {p(d['by'])}"
        else:
            what = f"{p(e['kind']):18} " + ", ".join(f"{p(k)}={p(v)}" for k, v in d.items())
        lines.append(f"  +{e['offset']:9.3f}s  {what}")
    end = f"+{s['ended'] - s['started']:9.3f}s" if s["ended"] else " " * 11
    lines.append(f"  {end}  {p(s['outcome'])}{' (' + p(s['detail']) + ')' if s['detail'] else ''}; "
                 f"{s['bytes_up']} bytes up, {s['bytes_down']} bytes down")
    return "\n".join(lines)
