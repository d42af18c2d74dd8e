"""The PostgreSQL part of the demo: `demo(lab, say, show)` (lab.demo's helpers), or alone:
`sudo .venv/bin/python -m lab.demo_postgres`.

On the lab's server host: PostgreSQL 15 whose application role logs in with a password only.
The password goes into Interlock's credential store; the agent runs plain psql with no password
and its own user name, and Interlock logs in for it. Then the guardrails: a DROP TABLE refused
with a PostgreSQL error naming the rule, a DELETE without WHERE held until a human approves it
(the demo approves it itself and shows the command), customers' e-mail addresses masked in the
rows the agent reads, and the replay of a session, statement by statement."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lab.demo_checks import CHECKS
from lab.instance import INTERLOCK, Instance
from lab.netns import Lab
from lab.postgres import Postgres

POLICY = """\
# PostgreSQL demo policy: one database, the agent never holds its password
targets:
  shop-db:
    address: {addr}
    port: 5432
    credentials: shop-app          # Interlock logs in with this; the agent never sees it
rules:
  - name: no-drops
    target: shop-db
    risk: [drop, truncate]
    decision: deny
    reason: nobody drops tables from an agent
  - name: deletes-need-a-human
    target: shop-db
    risk: [delete-without-where, update-without-where]
    decision: approve
    timeout: 2m
  - name: mask-customer-email
    target: shop-db
    operation: read
    object: [customers]
    decision: mask
    mask: [email]
  - name: unparseable-sql
    operation: unparseable
    decision: deny
default: allow
"""

SETUP = """
CREATE ROLE app LOGIN PASSWORD '{password}';
CREATE DATABASE shop OWNER app;
\\c shop
SET ROLE app;
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, plan text);
INSERT INTO customers VALUES (1, 'Ada Lovelace', 'ada@example.com', 'pro'),
  (2, 'Alan Turing', 'alan@example.org', 'free'), (3, 'Grace Hopper', 'grace@example.net', 'pro');
CREATE TABLE audit_log (id serial PRIMARY KEY, at timestamptz DEFAULT now(), what text);
INSERT INTO audit_log (what) SELECT 'event ' || g FROM generate_series(1, 250) g;
"""


def demo(lab: Lab, say: Callable[[str], None], show: Callable[..., subprocess.CompletedProcess]) -> None:
    """The PostgreSQL chapter, on an existing lab; everything it starts is stopped before it returns."""
    work = Path(tempfile.mkdtemp(prefix="interlock-demo-pg-"))
    pg: Postgres | None = None
    inst: Instance | None = None
    password = secrets.token_urlsafe(18)
    try:
        say(f"PostgreSQL 1. On the server host {lab.b.addr4}: PostgreSQL 15; role 'app' logs in with a password only")
        pg = Postgres(lab.b, hba=["host all app all scram-sha-256"]).start()
        script = work / "setup.sql"
        script.write_text(SETUP.format(password=password))
        r = lab.b.run([str(pg.bindir / "psql"), *pg.client_args(), "-d", "postgres", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                       "-f", str(script)])
        if r.returncode != 0:
            raise RuntimeError(f"setting up the demo database failed: {r.stderr}")
        script.unlink()
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(addr=lab.b.addr4))
        print(policy.read_text())
        inst = Instance(lab.a, "demopg", proxy_port=15021, dns_port=15073, policy=str(policy))

        def cli(*args: str) -> list[str]:
            return [*INTERLOCK, args[0], "--state-dir", str(inst.state_dir), *args[1:]]

        def shown(*args: str) -> str:
            return shlex.join(["interlock", args[0], "--state-dir", str(inst.state_dir), *args[1:]])

        dsn = f"host={lab.b.addr4} user=agent dbname=shop"

        def psql(sql: str) -> tuple[list[str], str]:
            argv = ["psql", dsn, "-X", "-c", sql]
            return cli("run", "--agent", "demo-bot", "--", *argv), shown("run", "--agent", "demo-bot", "--", *argv)

        say("PostgreSQL 2. The database password goes into Interlock's credential store (on stdin, never on a command line)")
        store = ["credentials", "set", "shop-app", "--kind", "postgres", "--field", "user=app"]
        _prompt(f"read -rs PW; printf '%s\\n' \"$PW\" | {shown(*store)}")
        r = lab.a.run(cli(*store), input=password + "\n")
        print((r.stdout + r.stderr).strip())
        CHECKS.succeeded("the password is in the credential store", r)
        CHECKS.succeeded("the store lists it", show(lab.a, cli("credentials", "list"), shown("credentials", "list")),
                         "shop-app")
        inst.start()

        say("PostgreSQL 3. The agent runs psql with its own user name and no password: Interlock logs in for it")
        r = show(lab.a, *psql("select current_user as logged_in_as, count(*) as customers from customers"))
        CHECKS.succeeded("the agent is logged in as 'app' with no password of its own", r, " app ")

        say("PostgreSQL 4. The agent reads customers: e-mail addresses are masked in the rows it gets")
        r = show(lab.a, *psql("select id, name, email, plan from customers order by id"))
        CHECKS.succeeded("the agent reads the customers", r, "Ada Lovelace")
        CHECKS.expect("no e-mail address reaches the agent", "@example." not in r.stdout, r.stdout)

        say("PostgreSQL 5. DROP TABLE: refused with a PostgreSQL error that names the rule; nothing reaches the server")
        CHECKS.refused("DROP TABLE is refused, naming the rule", show(lab.a, *psql("drop table customers")), "no-drops")
        CHECKS.expect("the table is still there (asked on the server)", _query(pg, "select count(*) from customers") == "3")

        say("PostgreSQL 6. DELETE without WHERE needs a human: the agent waits, the server has seen nothing")
        argv, text = psql("delete from audit_log")
        _prompt(f"{text} &")
        held = lab.a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pending = inst.wait_for(lambda: json.loads(inst.cli("approvals", "--json").stdout), timeout=30)
        if not CHECKS.expect("the DELETE is held for a human", bool(pending)):
            held.kill()
            raise RuntimeError("the DELETE was not held for approval")
        show(lab.a, cli("approvals"), shown("approvals"))
        rows = _count(pg)
        print("rows still in audit_log:", rows)
        CHECKS.expect("while held, the server has deleted nothing", rows == "250", rows)
        print("(a human would decide now; the demo approves it itself)")
        CHECKS.succeeded("the approval was taken", show(lab.a, cli("approve", pending[0]["id"]),
                                                         shown("approve", pending[0]["id"])))
        out, _ = held.communicate(timeout=60)
        print(out.rstrip())
        CHECKS.expect("once approved, the DELETE ran", held.returncode == 0 and "DELETE 250" in out, out)
        rows = _count(pg)
        print("rows left in audit_log:", rows)
        CHECKS.expect("the server deleted the rows after the approval", rows == "0", rows)

        say("PostgreSQL 7. The held session, replayed: login, decision, approval, the statement and its result")
        CHECKS.succeeded("the replay shows the approval and the statement",
                         show(lab.a, cli("replay", pending[0]["session"]), shown("replay", pending[0]["session"])),
                         "approval-approved", "delete from audit_log")
        say("PostgreSQL 8. The masked read, replayed: the recording holds no e-mail address either")
        sessions = json.loads(inst.cli("sessions", "--json").stdout)
        masked = [s for s in sessions if s["protocol"] == "postgres"][1]
        r = show(lab.a, cli("replay", masked["id"]), shown("replay", masked["id"]))
        CHECKS.succeeded("the masked read is replayed", r, "MASK")
        CHECKS.expect("the recording holds no e-mail address", "@example." not in r.stdout, r.stdout)
    finally:
        if inst is not None:
            inst.close()
        if pg is not None:
            pg.close()
        shutil.rmtree(work, ignore_errors=True)


def _prompt(text: str) -> None:
    dim, end = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"{dim}$ {text}{end}", flush=True)


def _count(pg: Postgres) -> str:
    return _query(pg, "select count(*) from audit_log")


def _query(pg: Postgres, sql: str) -> str:
    """Asked on the server host as the superuser: the server-side evidence."""
    r = pg.host.run([str(pg.bindir / "psql"), *pg.client_args(), "-d", "shop", "-X", "-A", "-t", "-c", sql])
    return r.stdout.strip()


def main() -> int:
    if os.geteuid() != 0:
        print("the demo must run as root (it loads BPF programs into a throwaway cgroup)", file=sys.stderr)
        return 2
    from lab.demo import say, show

    with Lab("demopg") as lab:
        demo(lab, say, show)
    return CHECKS.summary()


if __name__ == "__main__":
    sys.exit(main())
