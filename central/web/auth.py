"""Who is asking, and whether they may answer: the signed session cookie, bearer tokens, CSRF, and
the approvers rule (groups from a configurable claim, four eyes).

A browser request is authenticated by the session cookie (aiohttp-session's EncryptedCookieStorage:
Fernet, so encrypted and authenticated; HttpOnly, Secure, SameSite=Lax, 8 h). Automation sends the
provider's ID token as `Authorization: Bearer` instead; a request that carries one is judged by it
alone (no cookie read), and needs no CSRF token because a cross-site page cannot set that header.

Every state-changing browser request must pass both CSRF checks (OWASP's "synchronizer token" and
"verifying origin with standard headers"): an `Origin` (or, without one, `Referer`) naming this
recorder's own origin, and a token that is stored in the signed session and echoed in the form
field `csrf_token` or the `X-CSRF-Token` header.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp_session import get_session

from central.web.store import Approver

SESSION_KEY = "approver"
CSRF_KEY = "csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class ApproverRules:
    """Who may answer. groups: the default approver groups (a rule's `approvers.groups` replaces them);
    none at all means nobody may answer from the page. four_eyes: bar an agent's own owner from
    answering its requests (a rule's `approvers.four_eyes` can only switch it on)."""

    groups: tuple[str, ...] = ()
    four_eyes: bool = True
    extra: dict = field(default_factory=dict)


def approver_from_claims(claims: dict, groups_claim: str) -> Approver:
    raw = claims.get(groups_claim) or ()
    groups = (raw,) if isinstance(raw, str) else tuple(str(g) for g in raw if isinstance(g, str | int))
    return Approver(sub=str(claims.get("sub", "")), issuer=str(claims.get("iss", "")),
                    email=str(claims.get("email", "") or ""), name=str(claims.get("name", "") or ""), groups=groups)


def owner_of(approval: dict, session: dict | None) -> set[str]:
    """The agent's owner as identities to compare with an approver (sub and e-mail): from the
    approval's `owner`, or the session's OIDC identity claims (`identity`), when the host has them."""
    found: set[str] = set()
    for src in (approval.get("owner"), (session or {}).get("identity"), (session or {}).get("owner")):
        if isinstance(src, str) and src.startswith("{"):
            try:
                src = json.loads(src)
            except ValueError:
                src = None
        if isinstance(src, dict):  # i-identity's {"iss", "sub", "exp", "claims": {...}} or plain claims
            claims = src.get("claims") if isinstance(src.get("claims"), dict) else {}
            found |= {str(d[k]) for d in (src, claims) for k in ("sub", "email") if d.get(k)}
        elif isinstance(src, str) and src:
            found.add(src)
    return found


def may_answer(approver: Approver, approval: dict, session: dict | None, rules: ApproverRules) -> str | None:
    """None when the approver may answer this approval, else why not (shown to them)."""
    spec = approval.get("approvers") if isinstance(approval.get("approvers"), dict) else {}
    wanted = tuple(spec.get("groups") or rules.groups)
    if not wanted:
        return "no approver groups are configured for this rule or this recorder"
    if not set(wanted) & set(approver.groups):
        return f"you are not in an approver group for rule {approval.get('rule')!r} ({', '.join(wanted)})"
    if rules.four_eyes or spec.get("four_eyes"):
        owner = owner_of(approval, session)
        if owner and ({approver.sub, approver.email} - {""}) & owner:
            return "four eyes: the agent's own owner cannot answer its requests"
    return None


def approver_of_session(session) -> Approver | None:
    d = session.get(SESSION_KEY)
    if not isinstance(d, dict):
        return None
    return Approver(sub=d["sub"], issuer=d["issuer"], email=d.get("email", ""), name=d.get("name", ""),
                    groups=tuple(d.get("groups", ())))


def remember(session, approver: Approver) -> str:
    """Store the signed-in approver and a fresh CSRF token in a new session; returns the token."""
    session[SESSION_KEY] = {"sub": approver.sub, "issuer": approver.issuer, "email": approver.email,
                            "name": approver.name, "groups": list(approver.groups)}
    session[CSRF_KEY] = secrets.token_urlsafe(32)
    return session[CSRF_KEY]


def bearer_token(request: web.Request) -> str | None:
    h = request.headers.get("Authorization", "")
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def same_origin(request: web.Request, origin: str) -> bool:
    """Origin (or Referer, when a browser sent no Origin) names exactly this recorder's origin."""
    o = request.headers.get("Origin")
    if o is not None:
        return o.rstrip("/") == origin
    ref = request.headers.get("Referer")
    if ref:
        u = urlsplit(ref)
        return f"{u.scheme}://{u.netloc}" == origin
    return False


async def check_csrf(request: web.Request, origin: str) -> None:
    """Raise 403 unless the request is same-origin and carries the session's CSRF token."""
    if not same_origin(request, origin):
        raise _forbid("refused: this request did not come from the approval page (Origin check)")
    session = await get_session(request)
    expected = session.get(CSRF_KEY)
    sent = request.headers.get("X-CSRF-Token")
    if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        sent = (await request.post()).get("csrf_token")
    if not expected or not isinstance(sent, str) or not hmac.compare_digest(sent, expected):
        raise _forbid("refused: missing or wrong CSRF token (reload the page and try again)")


def _forbid(message: str) -> web.HTTPForbidden:
    """403 whose reason (what the recorder's refusals table stores) is the message itself."""
    return web.HTTPForbidden(reason=message, text=message)
