"""Sensitive-value detectors shared by every protocol handler and the recorder.

Two kinds of evidence:
- content detectors find sensitive spans in text (emails, card numbers that pass Luhn, national
  ids with valid check digits, API keys and tokens by their documented prefixes, JWTs, PEM
  private keys, credentials in URLs and `key=value` settings);
- column rules judge a field by its name (`password_hash`, `api_key`, `ssn`), for values that
  carry no recognizable shape (a bcrypt hash, a bare nine-digit SSN).

Detectors prefer precision through validation (checksums, prefixes, boundaries) over loose
patterns: a masker that eats every number breaks the agent's work and gets turned off.

    find("mail bob@example.com")            -> [Finding("email", 5, 20)]
    mask_text("key AKIAIOSFODNN7EXAMPLE")   -> "key [masked:aws_access_key]"
    column_category("user_password_hash")   -> "password"
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    detector: str
    start: int
    end: int


@dataclass(frozen=True)
class Detector:
    """pattern finds candidates; group selects the sensitive part (e.g. only the password of a
    URL); validate rejects candidates whose check digits fail; quick is a cheap test that must
    pass before the regex runs (most values contain no '@', no digit run, no 'eyJ'): it must be
    true of every text the pattern can match in, so it only ever saves work."""

    name: str
    pattern: re.Pattern[str]
    group: int = 0
    validate: Callable[[str], bool] | None = None
    quick: Callable[[str], object] | None = None  # truthy when the regex may match
    # Digits any match needs (counted as the regex's \d counts them): at least `min_digits` in
    # the text and a run of `min_run` in a row. Cheaper than most quick checks, and like them
    # only a saving: a text short of them cannot hold a match.
    min_digits: int = 0
    min_run: int = 0


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string (card numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    # Issuer ranges start with 2-6 (Mastercard 2-series, Amex/Diners/JCB 3, Visa 4, MC 5, Discover 6).
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits)


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _es_dni_ok(text: str) -> bool:
    t = text.replace("-", "").upper()
    body, letter = t[:-1], t[-1]
    if body[0] in "XYZ":
        body = str("XYZ".index(body[0])) + body[1:]
    return body.isdigit() and _DNI_LETTERS[int(body) % 23] == letter


def _iban_ok(text: str) -> bool:
    t = text.replace(" ", "")
    if not 15 <= len(t) <= 34:
        return False
    rearranged = t[4:] + t[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _phone_ok(text: str) -> bool:
    n = sum(ch.isdigit() for ch in text)
    return 8 <= n <= 15


def _digits(min_run: int) -> Callable[[str], object]:
    return re.compile(rf"\d{{{min_run}}}").search


def _contains(*needles: str) -> Callable[[str], object]:
    if len(needles) == 1:
        needle = needles[0]
        return lambda text: needle in text
    return re.compile("|".join(map(re.escape, needles))).search


def _contains_ci(*needles: str) -> Callable[[str], object]:
    search = re.compile("|".join(map(re.escape, needles)), re.IGNORECASE).search
    low = tuple(n.lower() for n in needles)

    def quick(text: str) -> object:
        if not text.isascii():  # Unicode case folding: let the regex decide
            return search(text)
        folded = text.lower()
        for n in low:  # (a loop, not any() over a generator: this runs for every text masked)
            if n in folded:
                return True
        return False

    return quick


def _pattern(regex: str) -> Callable[[str], object]:
    return re.compile(regex).search


_SECRET_KEY = re.compile(r"(?i)password|passwd|pwd|secret|token|api[_-]?key|apikey|private[_-]?key|access[_-]?key")


def _secret_key_ok(text: str) -> bool:
    # The regex takes any short key; checking the name here keeps matching linear.
    key = re.match(r"[\w.-]+", text)
    return key is not None and _SECRET_KEY.search(key.group(0)) is not None


DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector("private_key", re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S),
            quick=_contains("PRIVATE KEY")),
        Detector("jwt", re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
                 quick=_contains("eyJ")),
        Detector("aws_access_key", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)"
                                              r"[A-Z0-9]{16}(?![A-Za-z0-9])"),
                 quick=_contains("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA")),
        Detector("github_token", re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}"
                                            r"|github_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])"),
                 quick=_contains("gh", "github_pat_")),
        Detector("openai_key", re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}"), quick=_contains("sk-")),
        Detector("stripe_key", re.compile(r"(?<![\w])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"),
                 quick=_contains("_live_", "_test_")),
        Detector("slack_token", re.compile(r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}"), quick=_contains("xox")),
        Detector("google_api_key", re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])"), quick=_contains("AIza")),
        Detector("url_credentials", re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^/\s:@]{0,256}"
                                               r":([^/\s@]{1,256})@"), group=1,
                 quick=_contains("://")),
        Detector("sql_password", re.compile(r"(?i)\bpassword\s+'((?:[^']|''){0,1024})'"), group=1,
                 quick=_contains_ci("password")),
        Detector("secret_assignment", re.compile(
            r"""(?<![\w.-])[\w.-]{1,64}["']?[ \t]{0,16}[:=][ \t]{0,16}"""
            r"""(?:"([^"\n]{0,1024})"|'([^'\n]{0,1024})'|([^\s'",;&]{1,1024}))"""),
            group=-1, validate=_secret_key_ok,
            quick=_contains_ci("pass", "pwd", "secret", "token", "key")),
        Detector("email", re.compile(
            r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
            r"[A-Za-z]{2,63}(?![\w-])"), quick=_contains("@")),
        Detector("credit_card", re.compile(
            r"(?<![\d-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?|\d{4}([ -]?)\d{6}\2\d{4,5}|\d{13,19})"
            r"(?![\d-])"), validate=_card_ok, quick=_pattern(r"\d{4}[ -]?\d{4}"), min_digits=13, min_run=4),
        Detector("us_ssn", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])"),
                 quick=_pattern(r"\d{3}[- ]\d{2}[- ]\d{4}"), min_digits=9, min_run=4),
        Detector("uk_nino", re.compile(
            r"(?<![A-Za-z0-9])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
            r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])"), quick=_pattern(r"\d{2} ?\d{2} ?\d{2} ?[A-D]"),
            min_digits=6, min_run=2),
        Detector("es_dni", re.compile(r"(?<![A-Za-z0-9])(?:\d{8}|[XYZ]-?\d{7})-?[A-HJ-NP-TV-Z](?![A-Za-z0-9])"),
                 validate=_es_dni_ok, quick=_digits(7), min_digits=7, min_run=7),
        Detector("iban", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?"
                                    r"(?![A-Za-z0-9])"), validate=_iban_ok, quick=_pattern(r"[A-Z]{2}\d{2}"), min_digits=2,
            min_run=2),
        Detector("phone", re.compile(
            r"(?<![\w+])(?:\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
            r"|\(?[2-9]\d{2}\)?[ .-]\d{3}[ .-]\d{4})(?![\w])"),
            validate=_phone_ok, quick=_pattern(r"\+[1-9]|\d{3}\)?[ .-]\d{3}"), min_digits=8, min_run=1),
    )
}

_ALL = tuple(DETECTORS.values())

# Names a policy may use in Decision.mask to mean several detectors at once.
GROUPS: dict[str, frozenset[str]] = {
    "api_key": frozenset({"aws_access_key", "github_token", "openai_key", "stripe_key", "slack_token",
                          "google_api_key"}),
    "secrets": frozenset({"private_key", "jwt", "aws_access_key", "github_token", "openai_key", "stripe_key",
                          "slack_token", "google_api_key", "url_credentials", "sql_password",
                          "secret_assignment"}),
    "national_id": frozenset({"us_ssn", "uk_nino", "es_dni"}),
    "pii": frozenset({"email", "phone", "us_ssn", "uk_nino", "es_dni", "credit_card", "iban"}),
    "financial": frozenset({"credit_card", "iban"}),
}
GROUPS["all"] = frozenset(DETECTORS)


def resolve(names: Iterable[str] | None) -> tuple[Detector, ...]:
    """Detectors for a list of detector and group names; None means all. Unknown names are
    ignored here (a rule may also name columns); use `known()` to validate a policy."""
    if names is None:
        return tuple(DETECTORS.values())
    wanted: set[str] = set()
    for n in names:
        if n in GROUPS:
            wanted |= GROUPS[n]
        elif n in DETECTORS:
            wanted.add(n)
    return tuple(d for name, d in DETECTORS.items() if name in wanted)


def known(name: str) -> bool:
    return name in DETECTORS or name in GROUPS


_DIGIT_RUNS = re.compile(r"\d+").findall


def find(text: str, detectors: Iterable[Detector] | None = None) -> list[Finding]:
    """Sensitive spans in `text`, sorted and non-overlapping (the earlier, then longer, wins)."""
    if len(text) < 13 and text.isascii() and text.isdigit():
        # A bare short number (an id, a count, a bound parameter): only a card number is all
        # digits, and it has at least 13; every other detector needs a letter, a sign or a separator.
        return []
    found: list[Finding] = []
    total = longest = -1  # digits in the text, and its longest run of them: counted when first needed
    chosen = _ALL if detectors is None else detectors  # (not inline: Cython 3.3 cannot compile that)
    for d in chosen:
        if d.min_digits:
            if total < 0:
                runs = _DIGIT_RUNS(text)
                total, longest = sum(map(len, runs)), max(map(len, runs), default=0)
            if total < d.min_digits or longest < d.min_run:
                continue
        if d.quick is not None and not d.quick(text):
            continue
        for m in d.pattern.finditer(text):
            if d.validate is not None and not d.validate(m.group(0)):
                continue
            if d.group == -1:  # the last group that matched (alternative quoting styles)
                g = m.lastindex or 0
                start, end = m.span(g)
            else:
                start, end = m.span(d.group)
            if start < end:
                found.append(Finding(d.name, start, end))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    out: list[Finding] = []
    last_end = -1
    for f in found:
        if f.start >= last_end:
            out.append(f)
            last_end = f.end
    return out


def span_registry() -> dict[str, Callable[[str], list[tuple[int, int]]]]:
    """Every detector and group name → a function returning the sensitive (start, end) spans of
    a text: the plain-callable shape protocol handlers can take without importing this module."""

    def make(dets: tuple[Detector, ...]) -> Callable[[str], list[tuple[int, int]]]:
        def spans(text: str) -> list[tuple[int, int]]:
            return [(f.start, f.end) for f in find(text, dets)]

        return spans

    names = [*DETECTORS, *GROUPS]
    return {n: make(resolve([n])) for n in names}


def placeholder(name: str) -> str:
    """What a masked span becomes. ASCII without quotes, commas, braces or backslashes, so it
    stays valid inside JSON strings, XML text and PostgreSQL array literals."""
    return f"[masked:{name}]"


def mask_text(text: str, detectors: Iterable[Detector] | None = None,
              replace: Callable[[str], str] = placeholder) -> str:
    """`text` with every finding replaced (for recordings, summaries and text values)."""
    findings = find(text, detectors)
    if not findings:
        return text
    parts = []
    pos = 0
    for f in findings:
        parts.append(text[pos:f.start])
        parts.append(replace(f.detector))
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Column-name rules

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")

# A trailing word that makes the column *about* a secret rather than the secret itself:
# password_changed_at, token_count, api_key_id, email_verified.
_METADATA_WORDS = frozenset({
    "at", "on", "date", "time", "count", "counts", "type", "kind", "usage", "used", "limit", "limits", "total",
    "expires", "expiry", "expiration", "length", "len", "id", "ids", "scope", "scopes", "format", "hint",
    "policy", "updated", "created", "changed", "version", "status", "reset", "required", "enabled",
    "algorithm", "algo", "verified", "confirmed", "prefix", "last4", "name", "label", "strength", "set",
})

_SINGLE = {
    "password": "password", "passwd": "password", "pwd": "password", "passphrase": "password",
    "pass": "password", "secret": "secret", "secrets": "secret", "token": "token", "tokens": "token",
    "apikey": "api_key", "ssn": "ssn", "nino": "national_id", "passport": "national_id",
    "cvv": "credit_card", "cvc": "credit_card", "cvv2": "credit_card", "ccnum": "credit_card",
    "iban": "bank_account", "dob": "date_of_birth", "birthdate": "date_of_birth",
    "birthday": "date_of_birth", "credentials": "secret", "credential": "secret",
}

_PAIRS = {
    ("api", "key"): "api_key", ("access", "key"): "api_key", ("secret", "key"): "api_key",
    ("private", "key"): "api_key", ("signing", "key"): "api_key", ("encryption", "key"): "api_key",
    ("social", "security"): "ssn", ("national", "id"): "national_id", ("tax", "id"): "national_id",
    ("credit", "card"): "credit_card", ("card", "number"): "credit_card", ("cc", "number"): "credit_card",
    ("card", "cvc"): "credit_card", ("account", "number"): "bank_account", ("routing", "number"): "bank_account",
    ("bank", "account"): "bank_account", ("date", "of"): "date_of_birth", ("birth", "date"): "date_of_birth",
}

COLUMN_CATEGORIES = frozenset(_SINGLE.values()) | frozenset(_PAIRS.values())


def column_words(name: str) -> list[str]:
    """Lower-case words of a column name: snake_case, camelCase, kebab-case and dotted."""
    return [w.lower() for w in _WORD.findall(name)]


def column_category(name: str) -> str | None:
    """The sensitive category a column's name implies, or None."""
    words = column_words(name)
    if not words:
        return None
    if len(words) >= 2 and (words[-2], words[-1]) in _PAIRS:  # tax_id, birth_date end in metadata words
        return _PAIRS[(words[-2], words[-1])]
    if words[-1] in _METADATA_WORDS:
        return None
    for a, b in zip(words, words[1:], strict=False):
        cat = _PAIRS.get((a, b))
        if cat is not None:
            return cat
    for w in words:
        cat = _SINGLE.get(w)
        if cat is not None:
            return cat
    return None
