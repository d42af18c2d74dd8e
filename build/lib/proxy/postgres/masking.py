"""Masking of sensitive values in PostgreSQL results: DataRow rewriting, sans-IO.

The detectors themselves are protocol-neutral (policy/detectors.py); this module knows how a
value sits in a DataRow and what a client will do with it:

- text-like columns (text, varchar, char, name, json, jsonb, xml, unknown, user types in text
  format) get the sensitive span replaced by a placeholder, keeping the rest of the value;
- json/jsonb are parsed and rewritten as JSON, so the result still parses and keys like
  "password" mask their value wholesale;
- any other type (integers, dates, bytea, arrays in binary, ...) becomes NULL when masked: a
  placeholder in an int8 column would make the client's type decoding fail, NULL never does.

`RowMasker` is built once per RowDescription and applied to every DataRow of that result.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from policy import detectors as det
from proxy.postgres import wire

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

# Type OIDs from pg_type.dat.
TEXT, VARCHAR, BPCHAR, NAME, CHAR, UNKNOWN, JSON, JSONB, XML, BYTEA = 25, 1043, 1042, 19, 18, 705, 114, 3802, 142, 17
TEXT_ARRAYS = frozenset({1009, 1015, 1014, 1003, 199, 3807, 143})  # text[], varchar[], bpchar[], name[], json[], ...
# Values of these types print as text a placeholder can stand in for.
TEXT_LIKE = frozenset({TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN, JSON, JSONB, XML}) | TEXT_ARRAYS
# In binary format only these are plain UTF-8 (jsonb after its version byte).
BINARY_TEXT_LIKE = frozenset({TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN, JSON, JSONB, XML})
# Types whose text form cannot hold a name, number-like secret or token: not worth scanning.
INERT = frozenset({
    16, 21, 23, 26, 28, 27, 29, 700, 701, 1082, 1083, 1114, 1184, 1186, 1266, 2950, 869, 650, 829, 774,
    1560, 1562, 3220, 600, 601, 602, 603, 604, 628, 718, 3614, 3615, 3734, 2206, 24, 2202, 2203, 2204,
    2205, 4089, 4096, 1033,
})
FIRST_USER_OID = 16384


@dataclass(frozen=True)
class MaskSpec:
    """What to mask.

    detectors: content detectors to run (names resolved through policy.detectors).
    categories: column-name categories that mask a whole column (policy.detectors.column_category).
    columns: column names (lower case) masked whole whatever their name implies.
    """

    detectors: tuple[det.Detector, ...] = field(default_factory=lambda: det.resolve(None))
    categories: frozenset[str] = det.COLUMN_CATEGORIES
    columns: frozenset[str] = frozenset()

    @classmethod
    def from_names(cls, names: Iterable[str]) -> MaskSpec:
        """From Decision.mask: detector and group names, column categories, and column names.
        An empty list, "all" or "default" means every detector and every category."""
        names = list(names)
        cols = frozenset(n.lower() for n in names
                         if not det.known(n) and n not in det.COLUMN_CATEGORIES and n != "default")
        if not names or "default" in names or "all" in names:
            return cls(columns=cols)
        detector_names = [n for n in names if det.known(n)]
        cats = frozenset(n for n in names if n in det.COLUMN_CATEGORIES)
        return cls(detectors=det.resolve(detector_names), categories=cats, columns=cols)


DEFAULT_SPEC = MaskSpec()

_NONE, _WHOLE, _CONTENT = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Plan:
    mode: int
    type_oid: int
    binary: bool
    label: str  # category or column name for whole-column masking


class RowMasker:
    """Rewrites the DataRows of one result set.

    description: the RowDescription that precedes the rows.
    result_formats: the Bind message's result format codes (0/1/N rule) when the description
    came from Describe(statement), whose format codes are all zero before Bind; None trusts the
    description.

    mask(message) -> new DataRow bytes, or None when nothing changed (forward the original).
    `counts` tallies what was masked (detector or category names) for the recorder.
    """

    def __init__(self, description: wire.RowDescription, spec: MaskSpec = DEFAULT_SPEC,
                 result_formats: Sequence[int] | None = None):
        self.spec = spec
        self.counts: Counter[str] = Counter()
        plans = []
        for i, f in enumerate(description.fields):
            fmt = f.format if result_formats is None else _format_of(result_formats, i)
            plans.append(self._plan(f, fmt == 1))
        self._plans = tuple(plans)
        self.active = any(p.mode != _NONE for p in self._plans)

    def _plan(self, f: wire.FieldDescription, binary: bool) -> _Plan:
        name = f.name.lower()
        if name in self.spec.columns:
            return _Plan(_WHOLE, f.type_oid, binary, name)
        cat = det.column_category(f.name)
        if cat is not None and cat in self.spec.categories:
            return _Plan(_WHOLE, f.type_oid, binary, cat)
        if not self.spec.detectors:
            return _Plan(_NONE, f.type_oid, binary, "")
        if binary:
            scannable = f.type_oid in BINARY_TEXT_LIKE or f.type_oid == BYTEA
        else:
            scannable = f.type_oid not in INERT
        return _Plan(_CONTENT if scannable else _NONE, f.type_oid, binary, "")

    def mask(self, message: bytes | bytearray | memoryview) -> bytes | None:
        """Mask one complete DataRow message ('D' header included)."""
        if not self.active:
            return None
        mv = memoryview(message)
        if len(mv) < 7 or mv[0] != 0x44:
            raise wire.ProtocolError("not a DataRow message")
        (ncols,) = _I16.unpack_from(mv, 5)
        if ncols != len(self._plans):
            raise wire.ProtocolError(f"DataRow has {ncols} columns, RowDescription {len(self._plans)}")
        pos = 7
        end = len(mv)
        changes: list[tuple[int, int, bytes | None]] = []  # (start, end) of the length+value, new value
        for plan in self._plans:
            if pos + 4 > end:
                raise wire.ProtocolError("DataRow truncated")
            (n,) = _I32.unpack_from(mv, pos)
            vstart = pos + 4
            if n < -1 or vstart + max(n, 0) > end:
                raise wire.ProtocolError("DataRow value length invalid")
            vend = vstart + max(n, 0)
            if n >= 0 and plan.mode != _NONE:
                new = self._mask_value(plan, mv[vstart:vend])
                if new is not _UNCHANGED:
                    changes.append((pos, vend, new))  # type: ignore[arg-type]
            pos = vend
        if pos != end:
            raise wire.ProtocolError("DataRow has trailing bytes")
        if not changes:
            return None
        parts = [bytes(mv[5:7])]
        last = 7
        for start, stop, new in changes:
            parts.append(mv[last:start])
            parts.append(_I32.pack(-1) if new is None else _I32.pack(len(new)) + new)
            last = stop
        parts.append(mv[last:])
        body = b"".join(parts)
        return b"D" + _I32.pack(len(body) + 4) + body

    def _mask_value(self, plan: _Plan, raw: memoryview) -> bytes | None | object:
        oid = plan.type_oid
        if plan.mode == _WHOLE:
            self.counts[plan.label] += 1
            return _whole_placeholder(plan, det.placeholder(plan.label))
        # content
        if plan.binary:
            if oid == BYTEA:
                return self._null_if_found(bytes(raw).decode("utf-8", "ignore"))
            if oid == JSONB:
                if not len(raw) or raw[0] != 1:
                    return _UNCHANGED
                text = bytes(raw[1:]).decode("utf-8", "surrogateescape")
                new = self._mask_json(text)
                return _UNCHANGED if new is None else b"\x01" + new.encode("utf-8", "surrogateescape")
        text = bytes(raw).decode("utf-8", "surrogateescape")
        if oid in (JSON, JSONB):
            new = self._mask_json(text)
            return _UNCHANGED if new is None else new.encode("utf-8", "surrogateescape")
        if oid in TEXT_LIKE or (oid >= FIRST_USER_OID and not plan.binary):
            new = self._mask_str(text)
            return _UNCHANGED if new is None else new.encode("utf-8", "surrogateescape")
        if oid == BYTEA and text.startswith("\\x"):
            try:
                text = bytes.fromhex(text[2:]).decode("utf-8", "ignore")
            except ValueError:
                return _UNCHANGED
        return self._null_if_found(text)

    def _null_if_found(self, text: str) -> object:
        findings = det.find(text, self.spec.detectors)
        if not findings:
            return _UNCHANGED
        for f in findings:
            self.counts[f.detector] += 1
        return None

    def _mask_str(self, text: str) -> str | None:
        findings = det.find(text, self.spec.detectors)
        if not findings:
            return None
        out, pos = [], 0
        for f in findings:
            self.counts[f.detector] += 1
            out.append(text[pos:f.start])
            out.append(det.placeholder(f.detector))
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    def _too_deep(self) -> str:
        # Nesting beyond Python's recursion limit cannot be inspected: hide it rather than pass it.
        self.counts["json_too_deep"] += 1
        return json.dumps(det.placeholder("json_too_deep"))

    def _mask_json(self, text: str) -> str | None:
        """Mask inside a JSON document; None when unchanged. Invalid JSON is masked as text."""
        try:
            doc = json.loads(text)
        except ValueError:
            return self._mask_str(text)
        except RecursionError:
            return self._too_deep()
        changed = False

        def walk(v: object, key: str | None) -> object:
            nonlocal changed
            if key is not None and not isinstance(v, dict | list) and v is not None:
                cat = det.column_category(key)
                if (cat is not None and cat in self.spec.categories) or key.lower() in self.spec.columns:
                    label = cat if cat is not None and cat in self.spec.categories else key.lower()
                    self.counts[label] += 1
                    changed = True
                    return det.placeholder(label)
            if isinstance(v, str):
                new = self._mask_str(v)
                if new is not None:
                    changed = True
                    return new
                return v
            if isinstance(v, bool) or v is None:
                return v
            if isinstance(v, int | float):
                s = json.dumps(v)
                found = det.find(s, self.spec.detectors)
                if found:
                    for f in found:
                        self.counts[f.detector] += 1
                    changed = True
                    return det.placeholder(found[0].detector)
                return v
            if isinstance(v, list):
                return [walk(x, None) for x in v]
            if isinstance(v, dict):
                return {k: walk(x, k) for k, x in v.items()}
            return v

        try:
            result = walk(doc, None)
        except RecursionError:
            return self._too_deep()
        if not changed:
            return None
        return json.dumps(result, ensure_ascii=False)


_UNCHANGED = object()


def _whole_placeholder(plan: _Plan, text: str) -> bytes | None:
    oid = plan.type_oid
    if oid in (JSON, JSONB):
        doc = json.dumps(text).encode("utf-8")
        return b"\x01" + doc if plan.binary and oid == JSONB else doc
    if plan.binary:
        return text.encode("utf-8") if oid in BINARY_TEXT_LIKE else None
    if oid in TEXT_LIKE and oid not in TEXT_ARRAYS:
        return text.encode("utf-8")
    if oid >= FIRST_USER_OID:
        return text.encode("utf-8")
    return None


def _format_of(result_formats: Sequence[int], column: int) -> int:
    if not result_formats:
        return 0
    if len(result_formats) == 1:
        return result_formats[0]
    return result_formats[column] if column < len(result_formats) else 0


def mask_data_row(message: bytes | bytearray | memoryview, description: wire.RowDescription,
                  spec: MaskSpec = DEFAULT_SPEC, result_formats: Sequence[int] | None = None) -> bytes:
    """One-shot: the DataRow with sensitive values masked (the input bytes if nothing was)."""
    new = RowMasker(description, spec, result_formats).mask(message)
    return bytes(message) if new is None else new


def mask_copy_data(data: bytes | memoryview, spec: MaskSpec = DEFAULT_SPEC) -> bytes | None:
    """Mask a text/CSV COPY ... TO STDOUT chunk by content (no column names are available there).
    Placeholders contain no tab, comma, quote or backslash, so row structure is preserved.
    None when unchanged."""
    text = bytes(data).decode("utf-8", "surrogateescape")
    new = det.mask_text(text, spec.detectors)
    return None if new == text else new.encode("utf-8", "surrogateescape")


def mask_text(text: str, spec: MaskSpec = DEFAULT_SPEC) -> str:
    """Content masking for recordings (SQL text, error messages): detectors only."""
    return det.mask_text(text, spec.detectors)
