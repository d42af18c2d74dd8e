"""AWS Signature Version 4, written from the published specification, for re-signing.

The agent holds placeholder keys; its SDK signs every request with them. The proxy judges the
request and, if allowed, calls resign(): the placeholder signature is dropped and the request is
signed again with the real credentials, keeping what the SDK chose — region and service of the
credential scope, the set of signed headers, the payload hash it declared — so the service sees
exactly the request the SDK meant. Only the date (refreshed by default, since a request held for
approval may be older than the 15 minutes AWS tolerates), the access key, the security token and
the signature change.

Payload: S3 requests declare their payload hash in x-amz-content-sha256 (a real hash,
UNSIGNED-PAYLOAD, or STREAMING-UNSIGNED-PAYLOAD-TRAILER) and are re-signed without reading the
body, so bodies keep streaming. Other services sign sha256(body): pass body= (they are small
JSON/form documents). Chunk-signed uploads (STREAMING-AWS4-HMAC-SHA256-PAYLOAD…) and SigV4a are
refused with SigV4Error: their chunk signatures chain from the seed and would all need rewriting.

Presigned URLs (X-Amz-Signature in the query) are re-signed in the query, keeping their date and
expiry, since those are what the URL's creator chose.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

from proxy.http.model import Headers, RequestHead

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_PAYLOAD_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
# Payload hashes whose chunks carry their own signatures: not re-signable header-only.
_CHUNK_SIGNED = ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD")

# Services whose canonical URI is the path as sent (no second encoding, no dot-segment removal).
S3_LIKE_SERVICES = frozenset({"s3", "s3-object-lambda", "s3-outposts", "s3express"})

# Not signed on fresh signatures: hop-by-hop fields that intermediaries rewrite, and tracing or
# client-identification fields that proxies and SDK middleware change after signing.
UNSIGNED_HEADERS = frozenset({
    "authorization", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "expect", "user-agent", "x-amzn-trace-id", "traceparent", "tracestate",
    "baggage",
})

QUERY_SIGNATURE = "X-Amz-Signature"

QueryStyle = Literal["strict", "raw"]
QUERY_STYLES: tuple[QueryStyle, ...] = ("strict", "raw")


class SigV4Error(Exception):
    """The request is not something this signer can (re)sign; the proxy should refuse it."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never let a secret reach a log line
        return f"Credentials(access_key={self.access_key!r}, secret_key='***', token={'***' if self.token else None})"


@dataclass(frozen=True)
class Scope:
    date: str  # YYYYMMDD
    region: str
    service: str

    def __str__(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"

    @classmethod
    def parse(cls, text: str) -> Scope:
        parts = text.split("/")
        if len(parts) != 4 or parts[3] != "aws4_request" or len(parts[0]) != 8 or not parts[0].isdigit():
            raise SigV4Error(f"malformed credential scope {text!r}")
        return cls(parts[0], parts[1], parts[2])


@dataclass(frozen=True)
class AuthInfo:
    """What a SigV4 signature says about itself (from the header or the presigned query)."""

    access_key: str
    scope: Scope
    signed_headers: tuple[str, ...]
    signature: str
    presigned: bool = False


def parse_credential(value: str) -> tuple[str, Scope]:
    """'AKID/20240101/us-east-1/s3/aws4_request' -> (AKID, Scope). Access keys have no '/'."""
    akid, sep, rest = value.partition("/")
    if not sep or not akid:
        raise SigV4Error("malformed credential")
    return akid, Scope.parse(rest)


def parse_authorization(value: str) -> AuthInfo:
    """Parse 'AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…'."""
    algo, _, rest = value.strip().partition(" ")
    if algo != ALGORITHM:
        raise SigV4Error(f"unsupported authorization scheme {algo[:40]!r}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        k, eq, v = part.strip().partition("=")
        if eq:
            fields[k.strip()] = v.strip()
    try:
        akid, scope = parse_credential(fields["Credential"])
        signed = tuple(h for h in fields["SignedHeaders"].lower().split(";") if h)
        sig = fields["Signature"]
    except KeyError as e:
        raise SigV4Error(f"authorization lacks {e.args[0]}") from e
    return AuthInfo(akid, scope, signed, sig)


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """SigV4 UriEncode: every byte but A-Z a-z 0-9 - _ . ~ is %XX (upper case), UTF-8 first."""
    return quote(text, safe="/~" if keep_slash else "~")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 plus collapsing of empty segments, as SigV4 asks for non-S3 services."""
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
        else:
            out.append(seg)
    res = "/" + "/".join(out)
    if path.endswith("/") and out:
        res += "/"
    return res


def canonical_uri(raw_path: str, *, s3: bool) -> str:
    """The path part of the canonical request, from the path exactly as it is on the wire."""
    if not raw_path:
        return "/"
    if s3:
        return raw_path
    # The wire path is already encoded once; SigV4 encodes it again for every service but S3.
    return uri_encode(_remove_dot_segments(raw_path), keep_slash=True)


def _query_pairs(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        pairs.append((unquote(k), unquote(v)))
    return pairs


def canonical_query(raw_query: str, *, exclude: Iterable[str] = (), style: QueryStyle = "strict") -> str:
    """Name=value pairs sorted by name then value.

    strict: decoded then re-encoded, as the specification describes. raw: the pairs as they are
    on the wire, which is what some SDKs sign; both agree whenever the SDK encoded strictly, and
    resign() finds out which one the agent's SDK used when they do not (a '+' in a value, say).
    """
    skip = set(exclude)
    if style == "raw":
        pairs = []
        for part in raw_query.split("&"):
            if not part:
                continue
            k, _, v = part.partition("=")
            if unquote(k) not in skip:
                pairs.append((k, v))
        enc = sorted(pairs)
    else:
        enc = sorted((uri_encode(k), uri_encode(v)) for k, v in _query_pairs(raw_query) if k not in skip)
    return "&".join(f"{k}={v}" for k, v in enc)


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(headers: Iterable[tuple[str, str]], signed: Sequence[str]) -> str:
    """'name:value\\n' for each signed header, sorted; repeated fields joined with ','."""
    want = {s.lower() for s in signed}
    values: dict[str, list[str]] = {}
    for k, v in headers:
        lk = k.lower()
        if lk in want:
            values.setdefault(lk, []).append(_trim(v))
    missing = want - values.keys()
    if missing:
        raise SigV4Error(f"signed header(s) missing from request: {', '.join(sorted(missing))}")
    return "".join(f"{k}:{','.join(values[k])}\n" for k in sorted(values))


def canonical_request(method: str, raw_path: str, raw_query: str, headers: Iterable[tuple[str, str]],
                      signed_headers: Sequence[str], payload_hash: str, *, s3: bool,
                      exclude_query: Iterable[str] = (), query_style: QueryStyle = "strict") -> str:
    signed = sorted({s.lower() for s in signed_headers})
    return "\n".join([
        method.upper(),
        canonical_uri(raw_path, s3=s3),
        canonical_query(raw_query, exclude=exclude_query, style=query_style),
        canonical_headers(headers, signed),
        ";".join(signed),
        payload_hash,
    ])


def string_to_sign(amz_date: str, scope: Scope, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, str(scope), hashlib.sha256(canonical.encode("utf-8")).hexdigest()])


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_key: str, scope: Scope) -> bytes:
    k = _hmac(("AWS4" + secret_key).encode("utf-8"), scope.date)
    k = _hmac(k, scope.region)
    k = _hmac(k, scope.service)
    return _hmac(k, "aws4_request")


def signature(secret_key: str, amz_date: str, scope: Scope, canonical: str) -> str:
    return hmac.new(signing_key(secret_key, scope), string_to_sign(amz_date, scope, canonical).encode("utf-8"),
                    hashlib.sha256).hexdigest()


def amz_date(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("aware datetime required")
    return now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def authorization_header(access_key: str, scope: Scope, signed_headers: Sequence[str], sig: str) -> str:
    signed = ";".join(sorted({s.lower() for s in signed_headers}))
    return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={sig}"


def _payload_hash(headers: Headers, body: bytes | None) -> str:
    declared = headers.get("x-amz-content-sha256")
    if declared is not None:
        declared = declared.strip()
        if declared.startswith(_CHUNK_SIGNED):
            raise SigV4Error(f"chunk-signed payload {declared} cannot be re-signed by header alone")
        return declared
    if body is None:
        raise SigV4Error("payload hash unknown: pass the body")
    return hashlib.sha256(body).hexdigest()


def sign(head: RequestHead, creds: Credentials, region: str, service: str, *, body: bytes | None = None,
         payload_hash: str | None = None, now: dt.datetime | None = None,
         signed_headers: Sequence[str] | None = None, query_style: QueryStyle = "strict") -> RequestHead:
    """A fresh header signature. For S3 the payload hash is also sent as x-amz-content-sha256,
    which S3 requires; UNSIGNED-PAYLOAD there lets a large body stream without hashing first."""
    h = head.copy()
    s3 = service in S3_LIKE_SERVICES
    date = amz_date(now)
    h.headers.remove("authorization")
    h.headers.set("X-Amz-Date", date)
    if creds.token:
        h.headers.set("X-Amz-Security-Token", creds.token)
    if payload_hash is None:
        payload_hash = _payload_hash(h.headers, body if body is not None else b"")
    if s3:
        h.headers.set("X-Amz-Content-SHA256", payload_hash)
    if "host" not in h.headers:
        raise SigV4Error("Host header required")
    names = signed_headers or sorted({k.lower() for k, _ in h.headers if k.lower() not in UNSIGNED_HEADERS})
    scope = Scope(date[:8], region, service)
    cr = canonical_request(h.method, h.path, h.query, h.headers, names, payload_hash, s3=s3, query_style=query_style)
    h.headers.add("Authorization", authorization_header(creds.access_key, scope, names,
                                                        signature(creds.secret_key, date, scope, cr)))
    return h


def auth_info(head: RequestHead) -> AuthInfo | None:
    """The SigV4 signature the request carries, from its header or presigned query; None if unsigned."""
    auth = head.headers.get("authorization")
    if auth is not None:
        return parse_authorization(auth)
    params = dict(_query_pairs(head.query))
    if QUERY_SIGNATURE not in params:
        return None
    if params.get("X-Amz-Algorithm") != ALGORITHM:
        raise SigV4Error(f"unsupported presign algorithm {params.get('X-Amz-Algorithm', '')[:40]!r}")
    try:
        akid, scope = parse_credential(params["X-Amz-Credential"])
        signed = tuple(x for x in params["X-Amz-SignedHeaders"].lower().split(";") if x)
    except KeyError as e:
        raise SigV4Error(f"presigned URL lacks {e.args[0]}") from e
    return AuthInfo(akid, scope, signed, params[QUERY_SIGNATURE], presigned=True)


def _rewrite_query(raw_query: str, changes: dict[str, str | None], append: Sequence[str]) -> str:
    """Replace (or drop, for None) parameters by decoded name, keeping order; new ones go last in
    the order of append. Values are written strictly encoded."""
    out, seen = [], set()
    for part in raw_query.split("&"):
        if not part:
            continue
        name = unquote(part.partition("=")[0])
        if name in changes:
            seen.add(name)
            if changes[name] is not None:
                out.append(f"{uri_encode(name)}={uri_encode(changes[name] or '')}")
        else:
            out.append(part)
    for name in append:
        if name not in seen and changes.get(name) is not None:
            out.append(f"{uri_encode(name)}={uri_encode(changes[name] or '')}")
    return "&".join(out)


def _split_target(target: str) -> tuple[str, str]:
    path, _, query = target.partition("?")
    return path, query


def presign(head: RequestHead, creds: Credentials, region: str, service: str, *, expires: int = 3600,
            now: dt.datetime | None = None, body: bytes = b"") -> RequestHead:
    """A presigned URL for head (target gains the X-Amz-* query), signing only the Host header."""
    date = amz_date(now)
    scope = Scope(date[:8], region, service)
    s3 = service in S3_LIKE_SERVICES
    path, query = _split_target(head.target)
    params: dict[str, str | None] = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{creds.access_key}/{scope}",
        "X-Amz-Date": date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
        "X-Amz-Security-Token": creds.token,
    }
    query = _rewrite_query(query, params, list(params))
    payload = UNSIGNED_PAYLOAD if s3 else hashlib.sha256(body).hexdigest()
    cr = canonical_request(head.method, path, query, head.headers, ["host"], payload, s3=s3)
    sig = signature(creds.secret_key, date, scope, cr)
    return head.copy(target=f"{path}?{query}&{QUERY_SIGNATURE}={sig}")


def resign(head: RequestHead, creds: Credentials, *, body: bytes | None = None, now: dt.datetime | None = None,
           placeholder: Credentials | None = None, expected_access_key: str | None = None,
           refresh_date: bool = True) -> RequestHead:
    """The request signed with creds instead of the placeholder it carries; see the module docstring.

    placeholder: the credentials the agent was given. With them the agent's signature is checked
    first, which (a) refuses requests altered after signing or signed with any other key, so an
    agent cannot have the proxy launder a signature of its own, and (b) tells which query
    canonicalisation the agent's SDK used, so the new signature is made the same way.
    expected_access_key: the weaker check when only the placeholder's key id is known.
    """
    info = auth_info(head)
    if info is None:
        raise SigV4Error("request is not SigV4-signed")
    if placeholder is not None:
        expected_access_key = placeholder.access_key
    if expected_access_key is not None and not hmac.compare_digest(info.access_key, expected_access_key):
        raise SigV4Error("request is signed with an unexpected access key")
    style: QueryStyle = "strict"
    if placeholder is not None:
        found = matching_style(head, placeholder, body=body)
        if found is None:
            raise SigV4Error("the agent's signature does not verify with the placeholder key")
        style = found
    if info.presigned:
        return _resign_query(head, info, creds, body, style)
    h = head.copy()
    signed = {s.lower() for s in info.signed_headers}
    if refresh_date or "x-amz-date" not in h.headers:
        date = amz_date(now)
        h.headers.set("X-Amz-Date", date)
        signed.add("x-amz-date")
    else:
        date = (h.headers.get("x-amz-date") or "").strip()
    scope = Scope(date[:8], info.scope.region, info.scope.service)
    h.headers.remove("x-amz-security-token")
    if creds.token:
        # Signed whether or not the placeholder had one: the real token must not be swappable.
        h.headers.set("X-Amz-Security-Token", creds.token)
        signed.add("x-amz-security-token")
    else:
        signed.discard("x-amz-security-token")
    signed.add("host")
    present = {k.lower() for k, _ in h.headers}
    signed &= present | {"host"}
    payload = _payload_hash(h.headers, body)
    s3 = scope.service in S3_LIKE_SERVICES
    cr = canonical_request(h.method, h.path, h.query, h.headers, sorted(signed), payload, s3=s3, query_style=style)
    h.headers.set("Authorization", authorization_header(creds.access_key, scope, sorted(signed),
                                                        signature(creds.secret_key, date, scope, cr)))
    return h


def _resign_query(head: RequestHead, info: AuthInfo, creds: Credentials, body: bytes | None,
                  style: QueryStyle) -> RequestHead:
    path, query = _split_target(head.target)
    params = dict(_query_pairs(query))
    date = params.get("X-Amz-Date", "")
    if len(date) != 16:
        raise SigV4Error("presigned URL lacks a valid X-Amz-Date")
    scope = Scope(date[:8], info.scope.region, info.scope.service)
    changes: dict[str, str | None] = {
        "X-Amz-Credential": f"{creds.access_key}/{scope}",
        "X-Amz-Security-Token": creds.token,
        QUERY_SIGNATURE: None,
    }
    query = _rewrite_query(query, changes, ["X-Amz-Security-Token"])
    s3 = scope.service in S3_LIKE_SERVICES
    payload = _presigned_payload(head, s3, body)
    cr = canonical_request(head.method, path, query, head.headers, info.signed_headers, payload, s3=s3,
                           query_style=style)
    sig = signature(creds.secret_key, date, scope, cr)
    return head.copy(target=f"{path}?{query}&{QUERY_SIGNATURE}={sig}")


def _presigned_payload(head: RequestHead, s3: bool, body: bytes | None) -> str:
    if s3:
        return UNSIGNED_PAYLOAD
    declared = head.headers.get("x-amz-content-sha256")
    if declared:
        return declared.strip()
    return hashlib.sha256(body or b"").hexdigest()


def verify(head: RequestHead, creds: Credentials, *, body: bytes | None = None) -> bool:
    """Does head carry a valid signature by creds (dates and expiry not checked)?

    The proxy knows the placeholder secret it handed out, so this also checks that our
    canonicalisation reproduces the agent SDK's: if it does, the re-signed request will be too."""
    return matching_style(head, creds, body=body) is not None


def matching_style(head: RequestHead, creds: Credentials, *, body: bytes | None = None) -> QueryStyle | None:
    """The query canonicalisation under which head's signature by creds verifies, or None."""
    for style in QUERY_STYLES:
        try:
            if _verify(head, creds, body, style):
                return style
        except SigV4Error:
            return None
    return None


def _verify(head: RequestHead, creds: Credentials, body: bytes | None, style: QueryStyle) -> bool:
    info = auth_info(head)
    if info is None or info.access_key != creds.access_key:
        return False
    s3 = info.scope.service in S3_LIKE_SERVICES
    if info.presigned:
        path, query = _split_target(head.target)
        date = dict(_query_pairs(query)).get("X-Amz-Date", "")
        payload = _presigned_payload(head, s3, body)
        cr = canonical_request(head.method, path, query, head.headers, info.signed_headers, payload, s3=s3,
                               exclude_query=(QUERY_SIGNATURE,), query_style=style)
    else:
        date = (head.headers.get("x-amz-date") or "").strip()
        payload = _payload_hash(head.headers, body)
        cr = canonical_request(head.method, head.path, head.query, head.headers, info.signed_headers, payload,
                               s3=s3, query_style=style)
    if date[:8] != info.scope.date:
        return False
    want = signature(creds.secret_key, date, info.scope, cr)
    return hmac.compare_digest(want, info.signature)
