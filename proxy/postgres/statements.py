"""SQL text → policy Operations, by parsing with PostgreSQL's own grammar (pglast).

The aim is to describe what will actually run, not what the text looks like:

- every statement of a multi-statement string gets its own Operation(s);
- writes hidden in CTEs (`WITH d AS (DELETE ...) SELECT ...`), in `INSERT ... ON CONFLICT DO
  UPDATE`, in `COPY (DELETE ... RETURNING ...) TO`, in `EXPLAIN ANALYZE` (which executes) and in
  SQL strings passed to functions that run them (dblink, query_to_xml, ...) become Operations of
  their own, with `attributes["via"]` saying where they were found;
- tables a write reads from (`INSERT INTO pub SELECT * FROM secrets`) become a "read" Operation;
- what cannot be seen is flagged, never guessed: DO blocks and procedural function bodies carry
  "opaque-code", EXECUTE of a statement this session has not seen too, and text the parser
  rejects becomes a single "unparseable" Operation for the policy to refuse.

Actions: read insert update delete create alter drop truncate grant revoke lock call set
transaction explain do other unparseable. COPY TO is a `read` of its table or query, COPY FROM an
`insert` (attribute direction=to/from); COPY TO a server file or program is also a `copy`. `SELECT ... FOR UPDATE/SHARE` and LOCK are also a `lock`
of their tables.
Risks: delete-without-where update-without-where drop truncate privilege-change
server-file-access program-execution opaque-code dynamic-sql network-access server-control
server-config credential-access sequence-write large-object advisory-lock row-lock set-config
notify read-write (WHERE clauses that are always true, like `WHERE 1=1`, count as missing).
`read-write` marks what could switch a transaction or session to read-write (SET/RESET/set_config
of default_transaction_read_only or transaction_read_only, BEGIN/SET TRANSACTION ... READ WRITE,
SET SESSION CHARACTERISTICS, RESET ALL, DISCARD ALL, ALTER ROLE/DATABASE ... SET, UPDATE
pg_settings): the relay refuses it in sessions it opened read-only.

Attributes (all str): statement (index in the string), node (parser node name), via, functions
(comma-separated, as written), object_type, setting, language, prepared, transaction, explain,
lock, cursor.

Limits: triggers, rules, and user functions run code the text does not show; the `functions`
attribute names every call so a policy can allow-list them.
"""

from __future__ import annotations

import decimal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pglast
from pglast import ast

from policy import detectors
from policy.model import Operation

PROTOCOL = "postgres"
SUMMARY_LIMIT = 1000
# pglast builds its Python tree recursively in C: a left-deep expression ("1+1+1+...", 2 chars a
# level) overflows an 8 MiB stack at about 25k levels and kills the process. Text up to
# INLINE_PARSE_LIMIT cannot get near that; longer text is analyzed on a thread with BIG_STACK,
# and text over DEFAULT_MAX_SQL_LENGTH is refused as unparseable (worst case there: ~6 s of CPU).
INLINE_PARSE_LIMIT = 16 * 1024
BIG_STACK = 512 * 1024 * 1024
DEFAULT_MAX_SQL_LENGTH = 1024 * 1024

# --------------------------------------------------------------------------------------------
# Function knowledge

# Functions that read or write files on the database server (core and adminpack).
FILE_FUNCTIONS = frozenset({
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir",
    "pg_ls_replslotdir", "pg_file_write", "pg_file_rename", "pg_file_unlink", "pg_file_sync", "pg_logdir_ls",
    "pg_file_read", "pg_file_length", "lo_import", "lo_export",
})
# Functions that execute SQL given as text: name → index of the SQL argument (-1: the last text arg).
SQL_FUNCTIONS: dict[str, int] = {
    "dblink": -1, "dblink_exec": -1, "dblink_send_query": 1, "dblink_open": -1,
    "query_to_xml": 0, "query_to_xmlschema": 0, "query_to_xml_and_xmlschema": 0,
    "ts_stat": 0, "ts_rewrite": 1, "crosstab": 0, "crosstab2": 0, "crosstab3": 0, "crosstab4": 0,
    "pg_background_launch": 0, "xpath_table": -1,
}
# Functions that dump whole tables, schemas or databases by name.
BULK_READ_FUNCTIONS = frozenset({"table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema",
                                 "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema",
                                 "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema"})
NETWORK_FUNCTIONS = frozenset({"dblink", "dblink_exec", "dblink_connect", "dblink_connect_u", "dblink_send_query",
                               "dblink_open"})
SERVER_CONTROL_FUNCTIONS = frozenset({
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_switch_wal", "pg_create_restore_point", "pg_drop_replication_slot", "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot", "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_log_backend_memory_contexts",
    "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup",
})
CREDENTIAL_RELATIONS = frozenset({"pg_authid", "pg_shadow", "pg_user_mapping", "pg_user_mappings"})
UNTRUSTED_LANGUAGES = frozenset({"plpythonu", "plpython2u", "plpython3u", "plperlu", "pltclu", "plsh", "plr",
                                 "c", "internal", "plv8u", "pljavau"})
RISKY_EXTENSIONS = {
    "dblink": ("network-access", "dynamic-sql"), "postgres_fdw": ("network-access",),
    "adminpack": ("server-file-access",), "file_fdw": ("server-file-access",),
    "pg_background": ("dynamic-sql",), "lo": ("server-file-access",),
    **{lang: ("program-execution",) for lang in UNTRUSTED_LANGUAGES},
}
PROGRAM_SETTINGS = frozenset({"archive_command", "restore_command", "archive_cleanup_command", "recovery_end_command",
                              "ssl_passphrase_command", "shared_preload_libraries", "local_preload_libraries",
                              "session_preload_libraries", "dynamic_library_path", "archive_library"})
ROLE_SETTINGS = frozenset({"role", "session_authorization"})
PREDEFINED_ROLE_RISKS = {
    "pg_read_server_files": ("server-file-access",), "pg_write_server_files": ("server-file-access",),
    "pg_execute_server_program": ("program-execution",), "pg_signal_backend": ("server-control",),
}

# Built-ins that change state or take locks; the rest of a function's story (user-defined or
# volatile) is the catalog's (proxy/postgres/catalog.py), which turns such calls into `call`s.
SEQUENCE_WRITE_FUNCTIONS = frozenset({"nextval", "setval"})
LARGE_OBJECT_FUNCTIONS = frozenset({
    "lo_creat", "lo_create", "lo_open", "lo_close", "loread", "lowrite", "lo_lseek", "lo_lseek64", "lo_tell",
    "lo_tell64", "lo_truncate", "lo_truncate64", "lo_unlink", "lo_import", "lo_export", "lo_from_bytea", "lo_put",
    "lo_get",
})
ADVISORY_LOCK_PREFIXES = ("pg_advisory_", "pg_try_advisory_")
NOTIFY_FUNCTIONS = frozenset({"pg_notify"})
# Settings whose "off" makes a transaction or the session's later transactions read-write.
READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})
_TRUE_WORDS = frozenset({"on", "true", "yes", "1", "t", "y"})


def function_risks(name: str) -> tuple[str, ...]:
    """Risk flags a call to this built-in raises by its name alone (schema part ignored)."""
    base = name.rsplit(".", 1)[-1].lower()
    out = []
    if base in SEQUENCE_WRITE_FUNCTIONS:
        out.append("sequence-write")
    if base in LARGE_OBJECT_FUNCTIONS:
        out.append("large-object")
    if base.startswith(ADVISORY_LOCK_PREFIXES):
        out.append("advisory-lock")
    if base == "set_config":
        out.append("set-config")
    if base in NOTIFY_FUNCTIONS:
        out.append("notify")
    return tuple(out)


def _keeps_read_only(value: ast.Node | None) -> bool:
    """Whether a setting value is a constant that PostgreSQL reads as true (anything else, a
    parameter or an expression included, might be false)."""
    c = _const(value)
    if c is None:
        return False
    kind, v = c
    if kind == "bool":
        return bool(v)
    if kind == "num":
        return v == 1
    return kind == "str" and str(v).strip().lower() in _TRUE_WORDS


def _switches_read_write(stmt: ast.VariableSetStmt) -> bool:
    """Whether a SET/RESET could leave a transaction or the session read-write."""
    kind = _enum_name(stmt.kind)
    name = (stmt.name or "").lower()
    if kind == "VAR_RESET_ALL":
        return True
    if kind == "VAR_SET_MULTI":  # SET TRANSACTION / SET SESSION CHARACTERISTICS AS TRANSACTION
        return any(isinstance(d, ast.DefElem) and d.defname == "transaction_read_only" and not _keeps_read_only(d.arg)
                   for d in stmt.args or ())
    if name not in READ_ONLY_SETTINGS:
        return False
    if kind != "VAR_SET_VALUE" or not stmt.args or len(stmt.args) != 1:
        return True  # RESET, SET ... TO DEFAULT, FROM CURRENT
    return not _keeps_read_only(stmt.args[0])


WRITE_NODES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_WRITE_ACTIONS = frozenset({"insert", "update", "delete", "create", "alter", "drop", "truncate", "copy", "call", "lock"})
# Actions that may change the server, for deciding whether a policy grants an agent any write
# (then its sessions are not opened read-only): everything but read, explain, set, transaction.
WRITE_CAPABLE_ACTIONS = ("insert", "update", "delete", "create", "alter", "drop", "truncate", "grant", "revoke",
                         "lock", "call", "copy", "do", "other", "function-call", "unparseable")


# --------------------------------------------------------------------------------------------
# Tree scanning


@dataclass
class _Scan:
    """What one statement touches, gathered by walking its tree."""

    reads: dict[str, None] = field(default_factory=dict)
    functions: dict[str, None] = field(default_factory=dict)
    risks: dict[str, None] = field(default_factory=dict)
    nested: list[Operation] = field(default_factory=list)

    def risk(self, *names: str) -> None:
        for n in names:
            self.risks[n] = None


@dataclass(frozen=True)
class _Ctx:
    index: int
    summary: str
    via: str = ""
    extra: tuple[tuple[str, str], ...] = ()
    scope: frozenset[str] = frozenset()  # CTE names visible here (they are not tables)

    def nested(self, via: str, *extra: tuple[str, str], scope: frozenset[str] | None = None) -> _Ctx:
        return _Ctx(self.index, self.summary, via, (*self.extra, *extra), self.scope if scope is None else scope)


def _children(node: ast.Node) -> Iterator[ast.Node]:
    for name in node.__slots__:
        v = getattr(node, name, None)
        if isinstance(v, ast.Node):
            yield v
        elif isinstance(v, tuple):
            stack = [v]
            while stack:
                for x in stack.pop():
                    if isinstance(x, ast.Node):
                        yield x
                    elif isinstance(x, tuple):
                        stack.append(x)


def _qualname(names: Iterable[ast.Node] | None) -> str:
    return ".".join(n.sval for n in names or () if isinstance(n, ast.String))


def _relname(rv: ast.RangeVar) -> str:
    return ".".join(p for p in (rv.catalogname, rv.schemaname, rv.relname) if p)


def _const_str(node: ast.Node | None) -> str | None:
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return node.val.sval
    if isinstance(node, ast.TypeCast):
        return _const_str(node.arg)
    return None


def _const(node: ast.Node | None) -> tuple[str, object] | None:
    """A literal's comparable value: ("num", Decimal) / ("str", s) / ("bool", b) / ("null", None)."""
    if isinstance(node, ast.TypeCast):
        inner = _const(node.arg)
        tname = _qualname(node.typeName.names).rsplit(".", 1)[-1] if node.typeName else ""
        if inner and tname in ("bool", "boolean") and inner[0] == "str":
            s = str(inner[1]).strip().lower()
            if s in ("t", "true", "y", "yes", "on", "1"):
                return ("bool", True)
            if s in ("f", "false", "n", "no", "off", "0"):
                return ("bool", False)
        return inner
    if not isinstance(node, ast.A_Const):
        return None
    if node.isnull:
        return ("null", None)
    v = node.val
    if isinstance(v, ast.Integer):
        return ("num", decimal.Decimal(v.ival))
    if isinstance(v, ast.Float):
        try:
            return ("num", decimal.Decimal(v.fval))
        except decimal.InvalidOperation:
            return None
    if isinstance(v, ast.Boolean):
        return ("bool", bool(v.boolval))
    if isinstance(v, ast.String):
        return ("str", v.sval)
    return None


_COMPARE = {
    "=": lambda a, b: a == b, "<>": lambda a, b: a != b, "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def _truth(expr: ast.Node | None) -> bool | None:
    """True/False when a WHERE clause is constant, None when it depends on the rows."""
    if expr is None:
        return True
    c = _const(expr)
    if c is not None:
        return bool(c[1]) if c[0] == "bool" else None
    if isinstance(expr, ast.BoolExpr):
        vals = [_truth(a) for a in expr.args or ()]
        kind = expr.boolop.name if hasattr(expr.boolop, "name") else str(expr.boolop)
        if kind == "OR_EXPR":
            return True if any(v is True for v in vals) else (False if all(v is False for v in vals) else None)
        if kind == "AND_EXPR":
            return False if any(v is False for v in vals) else (True if all(v is True for v in vals) else None)
        if kind == "NOT_EXPR" and vals and vals[0] is not None:
            return not vals[0]
        return None
    if isinstance(expr, ast.A_Expr) and expr.name and len(expr.name) == 1:
        op = expr.name[0].sval if isinstance(expr.name[0], ast.String) else None
        if op in _COMPARE:
            if (isinstance(expr.lexpr, ast.ColumnRef) and isinstance(expr.rexpr, ast.ColumnRef)
                    and _qualname(expr.lexpr.fields) == _qualname(expr.rexpr.fields) and op in ("=", "<=", ">=")):
                return True  # x = x: every row where x is not NULL
            a, b = _const(expr.lexpr), _const(expr.rexpr)
            if a and b and a[0] == b[0] and a[0] != "null":
                try:
                    return bool(_COMPARE[op](a[1], b[1]))
                except TypeError:
                    return None
        return None
    if isinstance(expr, ast.NullTest):
        c = _const(expr.arg)
        if c is not None:
            is_null = c[0] == "null"
            return is_null if expr.nulltesttype.name == "IS_NULL" else not is_null
        return None
    return None


def _defelem_true(d: ast.DefElem) -> bool:
    a = d.arg
    if a is None:
        return True
    if isinstance(a, ast.Boolean):
        return bool(a.boolval)
    if isinstance(a, ast.Integer):
        return a.ival != 0
    if isinstance(a, ast.String):
        return a.sval.lower() not in ("false", "off", "0", "no", "f", "n")
    return True


def _option(options: Iterable[ast.Node] | None, name: str) -> ast.DefElem | None:
    for o in options or ():
        if isinstance(o, ast.DefElem) and o.defname == name:
            return o
    return None


def _enum_name(v: object) -> str:
    return getattr(v, "name", str(v))


def _object_type(v: object) -> str:
    return _enum_name(v).removeprefix("OBJECT_").lower()


# --------------------------------------------------------------------------------------------
# The analyzer


class SqlAnalyzer:
    """Turns SQL text into Operations; one instance per client session.

    It keeps the session's prepared statements so EXECUTE is judged by what it runs. A name maps
    to every statement ever prepared under it (DEALLOCATE does not forget): the proxy cannot see
    whether the server accepted a PREPARE or DEALLOCATE, and judging EXECUTE against all
    candidates can only be stricter than the truth, never laxer. SQL PREPARE and protocol-level
    Parse share one namespace: call `register_prepared` for named Parse messages.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_SQL_LENGTH) -> None:
        self.prepared: dict[str, list[tuple[Operation, ...]]] = {}
        self.max_length = max_length

    # -- public ------------------------------------------------------------------------------

    def analyze(self, sql: str) -> list[Operation]:
        """Operations for a Query message's text (possibly several statements). Never raises:
        text that does not parse yields one "unparseable" Operation. CPU-bound (about 0.4 s for
        1 MiB of INSERT): the relay should run large texts off its event loop."""
        if len(sql) > self.max_length:
            return [self._unparseable(sql[:SUMMARY_LIMIT], f"statement text longer than {self.max_length}", "")]
        if len(sql) <= INLINE_PARSE_LIMIT:
            return self._analyze(sql, via="", depth=0)
        try:
            return _on_big_stack(self._analyze, sql, "", 0)
        except RuntimeError as e:  # no thread could be started: fail closed
            return [self._unparseable(sql[:SUMMARY_LIMIT], f"cannot analyze: {e}", "")]

    def register_prepared(self, name: str, sql: str) -> list[Operation]:
        """For a Parse message: the Operations its statement will perform when executed; a
        non-empty name is also remembered for SQL EXECUTE."""
        ops = self.analyze(sql)
        if name:
            self._remember(name, ops)
        return ops

    # -- core --------------------------------------------------------------------------------

    def _analyze(self, sql: str, via: str, depth: int, index: int | None = None) -> list[Operation]:
        if depth > 8:
            return [self._unparseable(sql, "nesting too deep", via)]
        try:
            stmts = pglast.parse_sql(sql)
        except Exception as e:  # ParseError, and encoding errors on lone surrogates
            return [self._unparseable(sql, str(e).splitlines()[0] if str(e) else type(e).__name__, via)]
        out: list[Operation] = []
        try:
            for i, raw in enumerate(stmts):
                start = raw.stmt_location or 0
                text = sql[start : start + raw.stmt_len] if raw.stmt_len else sql[start:]
                ctx = _Ctx(index=i if index is None else index, summary=_summary(text), via=via)
                out.extend(self._statement(raw.stmt, ctx, depth))
        except RecursionError:
            return [self._unparseable(sql, "statement too deeply nested", via)]
        return out

    def _unparseable(self, sql: str, error: str, via: str) -> Operation:
        attrs = {"error": error[:200]}
        if via:
            attrs["via"] = via
        return Operation(PROTOCOL, "unparseable", (), ("unparseable",), _summary(sql), attrs)

    def _statement(self, node: ast.Node, ctx: _Ctx, depth: int) -> list[Operation]:
        handler = getattr(self, "_s_" + type(node).__name__, None)
        if handler is not None:
            return handler(node, ctx, depth)
        name = type(node).__name__
        if name.startswith("Create") or name in ("DefineStmt", "CompositeTypeStmt", "ImportForeignSchemaStmt",
                                                  "IndexStmt"):
            action = "create"
        elif name.startswith("Alter") or name in ("RenameStmt", "CommentStmt", "SecLabelStmt", "ReassignOwnedStmt"):
            action = "alter"
        elif name.startswith("Drop"):
            action = "drop"
        else:
            action = "other"
        scan = self._scan(node, ctx, depth)
        risks = ["drop"] if action == "drop" else []
        if name in ("CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "DropOwnedStmt",
                    "ReassignOwnedStmt", "CreatePolicyStmt", "AlterPolicyStmt", "AlterOwnerStmt",
                    "CreateUserMappingStmt", "AlterUserMappingStmt"):
            risks.append("privilege-change")
        if name in ("CreateForeignServerStmt", "AlterForeignServerStmt", "CreateSubscriptionStmt",
                    "AlterSubscriptionStmt", "ImportForeignSchemaStmt"):
            risks.append("network-access")
        if name == "CreateTableSpaceStmt":
            risks.append("server-file-access")
        objects = self._ddl_objects(node)
        return self._finish(action, objects, risks, {}, node, ctx, scan, reads_are_objects=True)

    def _finish(self, action: str, objects: Iterable[str], risks: Iterable[str], attrs: dict[str, str],
                node: ast.Node, ctx: _Ctx, scan: _Scan, *, reads_are_objects: bool = False) -> list[Operation]:
        """Primary Operation + a read Operation for tables a write reads + nested Operations."""
        objs = list(dict.fromkeys(objects))
        if reads_are_objects:
            objs = list(dict.fromkeys([*objs, *scan.reads]))
        all_risks = dict.fromkeys(risks)
        all_risks.update(scan.risks)
        for t in scan.reads:
            if t.rsplit(".", 1)[-1] in CREDENTIAL_RELATIONS:
                all_risks["credential-access"] = None
        a = self._attrs(node, ctx, scan)
        a.update(attrs)
        if action == "create" and not ctx.via:
            made = _creates(node)
            if made:
                a["creates"] = made
        ops = [Operation(PROTOCOL, action, tuple(objs), tuple(all_risks), ctx.summary, a)]
        if not reads_are_objects and scan.reads:
            ra = self._attrs(node, ctx, scan)
            ra["via"] = "subquery" if not ctx.via else ctx.via
            ops.append(Operation(PROTOCOL, "read", tuple(scan.reads),
                                 ("credential-access",) if "credential-access" in all_risks else (), ctx.summary, ra))
        ops.extend(scan.nested)
        return ops

    def _attrs(self, node: ast.Node, ctx: _Ctx, scan: _Scan) -> dict[str, str]:
        a = {"statement": str(ctx.index), "node": type(node).__name__}
        if ctx.via:
            a["via"] = ctx.via
        if scan.functions:
            a["functions"] = ",".join(scan.functions)
        a.update(ctx.extra)
        return a

    def _scan(self, root: ast.Node | Iterable[ast.Node | None] | None, ctx: _Ctx, depth: int,
              skip: tuple[ast.Node, ...] = ()) -> _Scan:
        """Walk a subtree collecting reads, functions and nested writes. Data-modifying
        statements below the root become nested Operations instead of being merged in.

        CTE names are scoped as PostgreSQL scopes them: a CTE's own query sees only earlier
        siblings (all of them under RECURSIVE), so `WITH secrets AS (SELECT * FROM secrets)`
        still reads the table."""
        scan = _Scan()
        if root is None:
            return scan
        roots = [root] if isinstance(root, ast.Node) else [n for n in root if isinstance(n, ast.Node)]
        stack: list[tuple[ast.Node, bool, frozenset[str]]] = [(n, True, ctx.scope) for n in reversed(roots)]
        while stack:
            node, is_root, scope = stack.pop()
            if any(node is s for s in skip):
                continue
            if isinstance(node, ast.RangeVar):
                if node.schemaname or node.catalogname or node.relname not in scope:
                    scan.reads[_relname(node)] = None
                continue
            if isinstance(node, WRITE_NODES) and not is_root:
                scan.nested.extend(self._statement(node, ctx.nested("cte", scope=scope), depth))
                continue
            if isinstance(node, ast.ExecuteStmt) and not is_root:  # CREATE TABLE AS EXECUTE p
                scan.nested.extend(self._statement(node, ctx, depth))
                continue
            if isinstance(node, ast.FuncCall):
                self._function(node, scan, ctx, depth)
            wc = getattr(node, "withClause", None)
            if isinstance(wc, ast.WithClause):
                ctes = [c for c in wc.ctes or () if isinstance(c, ast.CommonTableExpr)]
                names = [c.ctename for c in ctes]
                body_scope = scope | frozenset(names)
                # Pushed in reverse so the walk (and the Operations it yields) follows text order.
                for child in reversed(list(_children(node))):
                    if child is not wc:
                        stack.append((child, False, body_scope))
                for i, cte in reversed(list(enumerate(ctes))):
                    cte_scope = body_scope if wc.recursive else scope | frozenset(names[:i])
                    if cte.ctequery is not None:
                        stack.append((cte.ctequery, False, cte_scope))
                continue
            for child in reversed(list(_children(node))):
                stack.append((child, False, scope))
        return scan

    def _function(self, call: ast.FuncCall, scan: _Scan, ctx: _Ctx, depth: int) -> None:
        name = _qualname(call.funcname)
        scan.functions[name] = None
        base = name.rsplit(".", 1)[-1].lower()
        args = call.args or ()
        if base in FILE_FUNCTIONS:
            scan.risk("server-file-access")
        if base in NETWORK_FUNCTIONS:
            scan.risk("network-access")
        if base in SERVER_CONTROL_FUNCTIONS:
            scan.risk("server-control")
        if base in BULK_READ_FUNCTIONS and args:
            target = _const_str(args[0])
            scan.reads[target if target and base.startswith("table_") else f"<{base}>"] = None
        scan.risk(*function_risks(base))
        if base == "set_config" and (not args or _const_str(args[0]) is None
                                     or (_const_str(args[0]) or "").lower() in READ_ONLY_SETTINGS
                                     and not (len(args) > 1 and _keeps_read_only(args[1]))):
            scan.risk("read-write")
        if base == "set_config" and args and (_const_str(args[0]) or "").lower() in ROLE_SETTINGS:
            scan.risk("privilege-change")
        if base == "set_config" and args and (_const_str(args[0]) or "").lower() in PROGRAM_SETTINGS:
            scan.risk("program-execution")
        if base in SQL_FUNCTIONS:
            scan.risk("dynamic-sql")
            idx = SQL_FUNCTIONS[base]
            arg = None
            if idx == -1:
                # dblink(conn, sql[, fail]): the SQL is the last argument that is not a bool flag.
                cands = [a for a in args if not (isinstance(a, ast.A_Const) and isinstance(a.val, ast.Boolean))]
                arg = cands[-1] if cands else None
            elif idx < len(args):
                arg = args[idx]
            sql = _const_str(arg)
            if sql is None:
                scan.risk("opaque-code")
            else:
                for op in self._analyze(sql, via=f"function:{base}", depth=depth + 1, index=ctx.index):
                    scan.nested.append(op)
                    if op.action == "unparseable":
                        scan.risk("opaque-code")

    # -- object names for DDL ------------------------------------------------------------------

    def _ddl_objects(self, node: ast.Node) -> list[str]:
        out: list[str] = []
        for attr in ("relation", "view", "sequence", "into"):
            v = getattr(node, attr, None)
            if isinstance(v, ast.IntoClause):
                v = v.rel
            if isinstance(v, ast.RangeVar):
                out.append(_relname(v))
        for attr in ("schemaname", "dbname", "extname", "servername", "subname", "pubname", "tablespacename",
                     "trigname", "idxname", "role", "conditionname", "portalname", "relname"):
            if attr == "subname" and isinstance(node, ast.RenameStmt):
                continue  # the renamed column, not an object
            v = getattr(node, attr, None)
            if isinstance(v, str) and v:
                out.append(v)
            elif isinstance(v, ast.RoleSpec) and v.rolename:
                out.append(v.rolename)
        for attr in ("funcname", "defnames", "typeName"):
            v = getattr(node, attr, None)
            if isinstance(v, tuple):
                out.append(_qualname(v))
        if getattr(node, "object", None) is not None:
            out.extend(_object_names([node.object]))
        for attr in ("relations", "rels", "roles"):
            for v in getattr(node, attr, None) or ():
                if isinstance(v, ast.VacuumRelation):
                    v = v.relation
                if isinstance(v, ast.RangeVar):
                    out.append(_relname(v))
                elif isinstance(v, ast.RoleSpec) and v.rolename:
                    out.append(v.rolename)
        return out

    # -- statement handlers ----------------------------------------------------------------------

    def _s_SelectStmt(self, node: ast.SelectStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        attrs: dict[str, str] = {}
        if node.lockingClause:
            attrs["lock"] = ",".join(_enum_name(lc.strength).removeprefix("LCS_").lower()
                                     for lc in node.lockingClause)
        if node.intoClause is not None:  # SELECT ... INTO creates a table
            scan = self._scan(node, ctx, depth, skip=(node.intoClause,))
            return self._finish("create", [_relname(node.intoClause.rel)], [], attrs, node, ctx, scan)
        scan = self._scan(node, ctx, depth)
        ops = self._finish("read", [], ["row-lock"] if node.lockingClause else [], attrs, node, ctx, scan,
                           reads_are_objects=True)
        if node.lockingClause:
            # Row locks write the rows' headers and block other sessions: a `lock` of their tables.
            locked = [_relname(r) for lc in node.lockingClause for r in lc.lockedRels or ()] or list(scan.reads)
            a = dict(ops[0].attributes, via=ctx.via or "for-update")
            ops.insert(1, Operation(PROTOCOL, "lock", tuple(dict.fromkeys(locked)), ("row-lock",), ctx.summary, a))
        return ops

    def _s_InsertStmt(self, node: ast.InsertStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        target = _relname(node.relation)
        scan = self._scan(node, ctx, depth, skip=(node.relation,))
        ops = self._finish("insert", [target], [], {}, node, ctx, scan)
        occ = node.onConflictClause
        if occ is not None and _enum_name(occ.action) == "ONCONFLICT_UPDATE":
            a = self._attrs(node, ctx, _Scan())
            a["via"] = "on-conflict"
            ops.insert(1, Operation(PROTOCOL, "update", (target,), (), ctx.summary, a))
        return ops

    def _s_UpdateStmt(self, node: ast.UpdateStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        scan = self._scan(node, ctx, depth, skip=(node.relation,))
        risks = ["update-without-where"] if _truth(node.whereClause) is True else []
        if node.relation.relname == "pg_settings" and node.relation.schemaname in (None, "", "pg_catalog"):
            risks += ["set-config", "read-write"]  # its rule turns the UPDATE into set_config()
        return self._finish("update", [_relname(node.relation)], risks, {}, node, ctx, scan)

    def _s_DeleteStmt(self, node: ast.DeleteStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        scan = self._scan(node, ctx, depth, skip=(node.relation,))
        risks = ["delete-without-where"] if _truth(node.whereClause) is True else []
        return self._finish("delete", [_relname(node.relation)], risks, {}, node, ctx, scan)

    def _s_MergeStmt(self, node: ast.MergeStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        target = _relname(node.relation)
        scan = self._scan(node, ctx, depth, skip=(node.relation,))
        kinds = {_enum_name(w.commandType).removeprefix("CMD_").lower() for w in node.mergeWhenClauses or ()}
        actions = [a for a in ("delete", "update", "insert") if a in kinds] or ["update"]
        risks = []
        if _truth(node.joinCondition) is True:  # ON true: every target row is "matched"
            risks = [f"{a}-without-where" for a in actions if a in ("delete", "update")]
        ops = self._finish(actions[0], [target], risks, {"merge": "1"}, node, ctx, scan)
        for i, a in enumerate(actions[1:], start=1):
            attrs = self._attrs(node, ctx, _Scan())
            attrs.update(via="merge", merge="1")
            ops.insert(i, Operation(PROTOCOL, a, (target,), (), ctx.summary, attrs))
        return ops

    def _s_TruncateStmt(self, node: ast.TruncateStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        objs = [_relname(r) for r in node.relations or ()]
        attrs = {"cascade": "1"} if _enum_name(node.behavior) == "DROP_CASCADE" else {}
        return self._finish("truncate", objs, ["truncate"], attrs, node, ctx, _Scan())

    def _s_DropStmt(self, node: ast.DropStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        otype = _object_type(node.removeType)
        risks = ["drop"]
        if otype in ("policy", "role"):
            risks.append("privilege-change")
        attrs = {"object_type": otype}
        if _enum_name(node.behavior) == "DROP_CASCADE":
            attrs["cascade"] = "1"
        return self._finish("drop", _object_names(node.objects or ()), risks, attrs, node, ctx, _Scan())

    def _s_DropdbStmt(self, node: ast.DropdbStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("drop", [node.dbname], ["drop"], {"object_type": "database"}, node, ctx, _Scan())

    def _s_DropRoleStmt(self, node: ast.DropRoleStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        roles = [r.rolename for r in node.roles or () if isinstance(r, ast.RoleSpec) and r.rolename]
        return self._finish("drop", roles, ["drop", "privilege-change"], {"object_type": "role"}, node, ctx, _Scan())

    def _s_GrantStmt(self, node: ast.GrantStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        action = "grant" if node.is_grant else "revoke"
        otype = _object_type(node.objtype)
        objs = _object_names(node.objects or ())
        if _enum_name(node.targtype) == "ACL_TARGET_ALL_IN_SCHEMA":
            objs = [f"{o}.*" for o in objs]
        attrs = {"object_type": otype,
                 "privileges": ",".join(p.priv_name or "all" for p in node.privileges or ()) or "all",
                 "grantees": ",".join(_role(r) for r in node.grantees or ())}
        return self._finish(action, objs, ["privilege-change"], attrs, node, ctx, _Scan())

    def _s_GrantRoleStmt(self, node: ast.GrantRoleStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        action = "grant" if node.is_grant else "revoke"
        roles = [p.priv_name for p in node.granted_roles or () if p.priv_name]
        attrs = {"object_type": "role", "grantees": ",".join(_role(r) for r in node.grantee_roles or ())}
        risks = ["privilege-change"]
        if node.is_grant:
            risks += [r for role in roles for r in PREDEFINED_ROLE_RISKS.get(role, ())]
        return self._finish(action, roles, risks, attrs, node, ctx, _Scan())

    def _s_AlterDefaultPrivilegesStmt(self, node: ast.AlterDefaultPrivilegesStmt, ctx: _Ctx,
                                      depth: int) -> list[Operation]:
        ops = self._s_GrantStmt(node.action, ctx, depth)
        first = ops[0]
        attrs = dict(first.attributes, node="AlterDefaultPrivilegesStmt", defaults="1")
        return [Operation(PROTOCOL, first.action, first.objects, first.risks, first.summary, attrs), *ops[1:]]

    def _s_AlterTableStmt(self, node: ast.AlterTableStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        risks: list[str] = []
        subtypes = []
        for cmd in node.cmds or ():
            st = _enum_name(cmd.subtype).removeprefix("AT_")
            subtypes.append(st)
            if st in ("DropColumn", "DropConstraint", "DetachPartition", "DropExpression", "DropIdentity"):
                risks.append("drop")
            if st in ("ChangeOwner", "EnableRowSecurity", "DisableRowSecurity", "ForceRowSecurity",
                      "NoForceRowSecurity"):
                risks.append("privilege-change")
        scan = self._scan(node.cmds, ctx, depth)  # defaults and USING expressions may call functions
        attrs = {"object_type": _object_type(node.objtype), "subcommands": ",".join(subtypes)}
        return self._finish("alter", [_relname(node.relation)], risks, attrs, node, ctx, scan)

    def _s_AlterSystemStmt(self, node: ast.AlterSystemStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        setting = (node.setstmt.name or "all").lower()
        risks = ["server-config"]
        if setting in PROGRAM_SETTINGS:
            risks.append("program-execution")
        return self._finish("alter", [], risks, {"setting": setting}, node, ctx, _Scan())

    def _s_CreateTableAsStmt(self, node: ast.CreateTableAsStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        scan = self._scan(node, ctx, depth, skip=(node.into,))  # the query may be EXECUTE p
        return self._finish("create", [_relname(node.into.rel)], [], {"object_type": _object_type(node.objtype)},
                            node, ctx, scan)

    def _s_ViewStmt(self, node: ast.ViewStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        scan = self._scan(node.query, ctx, depth)
        return self._finish("create", [_relname(node.view)], [], {"object_type": "view"}, node, ctx, scan)

    def _s_CreateSchemaStmt(self, node: ast.CreateSchemaStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        ops = self._finish("create", [node.schemaname or _role(node.authrole)], [], {"object_type": "schema"},
                           node, ctx, _Scan())
        for elt in node.schemaElts or ():
            ops.extend(self._statement(elt, ctx.nested("create-schema"), depth))
        return ops

    def _s_CreateExtensionStmt(self, node: ast.CreateExtensionStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        risks = RISKY_EXTENSIONS.get(node.extname.lower(), ())
        return self._finish("create", [node.extname], risks, {"object_type": "extension"}, node, ctx, _Scan())

    def _s_CreatePLangStmt(self, node: ast.CreatePLangStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        risks = ["program-execution"] if node.plname.lower() in UNTRUSTED_LANGUAGES or not node.pltrusted else []
        return self._finish("create", [node.plname], risks, {"object_type": "language"}, node, ctx, _Scan())

    def _s_CreateFunctionStmt(self, node: ast.CreateFunctionStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        lang_opt = _option(node.options, "language")
        lang = (lang_opt.arg.sval if lang_opt is not None and isinstance(lang_opt.arg, ast.String) else "sql").lower()
        risks: list[str] = []
        attrs = {"object_type": "procedure" if node.is_procedure else "function", "language": lang}
        sec = _option(node.options, "security")
        if sec is not None and _defelem_true(sec):
            attrs["security_definer"] = "1"
        if lang in UNTRUSTED_LANGUAGES:
            risks.append("program-execution")
        body_risks: dict[str, None] = {}
        if node.sql_body is not None:  # BEGIN ATOMIC ... END: parsed already
            stmts = [s for group in node.sql_body for s in (group if isinstance(group, tuple) else (group,))
                     if isinstance(s, ast.Node)]
            for s in stmts:
                for op in self._statement(s, ctx.nested("function-body"), depth + 1):
                    body_risks.update(dict.fromkeys(op.risks))
        else:
            as_opt = _option(node.options, "as")
            body = None
            if as_opt is not None and isinstance(as_opt.arg, tuple) and as_opt.arg:
                body = as_opt.arg[0].sval if isinstance(as_opt.arg[0], ast.String) else None
            if lang == "sql" and body is not None:
                for op in self._analyze(body, via="function-body", depth=depth + 1):
                    body_risks.update(dict.fromkeys(op.risks))
                    if op.action == "unparseable":
                        body_risks["opaque-code"] = None
            elif lang != "internal" or body is None:
                body_risks["opaque-code"] = None
        body_risks.pop("unparseable", None)
        risks.extend(body_risks)
        scan = self._scan([node.parameters, node.returnType], ctx, depth)
        return self._finish("create", [_qualname(node.funcname)], risks, attrs, node, ctx, scan)

    def _s_DoStmt(self, node: ast.DoStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        lang_opt = _option(node.args, "language")
        lang = (lang_opt.arg.sval if lang_opt is not None and isinstance(lang_opt.arg, ast.String)
                else "plpgsql").lower()
        risks = ["opaque-code"]
        if lang in UNTRUSTED_LANGUAGES:
            risks.append("program-execution")
        return self._finish("do", [], risks, {"language": lang}, node, ctx, _Scan())

    def _s_CopyStmt(self, node: ast.CopyStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        attrs = {"direction": "from" if node.is_from else "to"}
        risks = []
        if node.is_program:
            risks += ["program-execution", "server-file-access"]
            attrs["program"] = "1"
        elif node.filename is not None:
            risks.append("server-file-access")
        objs: list[str] = []
        nested: list[Operation] = []
        if node.relation is not None:
            objs.append(_relname(node.relation))
        if node.query is not None:
            inner = self._statement(node.query, ctx.nested("copy"), depth)
            for op in inner:
                objs.extend(op.objects)
            nested = inner
        scan = self._scan(node.whereClause, ctx, depth)
        if node.is_from:  # rows into the table: an insert (into a table only; the server says so)
            return self._finish("insert", objs, risks, attrs, node, ctx, scan)
        # Into a server file or program the server writes or runs something: a `copy` besides the read.
        to_server = [Operation(PROTOCOL, "copy", tuple(dict.fromkeys(objs)), tuple(risks), ctx.summary,
                               {**self._attrs(node, ctx, _Scan()), **attrs})] if risks else []
        if node.relation is not None:  # COPY t TO: a read of t, like SELECT * FROM t
            scan.reads[objs[0]] = None
            return self._finish("read", objs, risks, attrs, node, ctx, scan, reads_are_objects=True) + to_server
        # COPY (query) TO: the query's own operations, and a read naming what it touches
        return self._finish("read", objs, risks, attrs, node, ctx, scan) + to_server + nested

    def _s_CallStmt(self, node: ast.CallStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        scan = self._scan(node.funccall, ctx, depth)
        name = _qualname(node.funccall.funcname)
        return self._finish("call", [name], [], {"procedure": name}, node, ctx, scan)

    def _s_VariableSetStmt(self, node: ast.VariableSetStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        setting = (node.name or _enum_name(node.kind).removeprefix("VAR_")).lower()
        kind = _enum_name(node.kind)
        risks = []
        if setting in ROLE_SETTINGS and kind in ("VAR_SET_VALUE", "VAR_SET_CURRENT"):
            risks.append("privilege-change")
        if setting in PROGRAM_SETTINGS:
            risks.append("program-execution")
        if _switches_read_write(node):
            risks.append("read-write")
        attrs = {"setting": setting}
        if node.is_local:
            attrs["local"] = "1"
        return self._finish("set", [], risks, attrs, node, ctx, self._scan(node.args, ctx, depth))

    def _s_VariableShowStmt(self, node: ast.VariableShowStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("read", [], [], {"setting": node.name}, node, ctx, _Scan())

    def _s_TransactionStmt(self, node: ast.TransactionStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        kind = _enum_name(node.kind).removeprefix("TRANS_STMT_").lower()
        rw = any(isinstance(d, ast.DefElem) and d.defname == "transaction_read_only" and not _keeps_read_only(d.arg)
                 for d in node.options or ())
        return self._finish("transaction", [], ["read-write"] if rw else [], {"transaction": kind}, node, ctx, _Scan())

    def _s_AlterRoleSetStmt(self, node: ast.AlterRoleSetStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._setting_default(node, [_role(node.role) or "all"], "role", ctx)

    def _s_AlterDatabaseSetStmt(self, node: ast.AlterDatabaseSetStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._setting_default(node, [node.dbname], "database", ctx)

    def _setting_default(self, node: ast.Node, objects: list[str], otype: str, ctx: _Ctx) -> list[Operation]:
        """ALTER ROLE/DATABASE ... SET: a setting every later login of that role/database starts with."""
        st = node.setstmt
        risks = ["privilege-change"] if otype == "role" else []
        if isinstance(st, ast.VariableSetStmt) and _switches_read_write(st):
            risks.append("read-write")
        setting = (st.name or "all").lower() if isinstance(st, ast.VariableSetStmt) else ""
        return self._finish("alter", objects, risks, {"object_type": otype, "setting": setting}, node, ctx, _Scan())

    def _s_LockStmt(self, node: ast.LockStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("lock", [_relname(r) for r in node.relations or ()], [], {}, node, ctx, _Scan())

    def _s_NotifyStmt(self, node: ast.NotifyStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("other", [node.conditionname], ["notify"], {}, node, ctx, _Scan())

    def _s_ConstraintsSetStmt(self, node: ast.Node, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("transaction", [], [], {"transaction": "set_constraints"}, node, ctx, _Scan())

    def _s_ExplainStmt(self, node: ast.ExplainStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        analyze = _option(node.options, "analyze")
        if analyze is not None and _defelem_true(analyze):
            inner_ctx = ctx.nested(ctx.via or "explain-analyze", ("explain", "analyze"))
            return self._statement(node.query, inner_ctx, depth)
        # Plain EXPLAIN plans without executing: report what it names, not what it would do.
        inner = self._statement(node.query, ctx.nested("explain"), depth)
        objs = [o for op in inner for o in op.objects]
        funcs = [f for op in inner for f in op.attributes.get("functions", "").split(",") if f]
        scan = _Scan(functions=dict.fromkeys(funcs))
        return self._finish("explain", objs, [], {"explain": "plan"}, node, ctx, scan)

    def _s_PrepareStmt(self, node: ast.PrepareStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        inner_ctx = ctx.nested("prepare", ("prepared", node.name))
        ops = self._statement(node.query, inner_ctx, depth)
        self._remember(node.name, ops)
        return ops

    def _s_ExecuteStmt(self, node: ast.ExecuteStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        scan = self._scan(node.params, ctx, depth)  # parameters are expressions and may call functions
        candidates = self.prepared.get(node.name)
        if not candidates:
            return self._finish("other", [], ["opaque-code"], {"prepared": node.name}, node, ctx, scan,
                                reads_are_objects=True)
        out: list[Operation] = []
        seen: set[tuple] = set()
        for ops in candidates:
            for op in ops:
                key = (op.action, op.objects, op.risks)
                if key in seen:
                    continue
                seen.add(key)
                attrs = dict(op.attributes, statement=str(ctx.index), via="execute", prepared=node.name)
                out.append(Operation(PROTOCOL, op.action, op.objects, op.risks, f"{ctx.summary} => {op.summary}",
                                     attrs))
        if scan.functions or scan.risks or scan.reads or scan.nested:
            out.extend(self._finish("other", [], [], {"prepared": node.name, "via": "execute-params"},
                                    node, ctx, scan, reads_are_objects=True))
        return out

    def _s_DeallocateStmt(self, node: ast.DeallocateStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("other", [], [], {"prepared": node.name or "all"}, node, ctx, _Scan())

    def _s_DeclareCursorStmt(self, node: ast.DeclareCursorStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        inner_ctx = ctx.nested(ctx.via or "cursor", ("cursor", node.portalname))
        return self._statement(node.query, inner_ctx, depth)

    def _s_FetchStmt(self, node: ast.FetchStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        action = "other" if node.ismove else "read"
        return self._finish(action, [], [], {"cursor": node.portalname or ""}, node, ctx, _Scan())

    def _s_LoadStmt(self, node: ast.LoadStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        return self._finish("other", [node.filename or ""], ["program-execution", "server-file-access"], {},
                            node, ctx, _Scan())

    def _s_RuleStmt(self, node: ast.RuleStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        # Rule actions run later, on every matching statement: lift their risks onto the CREATE.
        risks: dict[str, None] = {}
        for a in node.actions or ():
            for op in self._statement(a, ctx.nested("rule"), depth + 1):
                risks.update(dict.fromkeys(op.risks))
        return self._finish("create", [_relname(node.relation)], risks, {"object_type": "rule", "rule": node.rulename},
                            node, ctx, self._scan(node.whereClause, ctx, depth))

    def _s_DiscardStmt(self, node: ast.DiscardStmt, ctx: _Ctx, depth: int) -> list[Operation]:
        target = _enum_name(node.target).removeprefix("DISCARD_").lower()
        return self._finish("other", [], ["read-write"] if target == "all" else [], {"discard": target},
                            node, ctx, _Scan())  # DISCARD ALL includes RESET ALL

    def _remember(self, name: str, ops: list[Operation]) -> None:
        self.prepared.setdefault(name, []).append(tuple(ops))


_STACK_LOCK = threading.Lock()


def _on_big_stack(fn: Callable[..., list[Operation]], *args: object) -> list[Operation]:
    """Run fn on a fresh thread with a BIG_STACK stack (reserved, touched only as used); the
    parse tree is built and dropped there, only Operations come back."""
    result: list[list[Operation]] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    with _STACK_LOCK:  # stack_size() is process-wide: set it only around our own start()
        old = threading.stack_size(BIG_STACK)
        try:
            t = threading.Thread(target=target, name="interlock-sql-parse", daemon=True)
            t.start()
        finally:
            threading.stack_size(old)
    t.join()
    if error:
        raise error[0]
    return result[0]


def _creates(node: ast.Node) -> str | None:
    """The relation a statement creates as a new object, as DROP would name it: None for IF NOT
    EXISTS and OR REPLACE (the object may be someone else's) and ON COMMIT DROP (gone by the time
    the name could be dropped again, so the name may then mean another relation)."""
    if isinstance(node, ast.CreateStmt | ast.CreateSeqStmt):
        rel = node.relation if isinstance(node, ast.CreateStmt) else node.sequence
        if node.if_not_exists or _enum_name(getattr(node, "oncommit", "")) == "ONCOMMIT_DROP":
            return None
    elif isinstance(node, ast.CreateTableAsStmt | ast.SelectStmt):
        into = node.into if isinstance(node, ast.CreateTableAsStmt) else node.intoClause
        if into is None or getattr(node, "if_not_exists", False) or _enum_name(into.onCommit) == "ONCOMMIT_DROP":
            return None
        rel = into.rel
    elif isinstance(node, ast.ViewStmt):
        if node.replace:
            return None
        rel = node.view
    else:
        return None
    return _relname(rel) if isinstance(rel, ast.RangeVar) else None


def _role(r: ast.Node | None) -> str:
    if isinstance(r, ast.RoleSpec):
        return r.rolename or _enum_name(r.roletype).removeprefix("ROLESPEC_").lower()
    return ""


def _object_names(objects: Iterable[object]) -> list[str]:
    out = []
    for o in objects:
        if isinstance(o, ast.RangeVar):
            out.append(_relname(o))
        elif isinstance(o, ast.String):
            out.append(o.sval)
        elif isinstance(o, tuple):
            out.append(_qualname(o))
        elif isinstance(o, ast.ObjectWithArgs):
            out.append(_qualname(o.objname))
        elif isinstance(o, ast.TypeName):
            out.append(_qualname(o.names))
        elif isinstance(o, ast.RoleSpec):
            out.append(_role(o))
    return [x for x in out if x]


def _summary(text: str) -> str:
    text = detectors.mask_text(text.strip())
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"


def analyze(sql: str, max_length: int = DEFAULT_MAX_SQL_LENGTH) -> list[Operation]:
    """Stateless analysis (EXECUTE of a prepared statement is then always "opaque-code")."""
    return SqlAnalyzer(max_length).analyze(sql)


def is_write(op: Operation) -> bool:
    """Whether an Operation changes data or schema (for policies that split reads from writes)."""
    return op.action in _WRITE_ACTIONS or op.action in ("grant", "revoke", "do", "unparseable")
