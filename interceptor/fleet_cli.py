"""The fleet verbs: `sessions/replay/approvals --server`, `export` and `verify` against a central recorder.

interceptor/cli.py hands a verb here when it names a recorder (--server) or is export/verify; the
reading itself is recorder/fleet.py (HTTPS + operator certificate) and the checking recorder/verify.py.
Every string the agents or the hosts chose goes through printable() on the way to a person; --json
prints the recorder's answer as it came."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from recorder.printable import printable as p

if TYPE_CHECKING:  # aiohttp and cryptography load only for the verbs that use them
    from recorder.fleet import Fleet
    from recorder.verify import HostChain, HostReport

_AGO = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_AGO_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class FleetCliError(Exception):
    """Printed by cli.py as `interlock VERB: message`, exit 2."""


# ---- options --------------------------------------------------------------------------------

def add_server_options(p_: argparse.ArgumentParser, filters: tuple[str, ...] = ()) -> None:
    """--server, --credentials and --host on a reading verb, plus the named filters (agent, target, verdict, time)."""
    g = p_.add_argument_group("the fleet, from a central recorder")
    g.add_argument("--server", metavar="URL", help="read from this central recorder (https://HOST:PORT) instead of this host")
    g.add_argument("--credentials", metavar="DIR", type=Path,
                   help="operator credentials from `interlock recorder operator` (default: $INTERLOCK_OPERATOR_CREDENTIALS)")
    g.add_argument("--host", help="only this host (its name or id)")
    if "agent" in filters:
        g.add_argument("--agent", help="only this agent")
    if "target" in filters:
        g.add_argument("--target", help="only sessions to this destination (address, address:port or target name)")
    if "verdict" in filters:
        g.add_argument("--verdict", help="only sessions with this verdict (allow, deny, approve)")
    if "time" in filters:
        g.add_argument("--since", metavar="WHEN", help="from this time: 2h (ago), 2026-11-30T14:00, or epoch seconds")
        g.add_argument("--until", metavar="WHEN", help="up to this time (same forms as --since)")


def register(sub, common: argparse.ArgumentParser) -> None:
    """The `export` and `verify` verbs."""
    pe = sub.add_parser("export", parents=[common], help="write a central recorder's records as JSON Lines (for verify --export)")
    pe.add_argument("--server", metavar="URL", required=True, help="the central recorder (https://HOST:PORT)")
    pe.add_argument("--credentials", metavar="DIR", type=Path, help="operator credentials (default: $INTERLOCK_OPERATOR_CREDENTIALS)")
    pe.add_argument("--host", action="append", help="only this host (name or id; repeatable)")
    pe.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write it ('-': standard output)")
    pe.set_defaults(fn=cmd_export)
    pv = sub.add_parser("verify", parents=[common], help="recompute every host's hash chain and name the first record changed, "
                        "removed or inserted")
    src = pv.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="URL", help="check the central recorder's store")
    src.add_argument("--export", metavar="FILE", type=Path, help="check an export file ('-': standard input)")
    pv.add_argument("--credentials", metavar="DIR", type=Path, help="operator credentials (with --server)")
    pv.add_argument("--host", action="append", help="only this host (name or id; repeatable)")
    pv.add_argument("--host-key", action="append", default=[], metavar="HOST=HEX",
                    help="the host's public signing key as the host shows it: used instead of the store's copy")
    pv.set_defaults(fn=cmd_verify)


def need_server(args, verb: str) -> None:
    """Without --server a verb reads this host's recorder: options only a central recorder answers are an error, not ignored."""
    given = [f"--{k}" for k in ("host", "credentials", "target", "verdict", "since", "until")
             if getattr(args, k, None) is not None]
    if given:
        raise FleetCliError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for a central recorder: add --server URL "
                            f"(without it, interlock {verb} reads this host's own recordings)")


def when(text: str | None, opt: str) -> float | None:
    """--since/--until as epoch seconds: a duration ago (90s, 30m, 2h, 7d), epoch seconds, or ISO 8601 (local time if no zone)."""
    if not text:
        return None
    t = text.strip()
    m = _AGO.match(t)
    if m:
        return time.time() - float(m.group(1)) * _AGO_UNITS[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise FleetCliError(f"{opt}: '{text}' is not a time: use a duration ago (30m, 2h, 7d), "
                            "2026-11-30T14:00[:00][+00:00] or epoch seconds") from None


def _fleet(args) -> Fleet:
    from recorder.fleet import Fleet, FleetError, OperatorCredentials

    try:
        return Fleet(args.server, OperatorCredentials.find(args.credentials))
    except FleetError as e:
        raise FleetCliError(str(e)) from None


def _call(coro):
    from recorder.fleet import FleetError, run

    try:
        return run(coro)
    except FleetError as e:
        raise FleetCliError(str(e)) from None


def _host_label(row: dict) -> str:
    return row.get("host_name") or row.get("name") or row.get("host") or "?"


def _resolve_hosts(hosts: list[dict], wanted: Iterable[str] | None) -> list[dict]:
    """The recorder's hosts named by id or name in `wanted` (all when None); FleetCliError for an unknown one."""
    if not wanted:
        return hosts
    out = []
    for w in wanted:
        match = [h for h in hosts if w in (h.get("host"), h.get("id"), h.get("name"))]
        if not match:
            known = ", ".join(p(_host_label(h)) for h in hosts) or "none yet"
            raise FleetCliError(f"the recorder has no host '{p(w)}' (hosts: {known})")
        out += [h for h in match if h not in out]
    return out


def _host_id(h: dict) -> str:
    return str(h.get("host") or h.get("id"))


def _int_or_none(v: object) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


# ---- sessions / replay / approvals ------------------------------------------------------------

def sessions(args) -> int:
    filters = {"host": args.host, "agent": args.agent, "target": args.target, "verdict": args.verdict,
               "since": when(args.since, "--since"), "until": when(args.until, "--until"), "limit": args.limit}

    async def go() -> list[dict]:
        async with _fleet(args) as fleet:
            return await fleet.sessions(**filters)

    rows = _call(go())
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no sessions recorded" + (" that match" if any(v for k, v in filters.items() if k != "limit") else ""))
        return 0
    print(f"{'host':16} {'session':21}  {'started':19}  {'agent':12} {'uid':>6}  {'exe':22} {'destination':28} {'proto':8} "
          f"{'up':>8} {'down':>8}  {'verdict':8} outcome")
    for r in rows:
        addr = r.get("dst_addr") or ""
        dst = f"[{addr}]:{r.get('dst_port')}" if ":" in addr else f"{addr}:{r.get('dst_port')}"
        started = datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S") if r.get("started") else "-"
        print(f"{p(_host_label(r))[:16]:16} {p(r.get('id')):21}  {started:19}  {p(r.get('agent'))[:12]:12} "
              f"{p(r.get('uid')):>6}  {p(r.get('exe') or r.get('comm'))[-22:]:22} {p(dst):28} {p(r.get('protocol'))[:8]:8} "
              f"{p(r.get('bytes_up') or 0):>8} {p(r.get('bytes_down') or 0):>8}  {p(r.get('verdict') or '-')[:8]:8} "
              f"{p(r.get('outcome'))}" + (f" ({p(r['detail'])})" if r.get("detail") else ""))
    return 0


def replay(args) -> int:
    from recorder.replay import render

    async def go() -> tuple[str, dict | None]:
        async with _fleet(args) as fleet:
            hosts = await fleet.hosts()
            for h in _resolve_hosts(hosts, [args.host] if args.host else None):
                tl = await fleet.session(_host_id(h), args.session)
                if tl is not None:
                    return _host_label(h) + f" ({_host_id(h)})", tl
            return "", None

    where, tl = _call(go())
    if tl is None:
        raise FleetCliError(f"the recorder has no session '{p(args.session)}'" + (f" of host '{p(args.host)}'" if args.host else "")
                            + f"; list them with: interlock sessions --server {args.server}")
    if args.json:
        print(json.dumps(tl, indent=1))
        return 0
    print(f"host {p(where)}")
    print(render(timeline_of(tl)))
    return 0


_SESSION_DEFAULTS = {"id": "", "agent": "", "pid": 0, "tgid": 0, "uid": "", "exe": "", "cmdline": "", "dst_addr": "",
                     "dst_port": "", "protocol": "", "verdict": None, "rule": "", "outcome": "", "detail": "",
                     "bytes_up": 0, "bytes_down": 0, "started": 0.0, "ended": None}


def timeline_of(answer: dict) -> dict:
    """The recorder's {"session", "events"} in the shape recorder.replay.render reads (offsets, parsed data)."""
    given = answer.get("session") or {}
    s = {**_SESSION_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    if given.get("tgid") is None:  # the recorder keeps the process id; the thread id is the same for most
        s["tgid"] = s["pid"]
    events = []
    for e in answer.get("events") or []:
        data = e.get("data")
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                data = {"data": data}
        ev = {**e, "data": data if isinstance(data, dict) else {"data": data}}
        ev["offset"] = round(float(e.get("at") or 0) - float(s["started"] or 0), 6)
        events.append(ev)
    return {"session": s, "events": events}


def approvals(args) -> int:
    filters = {"status": None if args.all else "pending", "host": args.host, "agent": args.agent,
               "since": when(args.since, "--since"), "until": when(args.until, "--until")}

    async def go() -> list[dict]:
        async with _fleet(args) as fleet:
            return await fleet.approvals(**filters)

    rows = [r for r in _call(go()) if (not args.agent or r.get("agent") == args.agent)
            and (filters["since"] is None or float(r.get("created") or 0) >= filters["since"])
            and (filters["until"] is None or float(r.get("created") or 0) < filters["until"])]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no approvals pending in the fleet" if not args.all else "no approvals recorded in the fleet")
        return 0
    for r in rows:
        if r.get("status") == "pending" and r.get("timeout_at"):
            state = f"pending, {int(float(r['timeout_at']) - time.time())}s left"
        else:
            state = f"{r.get('status')}" + (f" by {r['decided_by']}" if r.get("decided_by") else "")
        print(f"{p(_host_label(r))[:16]:16} {p(r.get('id'))}  {p(r.get('agent')):12} {p(r.get('destination')):24} "
              f"{p(r.get('protocol'))}:{p(r.get('action'))}  '{p(r.get('summary'))[:60]}'  rule {p(r.get('rule'))}  [{p(state)}]")
    return 0


# ---- export -----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    out_path = None if str(args.out) == "-" else Path(args.out)
    counts = {"hosts": 0, "records": 0, "checkpoints": 0}

    async def go(sink) -> None:
        async with _fleet(args) as fleet:
            # the whole fleet in one request (one snapshot of the store), or the named hosts one by one
            names = [_host_id(h) for h in _resolve_hosts(await fleet.hosts(), args.host)] if args.host else [None]
            for hid in names:
                async for line in fleet.lines("/v1/export", host=hid):
                    if not line.strip():
                        continue
                    try:
                        kind = json.loads(line).get("type")
                    except (ValueError, AttributeError):
                        raise FleetCliError("the recorder's export has a line that is not a JSON object; "
                                            "nothing was written") from None
                    counts["hosts" if kind == "host" else "records" if kind == "record" else "checkpoints"] += 1
                    sink.write(line + b"\n")  # verbatim: the bodies are hashed as they are

    if out_path is None:
        _call(go(sys.stdout.buffer))
        sys.stdout.flush()
    else:
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # agents' SQL and paths: not for all to read
            with os.fdopen(fd, "wb") as f:
                _call(go(f))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
    text = (f"exported {counts['hosts']} host(s), {counts['records']} record(s), {counts['checkpoints']} checkpoint(s)"
            + (f" to {out_path}" if out_path else ""))
    if out_path is not None:
        print(json.dumps({"ok": True, "file": str(out_path), **counts}, indent=1) if args.json else text)
    else:
        print(text, file=sys.stderr)
    return 0


# ---- verify -----------------------------------------------------------------------------------

def cmd_verify(args) -> int:
    from recorder.verify import ExportError, HostChain, parse_export, parse_pins, pin_for, verify_host

    try:
        pins = parse_pins(args.host_key)
    except ValueError as e:
        raise FleetCliError(str(e)) from None
    reports: list[HostReport] = []
    flagged: dict[str, int] = {}  # breaks the recorder refused at ingest, per host (informational)
    wanted = set(args.host or ())

    def check(chain: HostChain, source: str, stored_head: int | None = None) -> None:
        if wanted and not wanted & {chain.host, chain.name}:
            return
        reports.append(verify_host(chain, pin_for(pins, chain), source, stored_head))

    if args.export is not None:
        try:
            if str(args.export) == "-":
                chains = parse_export(sys.stdin, "standard input")
                for c in chains:
                    check(c, "export")
            else:
                with open(args.export, "rb") as f:
                    for c in parse_export(f, str(args.export)):
                        check(c, "export")
        except ExportError as e:
            raise FleetCliError(f"{e}: not an export of this format (make one with: interlock export --server URL --out FILE)") from None
        except OSError as e:
            raise FleetCliError(f"cannot read {args.export}: {e.strerror}") from None
        seen_hosts = [(r.host, r.name) for r in reports]
    else:
        async def go() -> list[tuple[str, str]]:
            async with _fleet(args) as fleet:
                hosts = _resolve_hosts(await fleet.hosts(), args.host)
                for h in hosts:
                    lines = [line async for line in fleet.lines("/v1/export", host=_host_id(h))]
                    try:
                        chains = list(parse_export(lines, f"the recorder's export of host {_host_label(h)}"))
                    except ExportError as e:
                        raise FleetCliError(str(e)) from None
                    if not chains:  # a host that has shipped nothing yet still has its key on record
                        chains = [HostChain(_host_id(h), str(h.get("name") or ""), str(h.get("key") or ""))]
                    for c in chains:
                        check(c, "server", _int_or_none(h.get("head_seq")))
                flagged.update({_host_id(h): n for h in hosts if (n := _int_or_none(h.get("findings")))})
                return [(_host_id(h), str(h.get("name") or "")) for h in hosts]

        seen_hosts = _call(go())
    missing = [h for h in pins if not any(h in pair for pair in seen_hosts)]
    if wanted:
        missing += [h for h in wanted if not any(h in pair for pair in seen_hosts) and h not in missing]
    failed = sum(not r.ok for r in reports) + len(missing)
    if args.json:
        print(json.dumps({"ok": failed == 0, "hosts": [{**r.as_dict(), "ingest_findings": flagged.get(r.host, 0)} for r in reports],
                          "missing_hosts": missing}, indent=1))
        return 1 if failed else 0
    source = f"export {args.export}" if args.export is not None else f"recorder {args.server}"
    for r in reports:
        print(_report_text(r))
        if flagged.get(r.host):
            print(f"           note: the recorder refused {flagged[r.host]} batch(es) of this host at ingest (gap, fork or "
                  f"bad checkpoint; not stored): GET /v1/findings?host={p(r.host)}")
    for h in missing:
        print(f"MISSING  host {p(h)}: named by --host/--host-key but not in the {source}: its records are gone or it never shipped")
    if not reports and not missing:
        print(f"no hosts in the {source}")
    total = len(reports) + len(missing)
    print(f"verify: {total - failed} of {total} host(s) intact" + (f", {failed} with findings" if failed else ""))
    return 1 if failed else 0


_HEADLINE = {"changed": "CHANGED", "removed": "REMOVED", "inserted": "INSERTED", "bad-checkpoint": "BAD CHECKPOINT",
             "unsigned": "UNSIGNED", "key-mismatch": "KEY MISMATCH"}


def _report_text(r: HostReport) -> str:
    who = f"host {p(r.name)} ({p(r.host)})" if r.name else f"host {p(r.host)}"
    key = "key pinned" if r.key_source == "pinned" else f"key from the {r.key_source} (not pinned: --host-key HOST=HEX)"
    if r.ok:
        span = f"seqs {r.first_seq}..{r.last_seq}" if r.records else "no records yet"
        return f"OK       {who}: {r.records} record(s), {span}, signed to seq {r.signed_to}; {key}"
    first, rest = r.problems[0], r.problems[1:]
    lines = [f"FAIL     {who}: {_problem_text(first)}"]
    for q in rest[:5]:
        lines.append(f"           also: {_problem_text(q)}")
    if len(rest) > 5:
        lines.append(f"           and {len(rest) - 5} more (--json lists them all)")
    lines.append(f"           {r.records} record(s), signed to seq {r.signed_to}; {key}")
    return "\n".join(lines)


def _problem_text(q) -> str:
    where = f"seq {q.seq}" + (f" ({p(q.kind)}" + (f", session {p(q.session)}" if q.session else "") + ")" if q.kind else "")
    if q.problem == "key-mismatch":
        where = "the host's key"
    detail = q.detail.removeprefix(f"seq {q.seq} ({q.kind}): ")  # verify_chain's detail repeats what `where` says
    return f"{_HEADLINE.get(q.problem, q.problem.upper())} {where}: {p(detail)}"
