"""OIDC / JWT token validation against the issuer's published keys (pyjwt, JWKS).

One entry point for every token Interlock accepts — an agent's workload token (a CI job's, a
Kubernetes service account's) and an approver's ID token (central/web) alike::

    verifier = Verifier([Issuer("https://token.example", audience=("interlock",))])
    claims = verifier.validate(token)                 # dict of the verified claims
    claims = verifier.validate(id_token, nonce=n)     # ID token of a code flow: nonce checked

    claims = validate(token, issuer=..., audience=..., jwks_uri=None, nonce=None, leeway=30)

`validate` raises `TokenError` whose text says what failed and what was expected; `.reason` is
a short word for records and tests: malformed, algorithm, issuer, discovery, key, signature,
expired, not-yet-valid, audience, claim, nonce.

Checks, in this order, so nothing about an unaccepted issuer is ever fetched:
  1. the compact JWS shape, at most MAX_TOKEN_BYTES (RFC 7515 §7.1);
  2. `alg` in the issuer's allow-list: asymmetric only (RS*, PS*, ES*, EdDSA). `none` (RFC 7518
     §3.6) and HMAC (HS*: the public key would be the "secret") are always refused;
  3. `iss` is an accepted issuer, compared as an exact string (RFC 7519 §4.1.1, OIDC Core §2);
  4. the signing key: from the issuer's JWKS (`jwks_uri`, or OIDC Discovery 1.0 §4 —
     `{issuer}/.well-known/openid-configuration`, whose `issuer` must equal it), chosen by `kid`,
     its key type fitting `alg`; the key set is cached (KEYS_LIFESPAN) and fetched again once
     for an unknown `kid` (key rotation);
  5. the signature (RFC 7515 §5.2);
  6. `exp` required and in the future, `nbf`/`iat` not in the future, each with `leeway`
     seconds of clock skew (RFC 7519 §4.1.4-6);
  7. `aud` contains an accepted audience (RFC 7519 §4.1.3; OIDC Core §3.1.3.7 item 3);
  8. `sub` present (OIDC Core §2); `nonce` equal to the one given, when given (§3.1.3.7 item 11).
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt

MAX_TOKEN_BYTES = 16384
MAX_DOCUMENT_BYTES = 1 << 20  # discovery documents and key sets
DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
ASYMMETRIC = frozenset(DEFAULT_ALGORITHMS)
KEYS_LIFESPAN = 300.0  # seconds a fetched key set (and discovery document) is trusted before a refetch
FETCH_TIMEOUT = 5.0
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class TokenError(ValueError):
    """A token was refused. str(e): what failed, for a person; e.reason: one word, for records."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Issuer:
    """An accepted issuer: its exact `iss`, the audiences accepted from it, where its keys are
    (discovered from the issuer when jwks_uri is None) and the algorithms it may sign with."""

    issuer: str
    audience: tuple[str, ...]
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS

    def __post_init__(self):
        if isinstance(self.audience, str):
            object.__setattr__(self, "audience", (self.audience,))
        bad = [a for a in self.algorithms if a not in ASYMMETRIC]
        if bad:
            raise ValueError(f"issuer {self.issuer}: algorithms {bad} are not accepted "
                             f"(asymmetric only: {', '.join(DEFAULT_ALGORITHMS)})")
        if not self.audience:
            raise ValueError(f"issuer {self.issuer}: an audience is required")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _fetch_json(url: str, timeout: float) -> dict:
    if not url.lower().startswith(("https://", "http://")):
        raise TokenError("discovery", f"{url}: only http(s) URLs are fetched")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                                    timeout=timeout) as r:
            body = r.read(MAX_DOCUMENT_BYTES + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise TokenError("discovery", f"cannot fetch {url}: {getattr(e, 'reason', e)}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise TokenError("discovery", f"{url}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = json.loads(body)
    except ValueError:
        raise TokenError("discovery", f"{url}: not JSON") from None
    if not isinstance(doc, dict):
        raise TokenError("discovery", f"{url}: not a JSON object")
    return doc


def unverified(token: str) -> dict:
    """What a token claims about itself, NOT verified: for recording a refusal (never the token
    itself, which may be a live credential). Keys: alg, kid, iss, sub, aud, exp (absent ones omitted)."""
    out: dict = {}
    try:
        header = jwt.get_unverified_header(token)
        out.update({k: header[k] for k in ("alg", "kid") if isinstance(header.get(k), str)})
        body = jwt.decode(token, options={"verify_signature": False})
        out.update({k: body[k] for k in ("iss", "sub", "aud", "exp") if isinstance(body.get(k), str | int | float | list)})
    except (jwt.PyJWTError, TypeError, ValueError):
        pass
    return {k: (v[:200] if isinstance(v, str) else v) for k, v in out.items()}


class Verifier:
    """Validates tokens from a fixed set of issuers; keys are cached per issuer. Thread-safe."""

    def __init__(self, issuers: Iterable[Issuer], leeway: float = 30.0, timeout: float = FETCH_TIMEOUT):
        self.issuers = {i.issuer: i for i in issuers}
        self.leeway = leeway
        self.timeout = timeout
        self._clients: dict[str, tuple[float, jwt.PyJWKClient]] = {}
        self._lock = threading.Lock()

    def jwks_client(self, issuer: Issuer) -> jwt.PyJWKClient:
        """The issuer's key-set client; the discovery document is read again after KEYS_LIFESPAN."""
        with self._lock:
            hit = self._clients.get(issuer.issuer)
            if hit and (issuer.jwks_uri or time.monotonic() - hit[0] < KEYS_LIFESPAN):
                return hit[1]
        uri = issuer.jwks_uri
        if uri is None:
            url = issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
            doc = _fetch_json(url, self.timeout)
            if doc.get("issuer") != issuer.issuer:  # OIDC Discovery 1.0 §4.3
                raise TokenError("discovery", f"{url} names issuer {str(doc.get('issuer'))[:200]!r}, not {issuer.issuer!r}")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str) or not uri.lower().startswith(("https://", "http://")):
                raise TokenError("discovery", f"{url} has no http(s) jwks_uri")
        client = jwt.PyJWKClient(uri, cache_keys=False, lifespan=KEYS_LIFESPAN, timeout=self.timeout)
        with self._lock:
            self._clients[issuer.issuer] = (time.monotonic(), client)
        return client

    def validate(self, token: str, nonce: str | None = None, audience: Sequence[str] | None = None) -> dict:
        """The verified claims of `token` (see the module docstring); raises TokenError.
        `audience` narrows the issuer's accepted audiences for this call."""
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        if not isinstance(token, str):
            raise TokenError("malformed", "the token is not text")
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("malformed", f"the token is {len(token)} bytes, more than {MAX_TOKEN_BYTES}")
        if token.count(".") != 2:
            raise TokenError("malformed", "not a signed JWT (expected header.payload.signature)")
        try:
            header = jwt.get_unverified_header(token)
            body = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise TokenError("malformed", f"not a readable JWT: {e}") from None
        alg = header.get("alg")
        iss = body.get("iss")
        if not isinstance(iss, str):
            raise TokenError("claim", "the token has no issuer (iss)")
        issuer = self.issuers.get(iss)
        if alg is None or str(alg).lower() == "none":
            raise TokenError("algorithm", "the token is unsigned (alg: none); only signed tokens are accepted")
        if alg not in (issuer.algorithms if issuer else DEFAULT_ALGORITHMS):
            sym = " (HMAC with a shared secret is never accepted: the issuer's public key would serve as the secret)" \
                if str(alg).upper().startswith("HS") else ""
            accepted = ", ".join(issuer.algorithms if issuer else DEFAULT_ALGORITHMS)
            raise TokenError("algorithm", f"the token is signed with alg {str(alg)[:20]!r}{sym}; accepted: {accepted}")
        if issuer is None:
            raise TokenError("issuer", f"issuer {iss[:200]!r} is not accepted (accepted: {', '.join(self.issuers) or 'none configured'})")
        try:
            key = self._signing_key(self.jwks_client(issuer), header, alg)
        except jwt.PyJWKClientConnectionError as e:
            raise TokenError("discovery", f"cannot fetch the keys of issuer {iss}: {e}") from None
        except jwt.PyJWKClientError as e:
            kid = header.get("kid")
            raise TokenError("key", f"no key {str(kid)[:80]!r} in the JWKS of issuer {iss} (the token was signed with a "
                                    f"key the issuer does not publish): {e}" if kid else
                             f"the token names no key (kid) and the JWKS of issuer {iss} has no single key to use: {e}") from None
        except jwt.PyJWTError as e:
            raise TokenError("key", f"the JWKS of issuer {iss} is not usable: {e}") from None
        want = _KEY_TYPES.get(str(alg)[:2])
        kty = getattr(key, "key_type", None)
        if want and kty and kty != want:
            raise TokenError("algorithm", f"alg {alg} needs an {want} key; key {key.key_id!r} is {kty}")
        accepted = tuple(audience) if audience else issuer.audience
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=list(accepted), issuer=iss, leeway=self.leeway,
                                options={"require": ["exp", "iss", "sub", "aud"], "verify_iat": True})
        except jwt.ExpiredSignatureError:
            raise TokenError("expired", f"the token expired at {_when(float(body.get('exp', 0)))} (now {_when(time.time())}, "
                                        f"leeway {self.leeway:g}s): get a fresh token from its issuer") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("not-yet-valid", f"the token is not valid yet (nbf/iat {body.get('nbf', body.get('iat'))}, "
                                              f"now {int(time.time())}, leeway {self.leeway:g}s): check the clocks") from None
        except jwt.InvalidAudienceError:
            raise TokenError("audience", f"the token's audience {_short(body.get('aud'))} is not accepted "
                                         f"(expected: {', '.join(accepted)})") from None
        except jwt.InvalidIssuerError:
            raise TokenError("issuer", f"issuer {iss!r} does not match") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError("claim", f"the token lacks the required claim {e.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenError("signature", f"the signature does not verify with key {key.key_id!r} of issuer {iss} "
                                          "(signed with another key, or altered)") from None
        except jwt.PyJWTError as e:
            raise TokenError("malformed", f"the token is not valid: {e}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenError("claim", "the token's subject (sub) is missing or not text")
        if nonce is not None and not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise TokenError("nonce", "the token's nonce does not match this sign-in's (a replayed or foreign token)")
        return claims


    @staticmethod
    def _signing_key(client: jwt.PyJWKClient, header: dict, alg: str) -> jwt.PyJWK:
        """The key the header names (kid), or, with no kid, the JWKS's only signing key of the
        type alg needs (OIDC Core §10.1: a kid is required only when the set has several)."""
        kid = header.get("kid")
        if kid is not None:
            return client.get_signing_key(kid)
        want = _KEY_TYPES.get(str(alg)[:2])
        keys = [k for k in client.get_signing_keys() if want is None or k.key_type == want]
        if len(keys) != 1:
            raise jwt.PyJWKClientError(f"{len(keys)} candidate keys for alg {alg}")
        return keys[0]


def _short(value) -> str:
    return json.dumps(value)[:200]


def validate(token: str, *, issuer: str, audience: str | Sequence[str], jwks_uri: str | None = None,
             nonce: str | None = None, leeway: float = 30.0, algorithms: Sequence[str] = DEFAULT_ALGORITHMS) -> dict:
    """One-issuer form of Verifier.validate (keys cached per (issuer, jwks_uri) in this process)."""
    aud = (audience,) if isinstance(audience, str) else tuple(audience)
    key = (issuer, aud, jwks_uri, tuple(algorithms), leeway)
    with _SHARED_LOCK:
        v = _SHARED.get(key)
        if v is None:
            v = _SHARED[key] = Verifier([Issuer(issuer, aud, jwks_uri, tuple(algorithms))], leeway=leeway)
    return v.validate(token, nonce=nonce)


_SHARED: dict[tuple, Verifier] = {}
_SHARED_LOCK = threading.Lock()
