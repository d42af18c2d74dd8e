"""SqlAnalyzer with a memory: the same SQL is not parsed twice, sans-IO.

Agents send the same statements over and over (an ORM's queries, a prepared statement per
request, a polling loop). Parsing with PostgreSQL's grammar costs ~100 µs a statement, the
proxy's largest per-statement cost, so answers are kept in a process-wide LRU:

- by exact text, for every answer that does not depend on the session (PREPARE, EXECUTE and
  DEALLOCATE do: they are never cached);
- by *shape* — the text with its numeric and string literals blanked — only for plain SELECTs
  that read tables and call no function, carry no risk flag and were the whole text. For those,
  a literal's value cannot change the analysis (nothing in a literal is read as SQL or as a
  name), so `... WHERE id = 7` is answered from `... WHERE id = 3`. The shape is only computed
  for text whose literals cannot be misread: no backslash, dollar quote, comment, quoted
  identifier, prefixed string (E'', U&'', B'', X'') or second statement; anything else is
  parsed every time. Summaries are always rebuilt from the real text.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from policy import detectors
from policy.model import Operation
from proxy.postgres.statements import SUMMARY_LIMIT, SqlAnalyzer

CACHE_SIZE = 4096
MAX_CACHED_TEXT = 8192

_exact: OrderedDict[str, tuple[Operation, ...]] = OrderedDict()
_shapes: OrderedDict[str, tuple[Operation, ...]] = OrderedDict()

# Anything that could make a literal start or end somewhere other than where a simple scan
# thinks (backslash escapes, dollar quotes and $n, comments, quoted identifiers), checked over the
# whole text, literals included.
_UNSAFE = re.compile(r"""[\\$"]|--|/\*""")
# A string literal not glued to a prefix (E'', U&'', B'', X'', N'') or to another quote, or a number.
_LITERAL = re.compile(r"(?<![\w&'])'(?:[^']|'')*'|(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
_SECOND_STATEMENT = re.compile(r";\s*\S")


def shape(sql: str) -> str | None:
    """The text with literals blanked, or None when it cannot be computed safely."""
    if len(sql) > MAX_CACHED_TEXT or _UNSAFE.search(sql):
        return None
    shaped = _LITERAL.sub("?", sql)
    # a quote left over belongs to a prefixed or unterminated string: not for a simple scan
    if "'" in shaped or _SECOND_STATEMENT.search(shaped):
        return None
    return shaped


def _shape_ok(ops: list[Operation]) -> bool:
    return bool(ops) and all(
        op.action == "read" and not op.risks and op.attributes.get("node") == "SelectStmt"
        and op.attributes.get("statement") == "0"
        and not {"functions", "via", "prepared", "cursor"} & op.attributes.keys() for op in ops)


def _session_free(ops: list[Operation]) -> bool:
    return all("prepared" not in op.attributes for op in ops)


def _summary(text: str) -> str:
    text = detectors.mask_text(text.strip())
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"


def _put(cache: OrderedDict, key: str, ops: list[Operation]) -> None:
    cache[key] = tuple(ops)
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


class Analyzer:
    """One per client session, like SqlAnalyzer (whose prepared-statement memory it keeps).

    After each `analyze`, `key` names the answer for callers that remember what they made of it
    (the handler's judgement per statement text): texts with equal keys have the same operations
    but for their summaries. None when the answer depends on the session or was not cached."""

    __slots__ = ("sql", "key")

    def __init__(self) -> None:
        self.sql = SqlAnalyzer()
        self.key: str | tuple[str] | None = None

    def analyze(self, text: str) -> list[Operation]:
        hit = _exact.get(text)
        if hit is not None:
            _exact.move_to_end(text)
            self.key = text
            return list(hit)
        key = shape(text)
        if key is not None:
            hit = _shapes.get(key)
            if hit is not None:
                _shapes.move_to_end(key)
                self.key = (key,)
                summary = _summary(text)
                return [Operation(op.protocol, op.action, op.objects, op.risks, summary, op.attributes) for op in hit]
        self.key = None
        ops = self.sql.analyze(text)
        if len(text) <= MAX_CACHED_TEXT and _session_free(ops):
            _put(_exact, text, ops)
            self.key = text
            if key is not None and _shape_ok(ops):
                _put(_shapes, key, ops)
        return ops

    def register_prepared(self, name: str, text: str) -> list[Operation]:
        """A protocol-level Parse: named statements are remembered for SQL EXECUTE."""
        if name:
            self.key = None
            return self.sql.register_prepared(name, text)
        return self.analyze(text)
