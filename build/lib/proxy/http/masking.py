"""Masking of JSON response bodies, and redaction of secrets for recordings.

Two different jobs, kept apart on purpose:

* mask_json / mask_json_bytes change what the *agent* sees when a Decision says MASK: values under
  named keys, and substrings found by detectors (email, card, …), are replaced. The JSON stays
  valid and keeps its shape, so a typed client still deserialises it.
* redact_headers / redact_query change what the *recorder* stores: credentials never reach the
  session database, whatever the policy said.

Detectors are plain callables str -> iterable of (start, end) spans, so policy/detectors.py (or
anything else) plugs in without this module importing it; regex_detector() makes one from a
pattern; policy.detectors.span_registry() is such a registry. A Decision's mask tuple mixes key
rules, detector names and field categories; MaskSpec.from_names sorts them out against the
registry, and with key_classifier (policy.detectors.column_category) a category such as
"password" masks every key whose name implies it (user_password, apiKey…).

Key rules: 'password' matches a key of that name at any depth (case-insensitive, fnmatch globs
allowed: '*token*'); a rule with dots matches the path of object keys from the root, list levels
skipped ('customer.email', 'items.*.card').
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

Detector = Callable[[str], Iterable[tuple[int, int]]]
# What a masked value becomes: fixed text, or text from the detector name ("field" for key rules),
# e.g. policy.detectors.placeholder -> "[masked:email]".
Replacement = str | Callable[[str], str]

REPLACEMENT = "***"
REDACTED = "[REDACTED]"

# Credentials in headers; the recorder must never hold them.
SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-amz-security-token",
    "x-api-key", "x-auth-token", "x-amz-server-side-encryption-customer-key",
    "x-amz-copy-source-server-side-encryption-customer-key",
})

# Query parameters that carry credentials (presigned URLs, OAuth, API keys).
SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-security-token", "x-amz-credential", "signature", "sig", "token",
    "access_token", "refresh_token", "id_token", "api_key", "apikey", "key", "secret", "client_secret",
    "password", "passwd", "auth", "code", "x-goog-signature", "x-goog-credential",
})


def regex_detector(pattern: str | re.Pattern[str]) -> Detector:
    """A detector from a regular expression: every match is a span to mask."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern

    def detect(text: str) -> Iterable[tuple[int, int]]:
        return [m.span() for m in rx.finditer(text)]

    return detect


@dataclass(frozen=True)
class MaskSpec:
    keys: tuple[str, ...] = ()
    detectors: Mapping[str, Detector] = field(default_factory=dict)
    replacement: Replacement = REPLACEMENT
    key_classifier: Callable[[str], str | None] | None = None

    def text_for(self, name: str) -> str:
        return self.replacement if isinstance(self.replacement, str) else self.replacement(name)

    @classmethod
    def from_names(cls, names: Iterable[str], registry: Mapping[str, Detector] | None = None,
                   *, replacement: Replacement = REPLACEMENT,
                   key_classifier: Callable[[str], str | None] | None = None) -> MaskSpec:
        """Split Decision.mask into detector names (found in registry) and key rules (the rest).
        With a key_classifier every name is also a key rule, since a name such as "api_key" is at
        once a detector of key-shaped values and the category of fields named like one."""
        registry = registry or {}
        keys: list[str] = []
        dets: dict[str, Detector] = {}
        for n in names:
            if n in registry:
                dets[n] = registry[n]
            if n not in registry or key_classifier is not None:
                keys.append(n)
        return cls(tuple(keys), dets, replacement, key_classifier)

    def _key_matches(self, path: tuple[str, ...]) -> bool:
        name = path[-1].lower()
        joined = ".".join(path).lower()
        if self.key_classifier is not None:
            cat = self.key_classifier(path[-1])
            if cat is not None and cat.lower() in {k.lower() for k in self.keys}:
                return True
        for rule in self.keys:
            r = rule.lower()
            if "." in r:
                if fnmatch.fnmatchcase(joined, r):
                    return True
            elif fnmatch.fnmatchcase(name, r):
                return True
        return False


@dataclass
class MaskReport:
    """What was masked, for the recorder: no values, only where and why."""

    fields: list[str] = field(default_factory=list)  # dotted key paths masked by key rule
    detector_hits: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.fields or self.detector_hits)


def _blank(value: Any, spec: MaskSpec) -> Any:
    """Mask a whole value but keep its JSON type, so typed clients still parse the document."""
    if isinstance(value, str):
        return spec.text_for("field")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return 0
    if isinstance(value, list):
        return [_blank(v, spec) for v in value]
    if isinstance(value, dict):
        return {k: _blank(v, spec) for k, v in value.items()}
    return spec.text_for("field")


def mask_text(text: str, detectors: Mapping[str, Detector], replacement: Replacement = REPLACEMENT,
              report: MaskReport | None = None) -> str:
    """Replace every span any detector finds; overlapping spans are merged (the first name wins)."""
    spans: list[tuple[int, int, str]] = []
    for name, det in detectors.items():
        found = [(s, e, name) for s, e in det(text) if 0 <= s < e <= len(text)]
        if found and report is not None:
            report.detector_hits[name] = report.detector_hits.get(name, 0) + len(found)
        spans.extend(found)
    if not spans:
        return text
    spans.sort()
    merged: list[list] = []
    for s, e, name in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e, name])
    out, pos = [], 0
    for s, e, name in merged:
        out.append(text[pos:s])
        out.append(replacement if isinstance(replacement, str) else replacement(name))
        pos = e
    out.append(text[pos:])
    return "".join(out)


def mask_json(doc: Any, spec: MaskSpec, report: MaskReport | None = None) -> Any:
    """A masked copy of a parsed JSON document; the input is not modified."""
    report = report if report is not None else MaskReport()

    def walk(v: Any, path: tuple[str, ...]) -> Any:
        if isinstance(v, dict):
            out = {}
            for k, sub in v.items():
                p = (*path, str(k))
                if spec.keys and spec._key_matches(p):
                    report.fields.append(".".join(p))
                    out[k] = _blank(sub, spec)
                else:
                    out[k] = walk(sub, p)
            return out
        if isinstance(v, list):
            return [walk(x, path) for x in v]
        if isinstance(v, str) and spec.detectors:
            return mask_text(v, spec.detectors, spec.replacement, report)
        return v

    return walk(doc, ())


def is_json_content_type(content_type: str | None) -> bool:
    """application/json, application/x-amz-json-1.1, application/problem+json, …"""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json") or "/x-amz-json" in mime or \
        mime in ("text/json", "application/x-ndjson")


def mask_json_bytes(body: bytes, spec: MaskSpec) -> tuple[bytes, MaskReport] | None:
    """Mask a JSON (or newline-delimited JSON) body. None when it is not JSON: the caller then
    decides, and a policy that asked for masking should fail closed rather than pass it through.
    Unchanged bodies come back byte-identical; changed ones are re-serialised compactly."""
    report = MaskReport()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            return None
        try:
            docs = [json.loads(ln) for ln in lines]
        except ValueError:
            return None
        masked = [mask_json(d, spec, report) for d in docs]
        if not report.changed:
            return body, report
        out = "\n".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")) for m in masked) + "\n"
        return out.encode(), report
    masked_doc = mask_json(doc, spec, report)
    if not report.changed:
        return body, report
    return json.dumps(masked_doc, ensure_ascii=False, separators=(",", ":")).encode(), report


def _redact_value(name: str, value: str) -> str:
    low = name.lower()
    if low in ("authorization", "proxy-authorization"):
        scheme = value.strip().split(" ", 1)[0]
        # Keep the scheme (Bearer, Basic, AWS4-HMAC-SHA256): it tells a reader what kind of auth it was.
        if scheme and scheme != value.strip() and len(scheme) <= 32:
            return f"{scheme} {REDACTED}"
        return REDACTED
    if low == "cookie":
        names = [c.split("=", 1)[0].strip() for c in value.split(";") if c.strip()]
        return "; ".join(f"{n}={REDACTED}" for n in names) if names else REDACTED
    if low == "set-cookie":
        first, _, attrs = value.partition(";")
        n = first.split("=", 1)[0].strip()
        return f"{n}={REDACTED}" + (f";{attrs}" if attrs else "")
    return REDACTED


def redact_headers(headers: Iterable[tuple[str, str]], extra: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers fit for a recording: secret values replaced, names and order kept."""
    secret = SECRET_HEADERS | {e.lower() for e in extra}
    return [(k, _redact_value(k, v) if k.lower() in secret else v) for k, v in headers]


def redact_query(query: str, extra: Iterable[str] = ()) -> str:
    """A raw query string with credential-bearing parameters' values replaced."""
    if not query:
        return query
    secret = SECRET_PARAMS | {e.lower() for e in extra}
    out = []
    for part in query.split("&"):
        k, eq, _v = part.partition("=")
        if eq and unquote(k).lower() in secret:
            out.append(f"{k}={quote(REDACTED)}")
        else:
            out.append(part)
    return "&".join(out)
