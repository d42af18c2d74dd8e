"""How PostgreSQL's own parser reads a text, sans-IO: its syntax error (message and position, as the
server reports them) and whether `standard_conforming_strings = off` changes the reading.

pglast's `parse_sql` always parses with standard_conforming_strings on and gives no position a
client could use. The libpg_query it is built on exports `pg_query_parse_opts`, whose flags
include "standard_conforming_strings off" and whose errors carry the server's 1-based character
position; this module calls it through ctypes. Both readings are compared as libpg_query's JSON
parse trees (locations included): where they are equal, an analysis made under the default
reading is the server's reading under either setting.

Without that symbol (a pglast built differently), `same_reading` answers False (the caller
refuses: fail closed) and `syntax_error` falls back to pglast's ParseError.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import pglast
import pglast.parser

DISABLE_STANDARD_CONFORMING_STRINGS = 32  # libpg_query's PG_QUERY_DISABLE_STANDARD_CONFORMING_STRINGS


class _Error(ctypes.Structure):
    _fields_ = [("message", ctypes.c_char_p), ("funcname", ctypes.c_char_p), ("filename", ctypes.c_char_p),
                ("lineno", ctypes.c_int), ("cursorpos", ctypes.c_int), ("context", ctypes.c_char_p)]


class _Result(ctypes.Structure):
    _fields_ = [("parse_tree", ctypes.c_void_p), ("stderr_buffer", ctypes.c_void_p),
                ("error", ctypes.POINTER(_Error))]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(pglast.parser.__file__)
        parse, free = lib.pg_query_parse_opts, lib.pg_query_free_parse_result
    except (OSError, AttributeError):
        return None
    parse.restype, parse.argtypes = _Result, [ctypes.c_char_p, ctypes.c_int]
    free.restype, free.argtypes = None, [_Result]
    return lib


def _parse(sql: str, flags: int) -> tuple[bool, bytes, int]:
    """(parsed, JSON tree or error message, error position); raises RuntimeError without libpg_query."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("libpg_query's pg_query_parse_opts is not available")
    r = lib.pg_query_parse_opts(sql.encode("utf-8", "surrogateescape"), flags)
    try:
        if r.error:
            e = r.error.contents
            return False, e.message or b"", e.cursorpos
        return True, ctypes.string_at(r.parse_tree), 0
    finally:
        lib.pg_query_free_parse_result(r)


# Statements whose body is SQL the server parses later, under the setting in force then: a body
# with a backslash may read differently at run time whatever the outer text does.
_LATER = (b'"DoStmt"', b'"CreateFunctionStmt"', b'"CreateTrigStmt"', b'"RuleStmt"')


def same_reading(sql: str) -> bool:
    """Whether the server reads `sql` the same with standard_conforming_strings on and off
    (text without a backslash always does). False when it cannot be told, and for a DO block or
    a function body with a backslash (parsed again when it runs)."""
    if "\\" not in sql or "\0" in sql:
        return "\\" not in sql
    try:
        on = _parse(sql, 0)
        if on != _parse(sql, DISABLE_STANDARD_CONFORMING_STRINGS):
            return False
    except RuntimeError:
        return False
    return not any(k in on[1] for k in _LATER)


def syntax_error(sql: str) -> tuple[str, int] | None:
    """The parser's error for `sql` as the server reports it — (message, 1-based character
    position, 0 when it has none) — or None when the text parses."""
    if "\0" in sql:
        return None
    try:
        ok, message, pos = _parse(sql, 0)
    except RuntimeError:
        try:
            pglast.parse_sql(sql)
        except pglast.parser.ParseError as e:
            at = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], int) else None
            return str(e.args[0]), (at + 1 if at is not None else len(sql) + 1)
        return None
    return None if ok else (message.decode("utf-8", "replace"), pos)
