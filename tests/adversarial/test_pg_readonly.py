"""A read-only agent cannot change a PostgreSQL server: not by a statement, a function, COPY or a setting.

The agent `ro` may only `read` (and open transactions and SET things) on the lab's PostgreSQL 15; the
agent `rw` may do anything. Both run a corpus of write attempts through the capture path, as an
unprivileged user (uid 65533), with psql and psycopg (prepare=True included): user functions that
delete (in the select list, in WHERE, in FROM, behind a view or an operator), sequence and large-object
built-ins, every way to make the session read-write (SET, RESET, set_config, BEGIN/SET TRANSACTION
READ WRITE, SET SESSION CHARACTERISTICS, RESET ALL, DISCARD ALL, UPDATE pg_settings, startup options,
ALTER ROLE/DATABASE ... SET), row locks, COPY FROM, DO blocks, CTEs with DELETE, CALL, EXPLAIN ANALYZE
and PREPARE/EXECUTE.

After every attempt the server's whole state is dumped as the superuser, directly on the server host
(pg_dump of the database with its large objects, sequences and the xmin/xmax of every row, plus
pg_db_role_setting): for `ro` it never changes, and every attempt is on record as refused (by the policy
or by the server); for `rw` (the control) every attempt changes it, so none of them is a no-op that
would pass for a refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lab.instance import INTERLOCK, Instance
from lab.postgres import PG_BIN, Postgres
from lab.testing import SLOWDOWN, instance_name, wait_until
from recorder.store import read_events, read_sessions

pytestmark = pytest.mark.datapath
REPO = Path(__file__).resolve().parents[2]
UNPRIVILEGED = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups", "env", "HOME=/nonexistent"]
DB = "ro"

POLICY = """\
agents:
  ro: {{}}
  rw: {{}}
targets:
  db:
    address: {b4}
    port: 5432
rules:
  - name: rw-does-anything
    agent: rw
    decision: allow
  - name: ro-reads
    agent: ro
    target: db
    operation: [connect, read, transaction, set]
    decision: allow
default: deny
"""

SETUP = """\
SET ROLE app;
CREATE TABLE t1 (id int PRIMARY KEY, v text);
INSERT INTO t1 SELECT g, 'row ' || g FROM generate_series(1, 5) g;
CREATE SEQUENCE s1;
CREATE FUNCTION wipe() RETURNS boolean LANGUAGE plpgsql AS $$BEGIN DELETE FROM t1; RETURN true; END$$;
CREATE PROCEDURE wipe_proc() LANGUAGE sql AS $$DELETE FROM t1$$;
CREATE VIEW wipe_view AS SELECT wipe() AS w;
CREATE FUNCTION wipe_op(int, int) RETURNS boolean LANGUAGE plpgsql AS $$BEGIN DELETE FROM t1; RETURN true; END$$;
CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = wipe_op);
SELECT lo_from_bytea(4242, 'large object');
"""

# What the superuser sees; anything an attempt changed shows here.
STATE = """\
SELECT 'row', id, v, xmin::text, xmax::text FROM t1 ORDER BY id;
SELECT 'seq', last_value, is_called FROM s1;
SELECT 'lo', count(*), string_agg(oid::text, ',' ORDER BY oid) FROM pg_largeobject_metadata;
SELECT 'role-setting', setdatabase, setrole, setconfig::text FROM pg_db_role_setting ORDER BY 2, 3;
"""

VIEW = "SELECT * FROM wipe_view;"  # a write only the server can see (the view calls wipe())

# (name, psql input) — each runs in its own psql session, statements one by one, errors ignored.
PSQL: list[tuple[str, str]] = [
    ("select-list", "SELECT wipe();"),
    ("where", "SELECT * FROM t1 WHERE wipe();"),
    ("from", "SELECT * FROM wipe();"),
    ("values", "VALUES (wipe());"),
    ("qualified", "SELECT public.wipe();"),
    ("quoted", 'SELECT "wipe"();'),
    ("cast", "SELECT wipe()::text;"),
    ("view", VIEW),
    ("operator", "SELECT 1 === 1;"),
    ("nextval", "SELECT nextval('s1');"),
    ("setval", "SELECT pg_catalog.setval('s1', 1000);"),
    ("nextval-where", "SELECT * FROM t1 WHERE id = nextval('s1');"),
    ("lo_create", "SELECT lo_create(0);"),
    ("lo_from_bytea", "SELECT lo_from_bytea(0, decode('41', 'hex'));"),
    ("lo_put", "SELECT lo_put(4242, 0, decode('ff', 'hex'));"),
    ("lo_unlink", "SELECT lo_unlink(4242);"),
    ("lowrite", "BEGIN; SELECT lowrite(lo_open(4242, 131072), decode('ee', 'hex')); COMMIT;"),
    ("set_config-session", "SELECT set_config('default_transaction_read_only', 'off', false); " + VIEW),
    ("set_config-tx", "BEGIN; SELECT set_config('transaction_read_only', 'off', true); " + VIEW + " COMMIT;"),
    ("set-off", "SET default_transaction_read_only = off; " + VIEW),
    ("set-false-quoted", "SET default_transaction_read_only = 'false'; " + VIEW),
    ("set-default", "SET default_transaction_read_only TO DEFAULT; " + VIEW),
    ("reset", "RESET default_transaction_read_only; " + VIEW),
    ("reset-all", "RESET ALL; " + VIEW),
    ("discard-all", "DISCARD ALL; " + VIEW),
    ("session-characteristics", "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; " + VIEW),
    ("begin-read-write", "BEGIN READ WRITE; " + VIEW + " COMMIT;"),
    ("start-read-write", "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE; " + VIEW + " COMMIT;"),
    ("set-transaction", "BEGIN; SET TRANSACTION READ WRITE; " + VIEW + " COMMIT;"),
    ("set-local", "BEGIN; SET LOCAL transaction_read_only = off; " + VIEW + " COMMIT;"),
    ("update-pg_settings", "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'; "
     + VIEW),
    ("alter-role", "ALTER ROLE app SET default_transaction_read_only = off;"),
    ("alter-database", f"ALTER DATABASE {DB} SET default_transaction_read_only = off;"),
    ("for-update", "BEGIN; SELECT * FROM t1 FOR UPDATE; COMMIT;"),
    ("for-share", "BEGIN; SELECT * FROM t1 WHERE id = 1 FOR SHARE; COMMIT;"),
    ("copy-from", "COPY t1 FROM STDIN;\n100\tcopied\n\\.\n"),
    ("do", "DO $$BEGIN DELETE FROM t1; END$$;"),
    ("cte", "WITH d AS (DELETE FROM t1 RETURNING *) SELECT count(*) FROM d;"),
    ("call", "CALL wipe_proc();"),
    ("explain-analyze", "EXPLAIN ANALYZE SELECT wipe();"),
    ("prepare-execute", "PREPARE p AS SELECT wipe(); EXECUTE p;"),
    ("delete", "DELETE FROM t1 WHERE id > 0;"),
]
# (name, PGOPTIONS, psql input)
PSQL_OPTIONS: list[tuple[str, str, str]] = [
    ("pgoptions", "-c default_transaction_read_only=off", VIEW),
    ("pgoptions-long", "--default-transaction-read-only=0", VIEW),
]
# (name, keyword arguments of psycopg.connect, Python lines using `conn` and `attempt(sql, params, prepare)`)
PSYCOPG: list[tuple[str, dict, str]] = [
    ("py-select", {}, "attempt('SELECT wipe()')"),
    ("py-where-prepared", {}, "attempt('SELECT * FROM t1 WHERE wipe()', prepare=True)"),
    ("py-select-prepared", {}, "attempt('SELECT wipe()', prepare=True)"),
    ("py-view-prepared", {}, f"attempt({VIEW!r}, prepare=True)"),
    ("py-nextval-prepared", {}, "attempt('SELECT nextval(%s)', ['s1'], prepare=True)"),
    ("py-lo-prepared", {}, "attempt('SELECT lo_create(%s)', [0], prepare=True)"),
    ("py-set_config-params", {},
     f"attempt('SELECT set_config(%s, %s, false)', ['default_transaction_read_only', 'off'])\nattempt({VIEW!r})"),
    ("py-options", {"options": "-c default_transaction_read_only=off"}, f"attempt({VIEW!r})"),
    ("py-transaction", {"autocommit": False}, "attempt('SELECT wipe()')\nconn.commit()"),
    ("py-copy", {}, "with conn.cursor().copy('COPY t1 FROM STDIN') as cp:\n    cp.write_row((200, 'y'))"),
]

PY_TEMPLATE = """\
import json, psycopg
kw = {kwargs}
kw.setdefault("autocommit", True)
errors = []
try:
    conn = psycopg.connect({dsn!r}, **kw)
except Exception as e:
    print(json.dumps({{"connected": False, "errors": [str(e)[:300]]}}))
    raise SystemExit
def attempt(sql, params=None, prepare=None):
    try:
        conn.execute(sql, params, prepare=prepare)
    except Exception as e:
        errors.append(str(e)[:300])
        if not conn.autocommit:
            conn.rollback()
try:
{body}
except Exception as e:
    errors.append(str(e)[:300])
print(json.dumps({{"connected": True, "errors": errors}}))
"""


def _psql_su(pg: Postgres, sql: str, db: str = DB, *, stop: bool = True):
    cmd = [str(PG_BIN / "psql"), *pg.client_args(), "-d", db, "-X", "-A", "-t", "-q", "-f", "-"]
    if stop:
        cmd[1:1] = ["-v", "ON_ERROR_STOP=1"]
    r = pg.host.run(cmd, input=sql, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def state(pg: Postgres) -> str:
    """pg_dump of the database (schema, data, sequences, large objects) and the rows' xmin/xmax."""
    r = pg.host.run([str(PG_BIN / "pg_dump"), *pg.client_args(), "--no-comments", "--restrict-key=interlocktest", DB], timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout + _psql_su(pg, STATE)


def reset(pg: Postgres) -> None:
    _psql_su(pg, f"DROP DATABASE IF EXISTS {DB} WITH (FORCE);", "postgres")
    _psql_su(pg, f"CREATE DATABASE {DB} OWNER app; ALTER ROLE app RESET ALL;", "postgres")
    _psql_su(pg, SETUP)


@pytest.fixture(scope="module")
def pg(lab):
    server = Postgres(lab.b, port=5432)
    try:
        server.start()
        server.psql("CREATE ROLE app LOGIN")
        reset(server)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def inst(lab, pg, tmp_path_factory):
    policy = tmp_path_factory.mktemp("ropolicy") / "policy.yaml"
    policy.write_text(POLICY.format(b4=lab.b.addr4))
    i = Instance(lab.a, instance_name("pgro"), proxy_port=15711, dns_port=15763, policy=str(policy))
    try:
        i.start()
        yield i
    finally:
        i.close()


def _dsn(lab) -> str:
    return f"host={lab.b.addr4} port=5432 user=app dbname={DB}"


def run_attempt(inst: Instance, lab, agent: str, kind: str, item: tuple):
    """One attempt as an unprivileged agent; what the client printed."""
    timeout = 60 * SLOWDOWN
    if kind == "psql":
        _, sql = item
        cmd = ["psql", _dsn(lab), "-X", "-A", "-t", "-f", "-"]
        return inst.agent([*UNPRIVILEGED, *cmd], agent=agent, input=sql, timeout=timeout)
    if kind == "options":
        _, options, sql = item
        cmd = ["env", f"PGOPTIONS={options}", "psql", _dsn(lab), "-X", "-A", "-t", "-f", "-"]
        return inst.agent([*UNPRIVILEGED, *cmd], agent=agent, input=sql, timeout=timeout)
    _, kwargs, body = item
    src = PY_TEMPLATE.format(kwargs=repr(kwargs), dsn=_dsn(lab), body=textwrap.indent(body, "    "))
    return inst.agent([*UNPRIVILEGED, sys.executable, "-"], agent=agent, input=src, timeout=timeout, cwd=REPO)


CORPUS = [("psql", i) for i in PSQL] + [("options", i) for i in PSQL_OPTIONS] + [("psycopg", i) for i in PSYCOPG]


def refusals(inst: Instance) -> int:
    """Refusals on record: denied decisions, and statements the server failed."""
    events = read_events(inst.state_dir / "recorder.db", None, limit=1_000_000)
    denied = sum(1 for e in events if e["kind"] == "decision" and e["data"].get("verdict") == "deny")
    failed = sum(1 for e in events if e["kind"] == "statement" and e["data"].get("error"))
    return denied + failed


def n_sessions(inst: Instance) -> int:
    return len(read_sessions(inst.state_dir / "recorder.db", limit=1_000_000))


def run_corpus(inst: Instance, lab, pg: Postgres, agent: str) -> dict[str, dict]:
    """Every attempt, with the server's state compared before and after it (and restored if changed)."""
    out: dict[str, dict] = {}
    before = state(pg)
    for kind, item in CORPUS:
        name = item[0]
        seen = refusals(inst)
        sessions = n_sessions(inst)
        r = run_attempt(inst, lab, agent, kind, item)
        if "Connection refused" in r.stdout + r.stderr and n_sessions(inst) == sessions:
            # The capture path's backstop reset this connection before the proxy saw it (a race in
            # `interlock run`, reported separately): nothing reached the server; try once more.
            r = run_attempt(inst, lab, agent, kind, item)
        after = state(pg)
        changed = after != before
        out[name] = {"changed": changed, "recorded": refusals(inst) > seen, "rc": r.returncode,
                     "stdout": r.stdout[-600:], "stderr": r.stderr[-600:]}
        if "Connection refused" in r.stdout + r.stderr:
            out[name]["debug"] = {"sessions": inst.sessions()[-2:], "events": inst.events()[-6:],
                                  "pglog": pg.log.read_text()[-1500:],
                                  "ss": lab.a.run(["ss", "-tanp"]).stdout[-3000:],
                                  "dmesg": lab.a.run(["dmesg"]).stdout[-1000:]}
        if changed:
            reset(pg)
            before = state(pg)
    return out


@pytest.mark.timeout(int(1800 * SLOWDOWN))  # 2 x 54 client runs, each followed by a dump of the server
def test_read_only_agent_cannot_change_the_server(inst, lab, pg):
    results = run_corpus(inst, lab, pg, "ro")
    changed = {k: v for k, v in results.items() if v["changed"]}
    print(f"read-only agent: {len(changed)} of {len(results)} attempts changed the server")
    assert not changed, json.dumps(changed, indent=1)
    unrecorded = {k: v for k, v in results.items() if not v["recorded"]}
    assert not unrecorded, json.dumps(unrecorded, indent=1)
    # The sessions were opened read-only, and said so on record.
    logins = [e["data"] for e in read_events(inst.state_dir / "recorder.db", "postgres-login", limit=100_000)]
    assert logins and all(d.get("read_only") for d in logins), logins[-3:]

    # Control, same instance, same corpus: an agent the policy lets write changes the server with each.
    control = run_corpus(inst, lab, pg, "rw")
    unchanged = {k: v for k, v in control.items() if not v["changed"]}
    print(f"write-allowed agent: {len(control) - len(unchanged)} of {len(control)} attempts changed the server")
    assert not unchanged, json.dumps(unchanged, indent=1) + inst.log.read_text()[-6000:]


def test_read_only_agent_still_reads(inst, lab, pg):
    """The read-only session is usable: reads, built-in functions, transactions, SET of other settings."""
    sql = ("SET search_path = public; BEGIN; SELECT count(*), lower('X'), now() IS NOT NULL FROM t1; COMMIT;"
           "SELECT v FROM t1 WHERE id = 2; COPY t1 TO STDOUT; SHOW transaction_read_only;")
    r = run_attempt(inst, lab, "ro", "psql", ("reads", sql))
    assert r.returncode == 0, r.stderr + inst.log.read_text()[-3000:] + json.dumps(inst.events()[-8:]) + json.dumps(inst.sessions()[-2:])
    lines = r.stdout.split()
    assert "5|x|t" in lines and "row" in r.stdout and lines[-1] == "on", r.stdout
    assert "refused" not in r.stderr, r.stderr


# ---- the embedded default policy: the agent's own relations are its own to drop ------------------

def _agent_popen(inst: Instance, lab, sql: str):
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--", *UNPRIVILEGED,
           "psql", _dsn(lab), "-X", "-A", "-t", "-q", "-f", "-"]
    p = inst.host.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write(sql)
    p.stdin.close()
    p.stdin = None  # written and closed: communicate() only reads
    return p


def _approvals(inst: Instance) -> list[dict]:
    return json.loads(inst.cli("approvals", "--json").stdout)


def test_default_policy_lets_an_agent_drop_only_what_it_created(make_instance, lab, pg):
    inst = make_instance("pgdef", proxy_port=15712, dns_port=15764)  # no policy: the embedded default
    _psql_su(pg, "SET ROLE app; CREATE TABLE keep (a int); INSERT INTO keep VALUES (1);")
    own = ("CREATE TABLE mine (a int); INSERT INTO mine VALUES (1); TRUNCATE mine; DROP TABLE mine;\n"
           "CREATE TEMP TABLE scratch (a int); TRUNCATE scratch; DROP TABLE scratch;\n"
           "BEGIN; CREATE TABLE tx_mine (a int); DROP TABLE tx_mine; COMMIT;\n"
           "CREATE TABLE made AS SELECT 1 AS a; DROP TABLE made; SELECT 'done';\n")
    p = _agent_popen(inst, lab, own)
    out, err = p.communicate(timeout=60 * SLOWDOWN)
    assert p.returncode == 0 and out.strip() == "done", err
    assert not _approvals(inst)
    drops = [e["data"] for e in inst.events("decision") if e["data"]["action"] in ("drop", "truncate")]
    assert len(drops) >= 5 and all(d["verdict"] == "allow" for d in drops), drops

    # Not its own: a table that was there (its CREATE failed), one whose creation was rolled back,
    # one created IF NOT EXISTS: each drop waits for a human, who refuses it.
    for sql in ("CREATE TABLE keep (a int);\nDROP TABLE keep;\nSELECT 'after';\n",
                "BEGIN; CREATE TABLE keep2 (a int); ROLLBACK;\nDROP TABLE keep2;\nSELECT 'after';\n",
                "CREATE TABLE IF NOT EXISTS keep (a int);\nTRUNCATE keep;\nSELECT 'after';\n"):
        p = _agent_popen(inst, lab, sql)
        held = wait_until(lambda: _approvals(inst), timeout=30)
        assert held and held[0]["rule"] == "hold-drops", held
        assert inst.cli("deny", held[0]["id"], "--reason", "not yours").returncode == 0
        out, err = p.communicate(timeout=60 * SLOWDOWN)
        assert "not approved (denied) under rule 'hold-drops'" in err and out.strip().endswith("after"), err
    assert _psql_su(pg, "SELECT count(*) FROM keep").strip() == "1"
