"""`interlock recorder init|serve|token|hosts|revoke|operator|migrate`: the central recorder's admin verbs.

They run on the recorder machine against its state dir (CA and server key files) and PostgreSQL
directly (--database DSN or INTERLOCK_RECORDER_DATABASE). `add_parser(subparsers)` hooks them into
`interlock`; `python -m central VERB …` runs them alone. Errors are one line with the fix."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

DEFAULT_STATE = Path("/var/lib/interlock-recorder")


class AdminError(Exception):
    """A message for the operator, printed without a traceback."""


def _dsn(args) -> str:
    from central.db import StoreError, dsn_from

    try:
        return dsn_from(args.database)
    except StoreError as e:
        raise AdminError(str(e)) from None


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if getattr(args, "json", False) else text)


def cmd_init(args) -> int:
    from central import ca

    sha = ca.init(ca.StateDir(args.state), args.name, args.ip or [], force=args.force)
    applied = []
    if args.database or os.environ.get("INTERLOCK_RECORDER_DATABASE"):
        from central.db import migrate

        applied = migrate(_dsn(args))
    _emit(args, {"ok": True, "state": str(args.state), "ca_sha256": sha, "migrations": applied},
          f"recorder CA and server certificate for {args.name} in {args.state}\nCA sha256: {sha}"
          + (f"\nschema: applied {', '.join(applied)}" if applied else ""))
    return 0


def cmd_migrate(args) -> int:
    from central.db import migrate

    applied = migrate(_dsn(args))
    _emit(args, {"ok": True, "applied": applied}, f"applied {', '.join(applied)}" if applied else "schema up to date")
    return 0


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AdminError(f"--listen {text!r}: give HOST:PORT, e.g. 0.0.0.0:8443 or [::]:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def cmd_serve(args) -> int:
    from central import ca
    from central.db import migrate

    host, port = _listen(args.listen)
    dsn = _dsn(args)
    ca.StateDir(args.state).need()
    if args.web is not None:  # a bad page config stops serve here, in one line, not in each worker
        from central.web.config import WebConfigError, load

        try:
            load(args.web, args.state)
        except WebConfigError as e:
            raise AdminError(f"--web: {e}") from None
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    applied = migrate(dsn)
    if applied:
        logging.getLogger("interlock.recorder").info("schema: applied %s", ", ".join(applied))
    if args.workers <= 1:
        _serve_one(args, dsn, host, port, reuse_port=False)
        return 0
    return _serve_many(args, dsn, host, port)


def _serve_one(args, dsn: str, host: str, port: int, reuse_port: bool) -> None:
    import uvloop
    from aiohttp import web

    from central import ca
    from central.app import make_app

    ctx = ca.server_context(ca.StateDir(args.state))
    app = make_app(args.state, dsn, pool_size=args.pool, web_config=args.web)
    hp = f"[{host}]" if ":" in host else host
    web.run_app(app, host=host, port=port, ssl_context=ctx, reuse_port=reuse_port, access_log=None,
                print=lambda _msg: print(f"recorder {os.getpid()} listening on https://{hp}:{port}", flush=True),
                loop=uvloop.new_event_loop())


def _serve_many(args, dsn: str, host: str, port: int) -> int:
    """`--workers N`: N processes on one port (SO_REUSEPORT), the kernel spreads connections; if one
    dies the others are stopped too, so a supervisor sees the failure and restarts the whole set."""
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _serve_one(args, dsn, host, port, reuse_port=True)
            except BaseException:  # noqa: BLE001
                logging.getLogger("interlock.recorder").exception("worker failed")
                code = 1
            os._exit(code)
        children.append(pid)

    def forward(signum, _frame):
        for c in children:
            try:
                os.kill(c, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    while children:
        pid, status = os.wait()
        if pid in children:
            children.remove(pid)
            if os.waitstatus_to_exitcode(status) not in (0, -signal.SIGTERM, -signal.SIGINT):
                rc = 1
                forward(signal.SIGTERM, None)
    return rc


def cmd_token(args) -> int:
    from central import ca, tokens
    from central.db import check_schema, connect

    seconds = tokens.parse_duration(args.expires)
    tok = tokens.new(ca.ca_sha256(_state(args)))
    with connect(_dsn(args)) as conn:
        check_schema(conn)
        row = conn.execute("INSERT INTO enrolment_tokens (id, secret_sha256, expires_at, note) VALUES (%s, %s, now() + %s * interval '1 second', %s)"
                           " RETURNING expires_at", (tok.id, tok.secret_sha256, seconds, args.note or "")).fetchone()
    _emit(args, {"ok": True, "token": str(tok), "id": tok.id, "expires_at": row[0].isoformat()},
          f"{tok}\n(single use, expires {row[0].isoformat()}; on the host: sudo interlock join --server URL --token TOKEN)")
    return 0


def _state(args):
    from central import ca

    sd = ca.StateDir(args.state)
    if not sd.exists():
        raise AdminError(f"no recorder CA in {args.state}: run 'interlock recorder init --state {args.state} --name DNSNAME' first")
    return sd


def cmd_hosts(args) -> int:
    from central.db import check_schema, connect

    with connect(_dsn(args)) as conn:
        check_schema(conn)
        rows = conn.execute("SELECT h.host_id, h.name, h.joined_at, h.revoked_at, c.seq, c.signed_seq, c.updated_at,"
                            " (SELECT count(*) FROM findings f WHERE f.host_id = h.host_id)"
                            " FROM hosts h LEFT JOIN chain_heads c USING (host_id) ORDER BY h.joined_at").fetchall()
    keys = ["host", "name", "joined_at", "revoked_at", "head_seq", "signed_seq", "last_ingest", "findings"]
    data = [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in zip(keys, r, strict=True)} for r in rows]
    lines = [f"{'HOST':<16} {'NAME':<20} {'HEAD':>9} {'SIGNED':>9} {'FINDINGS':>8}  STATE"]
    for d in data:
        state = f"revoked {d['revoked_at']}" if d["revoked_at"] else f"last ingest {d['last_ingest']}"
        lines.append(f"{d['host']:<16} {d['name'][:20]:<20} {d['head_seq'] or 0:>9} {d['signed_seq'] or 0:>9} {d['findings']:>8}  {state}")
    _emit(args, {"ok": True, "hosts": data}, "\n".join(lines) if data else "no hosts joined yet (make a token: interlock recorder token)")
    return 0


def cmd_revoke(args) -> int:
    from central.db import check_schema, connect

    with connect(_dsn(args)) as conn:
        check_schema(conn)
        row = conn.execute("UPDATE hosts SET revoked_at = coalesce(revoked_at, now()), revoked_reason = coalesce(revoked_reason, %s)"
                           " WHERE host_id = %s OR name = %s RETURNING host_id, revoked_at", (args.reason or "", args.host, args.host)).fetchall()
    if not row:
        raise AdminError(f"no host {args.host!r} (list them: interlock recorder hosts)")
    if len(row) > 1:
        raise AdminError(f"{args.host!r} names several hosts; they were all revoked: {', '.join(r[0] for r in row)}")
    _emit(args, {"ok": True, "host": row[0][0], "revoked_at": row[0][1].isoformat()},
          f"host {row[0][0]} revoked at {row[0][1].isoformat()}: its requests are refused from now on")
    return 0


def cmd_operator(args) -> int:
    from central import ca

    crt, key = ca.issue_operator(_state(args), args.name, args.out)
    _emit(args, {"ok": True, "cert": str(crt), "key": str(key), "ca": str(args.out / "ca.pem")},
          f"operator certificate for {args.name}: {crt} (key {key}, CA {args.out / 'ca.pem'})")
    return 0


def add_verbs(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output (errors too)")
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--database", metavar="DSN", help="PostgreSQL conninfo or URL (default: $INTERLOCK_RECORDER_DATABASE)")
    st = argparse.ArgumentParser(add_help=False)
    st.add_argument("--state", type=Path, default=DEFAULT_STATE, help=f"CA and server key files (default {DEFAULT_STATE})")
    p = sub.add_parser("init", parents=[common, st, db], help="make the recorder's CA and server certificate (and migrate, given --database)")
    p.add_argument("--name", required=True, metavar="DNSNAME", help="the name hosts use to reach the recorder")
    p.add_argument("--ip", action="append", metavar="ADDR", help="an address hosts use to reach it (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing CA (every host must join again)")
    p.set_defaults(fn=_run(cmd_init))
    p = sub.add_parser("migrate", parents=[common, db], help="apply the schema migrations")
    p.set_defaults(fn=_run(cmd_migrate))
    p = sub.add_parser("serve", parents=[common, st, db], help="serve the HTTPS API")
    p.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--pool", type=int, default=10, help="PostgreSQL connections per process")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--web", type=Path, metavar="FILE", help="serve the approval page: its YAML config (central/web/config.py)")
    p.set_defaults(fn=_run(cmd_serve))
    p = sub.add_parser("token", parents=[common, st, db], help="make a single-use enrolment token for 'interlock join'")
    p.add_argument("--expires", default="1h", metavar="DURATION", help="e.g. 30m, 1h, 7d (default 1h)")
    p.add_argument("--note", help="what the token is for (stored with it)")
    p.set_defaults(fn=_run(cmd_token))
    p = sub.add_parser("hosts", parents=[common, db], help="joined hosts, their chain heads and findings")
    p.set_defaults(fn=_run(cmd_hosts))
    p = sub.add_parser("revoke", parents=[common, db], help="refuse a host from now on")
    p.add_argument("host", help="host id or name")
    p.add_argument("--reason")
    p.set_defaults(fn=_run(cmd_revoke))
    p = sub.add_parser("operator", parents=[common, st], help="issue an operator's client certificate (reads the fleet)")
    p.add_argument("name")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.set_defaults(fn=_run(cmd_operator))


def _run(fn):
    """Run a verb; known failures become one line on stderr (and a JSON object under --json), exit 2."""
    def run(args) -> int:
        import psycopg

        from central.ca import CAError
        from central.db import StoreError
        from central.tokens import TokenError

        verb = f"recorder {args.recorder_verb}"
        try:
            return fn(args)
        except (AdminError, CAError, StoreError, TokenError, OSError, psycopg.Error) as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            if getattr(args, "json", False):
                print(json.dumps({"ok": False, "verb": verb, "error": msg}, indent=1))
            print(f"interlock {verb}: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    return run


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `recorder` and its verbs on `interlock`'s subparsers."""
    p = subparsers.add_parser("recorder", help="the central recorder: init, serve, token, hosts, revoke, operator")
    add_verbs(p.add_subparsers(dest="recorder_verb", required=True, metavar="VERB"))
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m central", description="The Interlock central recorder's admin verbs.")
    add_verbs(ap.add_subparsers(dest="recorder_verb", required=True, metavar="VERB"))
    args = ap.parse_args(argv)
    return args.fn(args)
