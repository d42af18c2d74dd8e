"""Approver sign-in: the OpenID Connect authorization code flow with PKCE, as a relying party.

Specs followed: OpenID Connect Core 1.0 §3.1 (code flow, `nonce`), OpenID Connect Discovery 1.0
(`/.well-known/openid-configuration`), RFC 6749 §4.1 (code grant, `state`), RFC 7636 (PKCE, S256).
Any standard provider works: everything is read from its discovery document. The ID token is
checked (signature against the provider's JWKS, issuer, audience, expiry, nonce) by
identity.oidc, the one validator Interlock has; this module only runs the flow.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp


class SignInError(Exception):
    """The flow failed; str(e) says why, for the page and the log."""


@dataclass(frozen=True)
class OIDCSettings:
    """issuer: the provider's issuer URL (discovery at issuer + /.well-known/openid-configuration).
    client_id / client_secret: this recorder's registration at the provider (secret optional: a
    public client relies on PKCE alone). redirect_uri: https://<recorder>/auth/callback as registered.
    groups_claim: the ID token claim that lists the approver's groups."""

    issuer: str
    client_id: str
    redirect_uri: str
    client_secret: str = ""
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    groups_claim: str = "groups"
    ca_file: str | None = None  # trust for the provider's TLS, when not the system's


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) per RFC 7636 §4.1-4.2: 43 unreserved characters from 32 random
    bytes, challenge = BASE64URL(SHA256(verifier)) without padding (method S256)."""
    verifier = secrets.token_urlsafe(32)
    return verifier, s256(verifier)


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


@dataclass
class Provider:
    """A provider's discovery document, fetched once and kept for `ttl` seconds."""

    settings: OIDCSettings
    ttl: float = 3600.0
    _doc: dict = field(default_factory=dict)
    _at: float = 0.0

    async def discovery(self, http: aiohttp.ClientSession) -> dict:
        if self._doc and time.monotonic() - self._at < self.ttl:
            return self._doc
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with http.get(url) as r:
                if r.status != 200:
                    raise SignInError(f"the provider's discovery document at {url} answered HTTP {r.status}")
                doc = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise SignInError(f"cannot read the provider's discovery document at {url}: {e}") from e
        for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(key), str):
                raise SignInError(f"the provider's discovery document at {url} has no {key}")
        if doc["issuer"].rstrip("/") != self.settings.issuer.rstrip("/"):
            raise SignInError(f"the discovery document names issuer {doc['issuer']!r}, not {self.settings.issuer!r}")
        self._doc, self._at = doc, time.monotonic()
        return doc

    async def authorization_url(self, http: aiohttp.ClientSession) -> tuple[str, dict]:
        """The URL to send the browser to, and what to keep in the session until the callback:
        {state, nonce, verifier} — each single-use, random, checked on return."""
        doc = await self.discovery(http)
        verifier, challenge = pkce_pair()
        pending = {"state": secrets.token_urlsafe(24), "nonce": secrets.token_urlsafe(24), "verifier": verifier,
                   "at": time.time()}
        query = {"response_type": "code", "client_id": self.settings.client_id, "redirect_uri": self.settings.redirect_uri,
                 "scope": " ".join(self.settings.scopes), "state": pending["state"], "nonce": pending["nonce"],
                 "code_challenge": challenge, "code_challenge_method": "S256"}
        sep = "&" if "?" in doc["authorization_endpoint"] else "?"
        return doc["authorization_endpoint"] + sep + urlencode(query), pending

    async def exchange(self, http: aiohttp.ClientSession, code: str, pending: dict) -> dict:
        """Trade the code (with the PKCE verifier) for tokens; validate the ID token (nonce included).
        Returns the ID token's claims plus "_id_token"."""
        doc = await self.discovery(http)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.settings.redirect_uri,
                "client_id": self.settings.client_id, "code_verifier": pending["verifier"]}
        auth = aiohttp.BasicAuth(self.settings.client_id, self.settings.client_secret) if self.settings.client_secret else None
        try:
            async with http.post(doc["token_endpoint"], data=form, auth=auth) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise SignInError(f"the provider refused the code: HTTP {r.status} {str(body)[:200]}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise SignInError(f"cannot reach the provider's token endpoint: {e}") from e
        id_token = body.get("id_token") if isinstance(body, dict) else None
        if not isinstance(id_token, str):
            raise SignInError("the provider's token response has no id_token (is 'openid' in the scopes?)")
        claims = await asyncio.to_thread(validate, id_token, issuer=doc["issuer"], audience=self.settings.client_id,
                                         jwks_uri=doc["jwks_uri"], nonce=pending["nonce"])
        return claims | {"_id_token": id_token}

    async def bearer(self, http: aiohttp.ClientSession, token: str) -> dict:
        """Claims of a bearer token sent to the API: an ID token of this provider for this client
        (signature, issuer, audience, expiry)."""
        doc = await self.discovery(http)
        return await asyncio.to_thread(validate, token, issuer=doc["issuer"], audience=self.settings.client_id,
                                       jwks_uri=doc["jwks_uri"])


def validate(token: str, *, issuer: str, audience: str, jwks_uri: str, nonce: str | None = None) -> dict:
    """The one call into identity.oidc; SignInError with its message when the token is refused."""
    from identity import oidc

    try:
        return oidc.validate(token, issuer=issuer, audience=audience, jwks_uri=jwks_uri, nonce=nonce)
    except oidc.TokenError as e:
        raise SignInError(f"ID token refused: {e}") from e
