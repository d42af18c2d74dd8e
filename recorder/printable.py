"""One escaping function for every human-readable view of what agents control.

An agent chooses its argv, comm, exe path, SNI, Host, HTTP paths, SQL text and DNS names. Printed
raw, a newline in any of them makes a line the reader takes for a real event, and an ANSI or
bidirectional control rewrites what is already on the screen (erase the line above, conceal,
reverse the order of the text). `printable` makes each such string one visible run of text:
the reader sees that the agent sent a control, never its effect. JSON output is not escaped
(json.dumps already writes controls and non-ASCII as \\uXXXX), so it stays exact.
"""

from __future__ import annotations

import re
import unicodedata

# Characters that are not text on a terminal: controls (C0, DEL, C1: Cc), format characters
# (bidi overrides and isolates, zero-width joiners, BOM: Cf), line and paragraph separators
# (Zl, Zp) and lone surrogates from undecodable bytes (Cs). The backslash is escaped as well, so
# an agent cannot write a literal "\n" that reads like an escaped newline.
_HIDDEN = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# Fast path: printable ASCII without a backslash is already safe.
_PLAIN = re.compile(r"[ -\[\]-~]*")


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    if unicodedata.category(ch) not in _HIDDEN:
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(value: object) -> str:
    """`value` as text that prints as itself on one line: controls, ESC, DEL, C1, newlines,
    bidi and other format characters become \\n, \\xNN, \\uNNNN escapes; a backslash becomes
    \\\\. None prints as ''. Safe to apply to any field, agent-controlled or not."""
    if value is None:
        return ""
    s = value if isinstance(value, str) else str(value)
    if _PLAIN.fullmatch(s):
        return s
    return "".join(_escape(ch) for ch in s)
