"""Which function calls the policy must see as `call`s: the server's own catalog says, sans-IO.

A statement that calls a function may do anything the function does: `SELECT wipe()` reads
nothing and deletes everything. The SQL text cannot tell `wipe()` from `lower()`; pg_proc can.
A call is *free of side effects* only when every function of that name, in every schema, is a
built-in (schema pg_catalog) that is not volatile (`provolatile <> 'v'`), or one of the few
volatile built-ins known to change nothing (random(), clock_timestamp(), ...). Looking at every
schema and every overload, rather than resolving the call, keeps search_path, overloading and
implicit casts out of the question: if `public.lower(int)` exists, no `lower(...)` is taken
for the built-in. A schema-qualified call is free only when qualified with pg_catalog.
Everything else, names the catalog does not know included, becomes an Operation
("call", (name,), risks) next to the statement's own, so a policy can allow-list functions.

The catalog is read once per server and database, on the session's own upstream connection
right after login (CATALOG_QUERY; the agent sees none of it), and shared by every session to
that server for CATALOG_TTL seconds. `forget()` drops the shared copies (and a session drops the
names from its own) whenever a statement may create, replace or rename a function; a function
made behind the proxy's back is seen at the latest after CATALOG_TTL. A catalog that could not
be read knows no function: every call is a `call` (fail closed).

Limits: operators, casts, type I/O and triggers call functions the text does not name; a
session the policy grants no write is read-only on the server (handler.py), which stops what
they would write.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from policy.model import Operation
from proxy.postgres.statements import PROTOCOL, function_risks

CATALOG_TTL = 60.0
# Volatile only in the sense that two calls may differ; they change nothing anywhere.
HARMLESS_VOLATILE = ("random", "random_normal", "setseed", "clock_timestamp", "timeofday", "gen_random_uuid",
                     "pg_sleep", "pg_sleep_for", "pg_sleep_until")
CATALOG_QUERY = (
    "SELECT p.proname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
    "GROUP BY p.proname HAVING bool_and(n.nspname = 'pg_catalog' AND (p.provolatile <> 'v' OR p.proname IN ("
    + ", ".join(f"'{n}'" for n in HARMLESS_VOLATILE) + ")))"
)
# Statement nodes that may create, replace, rename or re-schema a function.
FUNCTION_DDL_NODES = frozenset({"CreateFunctionStmt", "AlterFunctionStmt", "RenameStmt", "AlterObjectSchemaStmt",
                                "CreateExtensionStmt", "AlterExtensionStmt", "AlterExtensionContentsStmt",
                                "DefineStmt", "CreateCastStmt", "CreateTransformStmt", "ImportForeignSchemaStmt"})


class FunctionCatalog:
    """The names of functions known to be free of side effects on one server and database."""

    __slots__ = ("free", "loaded", "_unsafe")

    def __init__(self, free: Iterable[str] = (), loaded: float | None = None):
        self.free = set(free)
        self.loaded = time.monotonic() if loaded is None else loaded
        self._unsafe: dict[str, tuple[str, ...]] = {}  # a `functions` attribute -> its names not known free

    def unsafe(self, functions: str) -> tuple[str, ...]:
        """The names in a comma-separated `functions` attribute that are not known free (memoized:
        the same statements come again and again)."""
        hit = self._unsafe.get(functions)
        if hit is None:
            hit = tuple(dict.fromkeys(n for n in functions.split(",") if n and not self.side_effect_free(n)))
            if len(self._unsafe) >= 4096:
                self._unsafe.clear()
            self._unsafe[functions] = hit
        return hit

    def drop(self, names: Iterable[str]) -> None:
        """These names may now mean a function that is not free."""
        self.free.difference_update(names)
        self._unsafe.clear()

    def side_effect_free(self, name: str) -> bool:
        """name as the analyzer writes it: `f`, `schema.f` or `db.schema.f` (case as in pg_proc)."""
        schema, _, base = name.rpartition(".")
        return (not schema or schema == "pg_catalog") and base in self.free

    def fresh(self, now: float | None = None) -> bool:
        return ((time.monotonic() if now is None else now) - self.loaded) < CATALOG_TTL


_shared: dict[tuple[str, int, str], FunctionCatalog] = {}


def cached(server: tuple[str, int, str]) -> FunctionCatalog | None:
    """The shared catalog of (address, port, database), if it is fresh."""
    cat = _shared.get(server)
    if cat is not None and cat.fresh():
        return cat
    _shared.pop(server, None)
    return None


def store(server: tuple[str, int, str], names: Iterable[str]) -> FunctionCatalog:
    cat = FunctionCatalog(names)
    _shared[server] = cat
    return cat


def forget() -> None:
    """A function may have been created, replaced or renamed: read every catalog again."""
    _shared.clear()


def defines_functions(ops: Iterable[Operation]) -> list[str] | None:
    """Names a statement may define functions under ([] when it cannot be told, as for code the
    analyzer cannot see into), or None when it defines none."""
    names: list[str] | None = None
    for op in ops:
        if op.attributes.get("node") in FUNCTION_DDL_NODES or "opaque-code" in op.risks:
            names = names or []
            names.extend(o.rpartition(".")[2] for o in op.objects)
    return names


def with_calls(ops: list[Operation], catalog: FunctionCatalog) -> list[Operation]:
    """ops, followed by one `call` Operation per function they call that is not known to be free
    of side effects (each name once), carrying its built-in risk flags (function_risks)."""
    extra: list[Operation] = []
    seen: set[str] = set()
    for op in ops:
        funcs = op.attributes.get("functions")
        if not funcs:
            continue
        for name in catalog.unsafe(funcs):
            if name in seen:
                continue
            seen.add(name)
            attrs = {"statement": op.attributes.get("statement", "0"), "node": "FuncCall", "via": "function",
                     "function": name}
            extra.append(Operation(PROTOCOL, "call", (name,), function_risks(name), op.summary, attrs))
    return ops + extra if extra else ops
