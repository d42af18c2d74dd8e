"""The approval page: an aiohttp sub-application mounted at /ui on the central recorder.

Server-rendered (aiohttp-jinja2, autoescape on: everything an agent sent is text, never markup), one
small script (static/app.js) that re-fetches the pending list every half second and counts time down,
and a Content-Security-Policy that allows only that script, so an injected `<script>` could not run
even if escaping ever failed.

Routes (all under /ui):
    GET  /login, /auth/callback, POST /logout     OIDC sign-in (central/web/oidc.py) and out
    GET  /                                         pending approvals (sign-in required)
    GET  /approvals/fragment                       the pending table alone, for the script
    POST /approvals/{host}/{id}                    approve once / for a duration / deny with a reason
    GET  /sessions?host=&agent=&target=&verdict=   sessions, filtered
    GET  /sessions/{host}/{id}                     one session's replay as a timeline
    GET  /api/approvals, POST /api/approvals/{host}/{id}   the same for automation (bearer ID token)
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp_session import get_session, new_session
from aiohttp_session import setup as session_setup
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography import fernet

from central.web import auth
from central.web.oidc import OIDCSettings, Provider, SignInError
from central.web.store import Approver, DecisionError, WebStore

log = logging.getLogger("interlock.central.web")
HERE = Path(__file__).parent
PENDING_MAX_AGE = 600  # seconds a started sign-in may take
SESSION_MAX_AGE = 8 * 3600
MAX_NOTE = 2000
STORE_KEY: web.AppKey[WebStore] = web.AppKey("web_store", WebStore)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class WebSettings:
    """origin: this recorder as browsers reach it (scheme://host:port), for the Origin check.
    session_key: 32 random bytes (the state dir's web-session.key), shared by every instance."""

    oidc: OIDCSettings
    origin: str
    session_key: bytes
    rules: auth.ApproverRules = field(default_factory=auth.ApproverRules)
    webhooks: tuple = ()  # central.notify.Webhook: told of each new pending approval


def session_key(state_dir: Path) -> bytes:
    """The cookie key in <state_dir>/web-session.key (0600), created on first use."""
    import os
    import secrets

    p = Path(state_dir) / "web-session.key"
    if not p.exists():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return p.read_bytes()[:32]


def create_app(settings: WebSettings, store: WebStore) -> web.Application:
    app = web.Application(middlewares=[_headers])
    app["settings"] = settings
    app[STORE_KEY] = store
    app["provider"] = Provider(settings.oidc)
    session_setup(app, EncryptedCookieStorage(fernet.Fernet(base64.urlsafe_b64encode(settings.session_key)), cookie_name="interlock_web",
                                              max_age=SESSION_MAX_AGE, httponly=True, secure=True, samesite="Lax",
                                              path="/ui"))
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                         filters=FILTERS)
    app.router.add_get("/", index)
    app.router.add_get("/login", login)
    app.router.add_get("/auth/callback", callback)
    app.router.add_post("/logout", logout)
    app.router.add_get("/approvals/fragment", fragment)
    app.router.add_post("/approvals/{host}/{id}", answer)
    app.router.add_get("/approvals/{id}", link)
    app.router.add_get("/sessions", sessions)
    app.router.add_get("/sessions/{host}/{id}", replay)
    app.router.add_get("/api/approvals", api_approvals)
    app.router.add_post("/api/approvals/{host}/{id}", api_answer)
    app.router.add_static("/static", HERE / "static")
    app.on_startup.append(_start_http)
    app.on_cleanup.append(_stop_http)
    return app


async def _start_http(app: web.Application) -> None:
    import ssl

    ca = app["settings"].oidc.ca_file
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    app["http"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                        connector=aiohttp.TCPConnector(ssl=ctx) if ctx else None)


async def _stop_http(app: web.Application) -> None:
    await app["http"].close()


@web.middleware
async def _headers(request: web.Request, handler):
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        resp = e
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    resp.headers.setdefault("Cache-Control", "no-store")
    if isinstance(resp, web.HTTPException) and resp.status >= 300:
        raise resp
    return resp


def _ts(t) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(t))) + " UTC"
    except (TypeError, ValueError, OverflowError, OSError, jinja2.UndefinedError):  # whatever a host wrote
        return ""


def _left(a: dict) -> str:
    s = int(a.get("time_left") or 0)
    return f"{s // 60}m {s % 60:02d}s"


def _segment(v) -> str:
    """One URL path segment: every '/' percent-encoded too (Jinja's urlencode keeps '/', so a host's
    approval id '../h-other/ID' would make the browser post the answer to another host's approval)."""
    from urllib.parse import quote

    return quote(str(v), safe="")


FILTERS = {"ts": _ts, "left": _left, "segment": _segment}


def _prefix(request: web.Request) -> str:
    return request.app.get("prefix", "/ui")


async def _signed_in(request: web.Request) -> tuple[Approver, str]:
    session = await get_session(request)
    who = auth.approver_of_session(session)
    if who is None:
        raise web.HTTPFound(_prefix(request) + "/login")
    return who, session.get(auth.CSRF_KEY, "")


# --- sign-in -------------------------------------------------------------------------------------

async def login(request: web.Request) -> web.Response:
    provider: Provider = request.app["provider"]
    try:
        url, pending = await provider.authorization_url(request.app["http"])
    except SignInError as e:
        return _error(request, 503, str(e))
    session = await get_session(request)
    session["oidc_pending"] = pending
    raise web.HTTPFound(url)


async def callback(request: web.Request) -> web.Response:
    session = await get_session(request)
    pending = session.pop("oidc_pending", None)
    q = request.query
    if "error" in q:
        return _error(request, 403, f"the provider refused the sign-in: {q.get('error')} {q.get('error_description', '')}")
    if not isinstance(pending, dict) or not q.get("state") or not auth.hmac.compare_digest(str(q["state"]), pending["state"]):
        return _error(request, 400, "sign-in refused: this answer does not belong to a sign-in started here (state)")
    if time.time() - pending.get("at", 0) > PENDING_MAX_AGE:
        return _error(request, 400, "sign-in refused: it took too long; sign in again")
    try:
        claims = await request.app["provider"].exchange(request.app["http"], q.get("code", ""), pending)
    except SignInError as e:
        log.warning("sign-in refused: %s", e)
        return _error(request, 403, str(e))
    approver = auth.approver_from_claims(claims, request.app["settings"].oidc.groups_claim)
    session = await new_session(request)  # a fresh session id on sign-in: no fixation
    auth.remember(session, approver)
    log.info("approver signed in: %s", approver.label())
    raise web.HTTPFound(_prefix(request) + "/")


async def logout(request: web.Request) -> web.Response:
    await auth.check_csrf(request, request.app["settings"].origin)
    session = await get_session(request)
    session.invalidate()
    return aiohttp_jinja2.render_template("signed_out.html", request, {"prefix": _prefix(request)})


def _error(request: web.Request, status: int, message: str) -> web.Response:
    return aiohttp_jinja2.render_template("error.html", request, {"message": message, "prefix": _prefix(request)},
                                          status=status)


# --- pages ---------------------------------------------------------------------------------------

async def index(request: web.Request) -> web.Response:
    who, csrf = await _signed_in(request)
    items = await request.app[STORE_KEY].approvals()
    return aiohttp_jinja2.render_template("approvals.html", request, {
        "who": who, "csrf": csrf, "approvals": items, "prefix": _prefix(request), "notice": request.query.get("notice", "")})


async def link(request: web.Request) -> web.Response:
    """Where a notification's link lands: the pending list, at that approval."""
    from urllib.parse import quote

    raise web.HTTPFound(_prefix(request) + "/#approval-" + quote(request.match_info["id"], safe=""))


async def fragment(request: web.Request) -> web.Response:
    who, csrf = await _signed_in(request)
    items = await request.app[STORE_KEY].approvals()
    return aiohttp_jinja2.render_template("_pending.html", request, {
        "who": who, "csrf": csrf, "approvals": items, "prefix": _prefix(request)})


def _duration(form) -> float | None:
    """Seconds for 'approve for a duration' (form field `minutes`, 1 min … 24 h)."""
    try:
        minutes = float(form.get("minutes") or 0)
    except ValueError:
        raise web.HTTPBadRequest(text="the duration must be a number of minutes") from None
    if not 1 <= minutes <= 1440:
        raise web.HTTPBadRequest(text="the duration must be between 1 and 1440 minutes")
    return minutes * 60


async def _decide(request: web.Request, who: Approver, host: str, approval_id: str, action: str,
                  for_seconds: float | None, note: str) -> tuple[int, str]:
    store = request.app[STORE_KEY]
    if action not in ("approve", "approve-for", "deny"):
        return 400, "the answer must be approve, approve-for or deny"
    if action == "deny" and not note.strip():
        return 400, "a denial needs a reason (the agent and the record get it)"
    approval = await store.approval(host, approval_id)
    if approval is None:
        return 404, f"no approval {approval_id} from host {host}"
    why_not = auth.may_answer(who, approval, await store.session_open(host, approval.get("session", "")),
                              request.app["settings"].rules)
    if why_not:
        log.warning("answer refused for %s on %s/%s: %s", who.label(), host, approval_id, why_not)
        return 403, why_not
    try:
        await store.decide(host, approval_id, who, action != "deny", for_seconds if action == "approve-for" else None,
                           note.strip()[:MAX_NOTE])
    except DecisionError as e:
        return 409, str(e)
    log.info("%s %s approval %s/%s", who.label(), action, host, approval_id)
    verb = {"approve": "approved", "approve-for": "approved (standing grant)", "deny": "denied"}[action]
    return 200, f"{verb}: approval {approval_id} on {approval.get('host_name', host)}; sent to the host"


async def answer(request: web.Request) -> web.Response:
    who, _ = await _signed_in(request)
    await auth.check_csrf(request, request.app["settings"].origin)
    form = await request.post()
    action = str(form.get("action", ""))
    for_seconds = _duration(form) if action == "approve-for" else None
    status, message = await _decide(request, who, request.match_info["host"], request.match_info["id"], action,
                                    for_seconds, str(form.get("reason", "")))
    if request.headers.get("Accept", "").startswith("application/json"):
        return web.json_response({"message": message}, status=status)
    if status != 200:
        return _error(request, status, message)
    from urllib.parse import quote

    raise web.HTTPSeeOther(_prefix(request) + "/?notice=" + quote(message))


async def sessions(request: web.Request) -> web.Response:
    who, csrf = await _signed_in(request)
    f = {k: request.query.get(k, "")[:200] for k in ("host", "agent", "target", "verdict")}
    rows = await request.app[STORE_KEY].sessions(**f)
    return aiohttp_jinja2.render_template("sessions.html", request, {
        "who": who, "csrf": csrf, "sessions": rows, "filters": f, "prefix": _prefix(request)})


async def replay(request: web.Request) -> web.Response:
    who, csrf = await _signed_in(request)
    host, sid = request.match_info["host"], request.match_info["id"]
    store = request.app[STORE_KEY]
    session = await store.session_open(host, sid)
    if session is None:
        return _error(request, 404, f"no session {sid} on host {host}")
    return aiohttp_jinja2.render_template("replay.html", request, {
        "who": who, "csrf": csrf, "s": session, "events": await store.events(host, sid), "prefix": _prefix(request)})


# --- API for automation (bearer ID token) -------------------------------------------------------

async def _api_approver(request: web.Request) -> Approver:
    token = auth.bearer_token(request)
    if token is None:
        raise _unauthorized("send the provider's ID token as Authorization: Bearer", "Bearer")
    try:
        claims = await request.app["provider"].bearer(request.app["http"], token)
    except SignInError as e:
        log.warning("bearer token refused: %s", e)
        raise _unauthorized(str(e), 'Bearer error="invalid_token"') from None
    return auth.approver_from_claims(claims, request.app["settings"].oidc.groups_claim)


def _unauthorized(message: str, challenge: str) -> web.HTTPUnauthorized:
    """401 whose reason (what the recorder's refusals table and JSON reply carry) is the message."""
    message = " ".join(message.split())[:500]
    return web.HTTPUnauthorized(reason=message, text=_json({"error": message}), content_type="application/json",
                                headers={"WWW-Authenticate": challenge})


def _json(d: dict) -> str:
    import json

    return json.dumps(d)


async def api_approvals(request: web.Request) -> web.Response:
    await _api_approver(request)
    items = await request.app[STORE_KEY].approvals(request.query.get("status", "pending") or None)
    return web.json_response({"approvals": items})


async def api_answer(request: web.Request) -> web.Response:
    who = await _api_approver(request)
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return web.json_response({"error": "the body must be JSON: {decision, for_seconds?, reason?}"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "the body must be a JSON object"}, status=400)
    decision = body.get("decision")
    for_seconds = body.get("for_seconds")
    action = {"approve": "approve-for" if for_seconds else "approve", "deny": "deny"}.get(decision, "")
    if for_seconds is not None and (not isinstance(for_seconds, int | float) or not 60 <= for_seconds <= 86400):
        return web.json_response({"error": "for_seconds must be between 60 and 86400"}, status=400)
    status, message = await _decide(request, who, request.match_info["host"], request.match_info["id"], action,
                                    for_seconds, str(body.get("reason", "")))
    return web.json_response({"message": message} if status == 200 else {"error": message}, status=status)

