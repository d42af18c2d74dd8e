"""The recorder's HTTPS API (aiohttp): join, ingest, head for hosts; the fleet read API for operators.

TLS asks every client for a certificate (CERT_OPTIONAL, verified against our CA when shown) and
each route decides what it needs: none (/v1/ca, /v1/join, /healthz), a host's (CN = host_id,
OU = host, not revoked), or an operator's (OU = operator). Every refused request is answered
{"error": ...} with its status and stored in `refusals`; breaks in a host's chain go to `findings`.
The process keeps no state of its own: any number of them can serve one database."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import Path

import psycopg
import psycopg_pool
from aiohttp import web

from central import ca, ingest, read, tokens
from central.db import pool as make_pool
from central.ingest import Refused
from recorder.records import GENESIS, public_key_from_hex

log = logging.getLogger("interlock.recorder")
MAX_JOIN_BYTES = 64 * 1024
BODY_SECONDS = 15.0  # a whole request body (8 MiB at most) arrives within this
STATE, POOL, CA_PEM, CA_SHA = web.AppKey("state", ca.StateDir), web.AppKey("pool", psycopg_pool.AsyncConnectionPool), \
    web.AppKey("ca_pem", str), web.AppKey("ca_sha", str)


def _peer(request: web.Request) -> tuple[str | None, str | None]:
    t = request.transport
    return ca.subject_fields(t.get_extra_info("peercert") if t is not None else None)


def _subject(request: web.Request) -> str | None:
    cn, ou = _peer(request)
    return None if cn is None else f"CN={cn},OU={ou or ''}"


async def need_host(request: web.Request) -> str:
    """The host id of the client certificate; Refused unless it is a joined, unrevoked host."""
    cn, ou = _peer(request)
    if cn is None:
        raise Refused(401, "no client certificate: hosts authenticate with the certificate from 'interlock join'")
    if ou != ca.HOST_OU:
        raise Refused(403, f"a certificate with OU={ou} is not a host's")
    request["claimed_host"] = cn
    async with request.app[POOL].connection() as conn:
        row = await (await conn.execute("SELECT revoked_at FROM hosts WHERE host_id = %s", (cn,))).fetchone()
    if row is None:
        raise Refused(401, f"unknown host {cn!r}: join it with a token first")
    if row[0] is not None:
        raise Refused(403, f"host {cn!r} was revoked at {row[0].isoformat()}")
    return cn


def need_operator(request: web.Request) -> str:
    cn, ou = _peer(request)
    if cn is None:
        raise Refused(401, "no client certificate: reading the fleet needs an operator certificate "
                           "('interlock recorder operator NAME --out DIR')")
    if ou != ca.OPERATOR_OU:
        raise Refused(403, f"a certificate with OU={ou} cannot read the fleet (operators only)")
    return cn


async def _json_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise Refused(413, f"request of {request.content_length} bytes: at most {limit}")
    # read up to the route's own limit (a chunked upload has no length to check first), within
    # BODY_SECONDS: a body trickled a byte at a time would otherwise hold its connection (and a file
    # descriptor) for ever, and a few thousand of them, no credentials needed, starve every host
    buf = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.content.iter_chunked(256 * 1024):
                buf += chunk
                if len(buf) > limit:
                    raise Refused(413, f"request larger than {limit} bytes")
    except TimeoutError:
        raise Refused(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s") from None
    return bytes(buf)


# ---- host routes -------------------------------------------------------------------------

async def get_ca(request: web.Request) -> web.Response:
    return web.Response(text=request.app[CA_PEM], content_type="application/x-pem-file")


async def healthz(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        await conn.execute("SELECT 1")
    return web.json_response({"ok": True})


async def join(request: web.Request) -> web.Response:
    raw = await _json_body(request, MAX_JOIN_BYTES)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
        raise Refused(400, "the body is not JSON: {token, csr, signing_key, name}") from None
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("token", "csr", "signing_key")):
        raise Refused(400, "join takes {token, csr (PEM), signing_key (Ed25519 public key, 32 bytes hex), name}")
    name = body.get("name") or ""
    if not isinstance(name, str) or len(name) > 200 or not name.isprintable():
        raise Refused(400, "name: printable text, at most 200 characters")
    try:
        tok = tokens.parse(body["token"])
    except tokens.TokenError as e:
        raise Refused(401, str(e)) from None
    if tok.ca_sha256 != request.app[CA_SHA]:
        raise Refused(401, "the token was made by another recorder (its CA hash is not this recorder's)")
    try:
        public_key_from_hex(body["signing_key"])
    except ValueError:
        raise Refused(400, "signing_key: an Ed25519 public key, 32 bytes hex") from None
    host_id = "h-" + secrets.token_hex(6)
    async with request.app[POOL].connection() as conn, conn.transaction():
        cur = await conn.execute("UPDATE enrolment_tokens SET used_at = now(), used_by = %s WHERE id = %s AND secret_sha256 = %s"
                                 " AND used_at IS NULL AND expires_at > now() RETURNING id", (host_id, tok.id, tok.secret_sha256))
        if await cur.fetchone() is None:
            raise Refused(401, await _token_problem(conn, tok))
        try:
            cert = ca.sign_host_csr(request.app[STATE], body["csr"], host_id)
        except ca.CAError as e:
            raise Refused(400, str(e)) from None
        await conn.execute("INSERT INTO hosts (host_id, name, signing_key, cert_serial, token_id) VALUES (%s, %s, %s, %s, %s)",
                           (host_id, name or host_id, body["signing_key"].lower(), ca.serial_hex(cert), tok.id))
        await conn.execute("INSERT INTO chain_heads (host_id, seq, hash) VALUES (%s, 0, %s)", (host_id, GENESIS))
    log.info("host %s (%s) joined with token %s", host_id, name, tok.id)
    return web.json_response({"host_id": host_id, "cert": ca.cert_pem(cert), "ca": request.app[CA_PEM]})


async def _token_problem(conn, tok: tokens.Token) -> str:
    row = await (await conn.execute("SELECT secret_sha256, used_at, expires_at, expires_at <= now() FROM enrolment_tokens"
                                    " WHERE id = %s", (tok.id,))).fetchone()
    if row is None or not secrets.compare_digest(bytes(row[0]), tok.secret_sha256):
        return "invalid token: make one with 'interlock recorder token' on the recorder"
    if row[1] is not None:
        return f"token {tok.id} was already used at {row[1].isoformat()}: tokens are single use, make a new one"
    return f"token {tok.id} expired at {row[2].isoformat()}: make a new one with 'interlock recorder token'"


async def post_ingest(request: web.Request) -> web.Response:
    host = await need_host(request)
    raw = await _json_body(request, ingest.MAX_BYTES)
    batch = ingest.parse_batch(raw, host)
    async with request.app[POOL].connection() as conn:
        result = await ingest.store(conn, batch)
    return web.json_response(result)


async def get_head(request: web.Request) -> web.Response:
    host = await need_host(request)
    async with request.app[POOL].connection() as conn:
        row = await (await conn.execute("SELECT seq, hash, signed_seq FROM chain_heads WHERE host_id = %s", (host,))).fetchone()
    seq, h, signed = row if row else (0, GENESIS, 0)
    return web.json_response({"seq": seq, "hash": bytes(h).hex(), "signed_seq": signed})


# ---- refusals ----------------------------------------------------------------------------

async def _note_refusal(request: web.Request, status: int, reason: str, finding: tuple | None = None) -> None:
    """Store the refusal (and the finding) outside the refused request's transaction; never raises."""
    try:
        async with request.app[POOL].connection() as conn:
            host = request.get("claimed_host")
            await conn.execute("INSERT INTO refusals (peer, path, cert_subject, claimed_host, status, reason) VALUES (%s, %s, %s, %s, %s, %s)",
                               (request.remote or "", request.path[:500], _subject(request), host, status, reason[:2000]))
            if finding and host:
                await conn.execute("INSERT INTO findings (host_id, seq, problem, detail) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                   (host, *finding))
    except Exception as e:  # noqa: BLE001 -- the reply still goes out; the log says what was lost
        log.error("could not store a refusal (%s %s %s): %s", status, request.path, reason, e)


@web.middleware
async def refusals(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refused as r:
        await _note_refusal(request, r.status, r.reason, r.finding)
        if r.finding:
            log.warning("finding on host %s: %s at seq %s", request.get("claimed_host"), r.finding[1], r.finding[0])
        return web.json_response(r.reply(), status=r.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = e.reason if e.status != 404 else f"no such endpoint: {request.method} {request.path}"
        await _note_refusal(request, e.status, reason)
        return web.json_response({"error": reason}, status=e.status)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as e:
        log.error("store unavailable on %s: %s", request.path, e)
        return web.json_response({"error": "the recorder's database is unavailable; retry later"}, status=503)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        await _note_refusal(request, 500, "internal error")
        return web.json_response({"error": "internal error (see the recorder's log)"}, status=500)


# ---- the app -----------------------------------------------------------------------------

def make_app(state: Path, dsn: str, pool_size: int = 10, web_config: Path | None = None) -> web.Application:
    app = web.Application(middlewares=[refusals], client_max_size=ingest.MAX_BYTES)
    sd = ca.StateDir(state)
    sd.need()
    app[STATE], app[CA_PEM], app[CA_SHA] = sd, sd.ca_cert.read_text(), ca.ca_sha256(sd)
    app[POOL] = make_pool(dsn, min_size=min(2, pool_size), max_size=pool_size)

    async def lifecycle(app_: web.Application):
        await app_[POOL].open(wait=True, timeout=30)
        yield
        await app_[POOL].close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/ca", get_ca)
    app.router.add_post("/v1/join", join)
    app.router.add_post("/v1/ingest", post_ingest)
    app.router.add_get("/v1/head", get_head)
    read.add_routes(app, POOL, need_operator)
    if web_config is not None:  # the approval page and the hosts' answer channel (central/web, issue 12)
        from central.web import attach

        attach(app, web_config, state, dsn, app[POOL], need_host)
    return app
