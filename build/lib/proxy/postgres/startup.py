"""What a StartupMessage asks for besides a login, sans-IO: settings to judge, and settings the relay
cannot allow because they would make it misread later SQL.

Every startup parameter other than user, database, options and replication is a configuration
setting the server applies before the first query (`role`, `search_path`, ...), and `options`
carries more (`-c name=value`, `--name=value`). They are judged like `SET` statements, so a
startup packet cannot do what a statement would be refused for.

Two settings change how the server reads SQL text, and the proxy parses SQL as UTF-8 with
standard_conforming_strings on: a client encoding whose multi-byte characters contain ASCII
bytes (SJIS, BIG5, GBK, ...) or standard_conforming_strings=off would let the same bytes mean
one thing to the proxy and another to the server. Those are refused outright.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SPECIAL = frozenset({"user", "database", "options", "replication"})
# Harmless session cosmetics every driver sends: not worth a decision per connection.
COSMETIC = frozenset({"application_name", "fallback_application_name", "datestyle", "timezone",
                      "extra_float_digits", "intervalstyle", "client_encoding"})
# Client-only encodings whose second bytes can be ASCII (normalized: lower case, no - or _).
UNSAFE_ENCODINGS = frozenset({"big5", "win950", "cp950", "gbk", "win936", "cp936", "sjis", "shiftjis",
                              "mskanji", "win932", "cp932", "shiftjis2004", "uhc", "win949", "cp949",
                              "gb18030", "johab"})
_FALSE = frozenset({"false", "off", "no", "0", "f", "n"})


class StartupRefused(Exception):
    """The startup packet asks for something the relay does not do; the message says what."""


def encoding_safe(name: str) -> bool:
    return re.sub(r"[-_ ]", "", name.lower()) not in UNSAFE_ENCODINGS


def setting_safe(name: str, value: str) -> bool:
    """Whether the server may run with this setting and still read SQL as the proxy does."""
    name = name.lower()
    if name == "client_encoding":
        return encoding_safe(value)
    if name == "standard_conforming_strings":
        return value.strip().lower() not in _FALSE
    return True


def split_options(options: str) -> list[str]:
    """The `options` parameter split as the server splits it: on whitespace, with a backslash
    taking the next character literally."""
    out: list[str] = []
    cur: list[str] = []
    i, n = 0, len(options)
    while i < n:
        ch = options[i]
        if ch.isspace():
            if cur:
                out.append("".join(cur))
                cur = []
        elif ch == "\\" and i + 1 < n:
            i += 1
            cur.append(options[i])
        else:
            cur.append(ch)
        i += 1
    if cur:
        out.append("".join(cur))
    return out


def settings(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """(name, value) for every setting the startup packet applies, in order. Raises
    StartupRefused for replication connections, option switches other than -c/--name=value,
    and settings that would break SQL parsing."""
    repl = params.get("replication")
    if repl is not None and repl.strip().lower() not in _FALSE:
        raise StartupRefused("replication connections are not relayed")
    out = [(k, v) for k, v in params.items() if k not in SPECIAL and not k.startswith("_pq_.")]
    tokens = split_options(params.get("options", ""))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            body = tokens[i + 1]
            i += 2
        elif tok.startswith("-c") and len(tok) > 2:
            body, i = tok[2:], i + 1
        elif tok.startswith("--") and len(tok) > 2:
            body, i = tok[2:], i + 1
        else:
            raise StartupRefused(f"startup option {tok[:40]!r} is not relayed (only -c name=value)")
        name, eq, value = body.partition("=")
        if not eq or not name:
            raise StartupRefused(f"startup option {body[:40]!r} is not name=value")
        out.append((name.replace("-", "_"), value))
    for name, value in out:
        if not setting_safe(name, value):
            raise StartupRefused(f"{name}={value} would make the proxy and the server read SQL differently")
    return out


def as_sql(name: str, value: str) -> str:
    """A SET statement with the same effect, for the SQL analyzer and the policy."""
    ident = ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
    return f"SET {ident} TO '" + value.replace("'", "''") + "'"


def judged(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """The settings worth a policy decision (cosmetic ones are only checked for safety)."""
    return [(k, v) for k, v in settings(params) if k.lower() not in COSMETIC]
