"""Read means read, sans-IO: what could make a session read-write, which built-ins write or lock, which
calls the catalog turns into `call` operations, COPY's direction, and which policies grant no write."""

from __future__ import annotations

import pytest

from policy import engine
from policy.engine import Destination
from policy.model import Operation
from proxy.postgres import catalog
from proxy.postgres.catalog import FunctionCatalog, with_calls
from proxy.postgres.statements import WRITE_CAPABLE_ACTIONS, analyze


def risks(sql: str) -> set[str]:
    return {r for op in analyze(sql) for r in op.risks}


READ_WRITE = [
    "SET default_transaction_read_only = off",
    "SET default_transaction_read_only = 'false'",
    "SET default_transaction_read_only = 0",
    "SET default_transaction_read_only TO DEFAULT",
    "SET default_transaction_read_only = $$n$$",
    "SET SESSION default_transaction_read_only = of",
    'SET "default_transaction_read_only" = off',
    "SET transaction_read_only = off",
    "SET LOCAL transaction_read_only TO off",
    "RESET default_transaction_read_only",
    "RESET transaction_read_only",
    "RESET ALL",
    "DISCARD ALL",
    "SET default_transaction_read_only FROM CURRENT",
    "SET TRANSACTION READ WRITE",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "BEGIN ISOLATION LEVEL REPEATABLE READ READ WRITE",
    "START TRANSACTION READ WRITE",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT set_config('transaction_read_only', 'false', true)",
    "SELECT set_config('default_transaction_read_only', $1, false)",
    "SELECT set_config($1, 'off', false)",
    "SELECT set_config(name, 'off', false) FROM names",
    "SELECT 1 WHERE set_config('default_transaction_read_only', 'off', false) IS NOT NULL",
    "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'",
    "UPDATE pg_catalog.pg_settings SET setting = 'off'",
    "ALTER ROLE app SET default_transaction_read_only = off",
    "ALTER ROLE ALL IN DATABASE d SET default_transaction_read_only = off",
    "ALTER ROLE app RESET ALL",
    "ALTER DATABASE d SET default_transaction_read_only = off",
    "ALTER DATABASE d RESET default_transaction_read_only",
    "SELECT 1; SET default_transaction_read_only = off",
    "WITH x AS (SELECT set_config('transaction_read_only', 'off', true)) SELECT * FROM x",
]

STAYS_READ_ONLY = [
    "SET default_transaction_read_only = on",
    "SET default_transaction_read_only = true",
    "SET transaction_read_only = 1",
    "SET TRANSACTION READ ONLY",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "BEGIN",
    "BEGIN READ ONLY",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET search_path = public",
    "RESET search_path",
    "DISCARD TEMP",
    "SELECT set_config('default_transaction_read_only', 'on', false)",
    "SELECT set_config('search_path', 'x', false)",
    "ALTER ROLE app SET search_path = x",
    "SELECT * FROM t",
]


@pytest.mark.parametrize("sql", READ_WRITE)
def test_read_write_switches_are_flagged(sql):
    assert "read-write" in risks(sql)


@pytest.mark.parametrize("sql", STAYS_READ_ONLY)
def test_read_only_keeping_statements_are_not(sql):
    assert "read-write" not in risks(sql)


@pytest.mark.parametrize("sql,flag", [
    ("SELECT nextval('s')", "sequence-write"),
    ("SELECT pg_catalog.setval('s', 10)", "sequence-write"),
    ("SELECT * FROM t WHERE id = nextval('s')", "sequence-write"),
    ("SELECT lo_create(0)", "large-object"),
    ("SELECT lo_from_bytea(0, 'x')", "large-object"),
    ("SELECT lowrite(lo_open(1, 131072), 'x')", "large-object"),
    ("SELECT lo_unlink(1)", "large-object"),
    ("SELECT pg_advisory_lock(1)", "advisory-lock"),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", "advisory-lock"),
    ("SELECT * FROM t FOR UPDATE", "row-lock"),
    ("SELECT * FROM t FOR NO KEY UPDATE NOWAIT", "row-lock"),
    ("SELECT * FROM t FOR KEY SHARE", "row-lock"),
    ("SELECT set_config('a.b', 'c', false)", "set-config"),
    ("SELECT pg_notify('ch', 'x')", "notify"),
    ("NOTIFY ch", "notify"),
])
def test_builtins_that_write_or_lock_raise_flags(sql, flag):
    assert flag in risks(sql)


def test_row_locks_are_a_lock_of_their_tables():
    ops = analyze("SELECT * FROM a JOIN b USING (id) FOR UPDATE OF a")
    assert [(o.action, o.objects) for o in ops] == [("read", ("a", "b")), ("lock", ("a",))]
    assert analyze("LOCK TABLE t")[0].action == "lock"


def test_copy_to_is_a_read_and_copy_from_an_insert():
    assert [(o.action, o.objects) for o in analyze("COPY t TO STDOUT")] == [("read", ("t",))]
    assert [(o.action, o.objects) for o in analyze("COPY t (a, b) FROM STDIN")] == [("insert", ("t",))]
    ops = analyze("COPY (SELECT * FROM a JOIN b USING (id)) TO STDOUT")
    assert {o.action for o in ops} == {"read"} and set(ops[0].objects) == {"a", "b"}
    assert analyze("COPY t TO STDOUT")[0].attributes["direction"] == "to"


# ---- the catalog ---------------------------------------------------------------------------------

FREE = FunctionCatalog(["lower", "count", "now", "random", "coalesce_stub"])


def calls(sql: str, cat: FunctionCatalog = FREE) -> list[tuple[str, tuple, tuple]]:
    return [(o.action, o.objects, o.risks) for o in with_calls(analyze(sql), cat) if o.action == "call"]


@pytest.mark.parametrize("sql", [
    "SELECT wipe()", "SELECT * FROM t WHERE wipe()", "SELECT * FROM wipe()", "VALUES (wipe())",
    "SELECT lower(wipe()::text)", "SELECT count(*) FROM t GROUP BY wipe()", "SELECT (SELECT wipe())",
    "WITH x AS (SELECT wipe()) SELECT * FROM x", "SELECT * FROM t ORDER BY wipe()",
    "INSERT INTO t SELECT wipe()", "EXPLAIN ANALYZE SELECT wipe()", "COPY (SELECT wipe()) TO STDOUT",
    "COPY t FROM STDIN WHERE wipe()", "CALL wipe()", "SELECT 1; SELECT wipe()",
])
def test_a_function_not_known_free_of_side_effects_is_a_call(sql):
    assert ("call", ("wipe",), ()) in calls(sql)


def test_known_built_ins_are_not_calls_and_qualification_counts():
    assert calls("SELECT lower(v), count(*), now(), random() FROM t") == []
    assert calls("SELECT pg_catalog.lower('X')") == []
    assert calls("SELECT public.lower('X')") == [("call", ("public.lower",), ())]
    assert calls('SELECT "Lower"(\'X\')') == [("call", ("Lower",), ())]
    # built-ins that write carry their flags on the call too
    assert calls("SELECT nextval('s')") == [("call", ("nextval",), ("sequence-write",))]
    assert calls("SELECT lo_create(0), lo_create(1)") == [("call", ("lo_create",), ("large-object",))]
    # a catalog that could not be read knows nothing: every function is a call
    assert [c[1] for c in calls("SELECT lower('x')", FunctionCatalog())] == [("lower",)]


def test_prepared_statements_carry_their_calls():
    from proxy.postgres.statements import SqlAnalyzer

    a = SqlAnalyzer()
    a.register_prepared("p", "SELECT * FROM t WHERE wipe()")
    ops = with_calls(a.analyze("EXECUTE p"), FREE)
    assert ("call", ("wipe",)) in [(o.action, o.objects) for o in ops]


def test_defining_a_function_forgets_its_name_everywhere():
    catalog._shared.clear()
    key = ("10.0.0.1", 5432, "db")
    cat = catalog.store(key, ["lower", "upper"])
    assert catalog.cached(key) is cat
    assert catalog.defines_functions(analyze("SELECT 1")) is None
    names = catalog.defines_functions(analyze("CREATE FUNCTION public.lower(int) RETURNS int LANGUAGE sql AS 'select 1'"))
    assert names == ["lower"]
    assert catalog.defines_functions(analyze("DO $$BEGIN END$$")) == []
    catalog.forget()
    assert catalog.cached(key) is None
    stale = catalog.store(key, ["lower"])
    stale.loaded -= catalog.CATALOG_TTL + 1
    assert catalog.cached(key) is None


def test_catalog_query_asks_for_non_volatile_built_ins_only():
    q = catalog.CATALOG_QUERY
    assert "provolatile <> 'v'" in q and "nspname = 'pg_catalog'" in q and "bool_and" in q


# ---- which policies grant no write ---------------------------------------------------------------

DEST = Destination("10.0.0.5", 5432, (), "postgres")


def _policy(text: str) -> engine.Policy:
    return engine.load("p.yaml", "targets:\n  db: {address: 10.0.0.5, port: 5432}\n  other: {address: 10.9.9.9}\n" + text)


@pytest.mark.parametrize("rules,writes", [
    ("rules: [{operation: read, decision: allow}]", False),
    ("rules: [{operation: [connect, read, transaction, set, explain], decision: allow}]", False),
    ("rules: [{operation: read, decision: mask, mask: [email]}]", False),
    ("rules: [{operation: read, decision: allow}, {operation: '*', decision: deny}]", False),
    ("rules: [{operation: '*', decision: allow, agent: someone-else}]", False),
    ("rules: [{operation: '*', decision: allow, target: other}]", False),
    ("rules: [{operation: '*', decision: allow, protocol: http}]", False),
    ("rules: [{operation: '*', decision: allow, path: '/x'}]", False),
    ("rules: [{operation: read, decision: allow}]\ndefault: allow", True),
    ("rules: [{operation: '*', decision: allow}]", True),
    ("rules: [{operation: insert, object: logs, decision: allow}]", True),
    ("rules: [{operation: call, object: safe_fn, decision: allow}]", True),
    ("rules: [{operation: delete, decision: approve}]", True),
    ("rules: [{operation: 'up*', decision: allow, agent: group:bots}]", True),
    ("rules: [{operation: '*', decision: mask, mask: [email], target: db}]", True),
    ("rules: [{risk: [drop], decision: allow}]", True),
])
def test_may_permit_a_write(rules, writes):
    pol = _policy("agents:\n  bot: {groups: [bots]}\n" + rules)
    assert pol.may_permit("bot", DEST, "postgres", WRITE_CAPABLE_ACTIONS) is writes


def test_every_action_the_analyzer_emits_is_judged_as_read_or_write():
    emitted = {o.action for sql in READ_WRITE + STAYS_READ_ONLY + [
        "INSERT INTO t VALUES (1)", "DELETE FROM t", "UPDATE t SET a = 1", "CREATE TABLE x (a int)", "DROP TABLE x",
        "TRUNCATE t", "GRANT SELECT ON t TO r", "REVOKE SELECT ON t FROM r", "LOCK t", "CALL p()", "DO $$ $$",
        "VACUUM t", "EXPLAIN SELECT 1", "COPY t FROM STDIN", "REFRESH MATERIALIZED VIEW v", "selec"]
        for o in analyze(sql)}
    reads = {"read", "explain", "set", "transaction"}
    assert emitted - reads <= set(WRITE_CAPABLE_ACTIONS)
    assert not reads & set(WRITE_CAPABLE_ACTIONS)
    assert isinstance(Operation("postgres", "call"), Operation)
