"""The hosts' outbound channel for approvers' answers: a long poll over the host's own mTLS connection.

Agent hosts open no port: each host's daemon keeps asking

    GET  /v1/decisions?wait=SECONDS   (mTLS host cert) → {"decisions": [{approval, approve, for_seconds, note, by}]}
    POST /v1/decisions/ack            (mTLS host cert)  {"results": [{approval, result}]} → {"acked": n}

The GET answers at once when an answer is waiting, else as soon as one is filed (PostgreSQL
LISTEN/NOTIFY on `interlock_decisions`, so any recorder instance behind a load balancer wakes the
host's poll; a 1 s re-check covers a lost notification), else after `wait` seconds (≤ 30) with an
empty list. The host applies each answer to its own store and acks it; an answer not acked is sent
again on the next poll (applying one twice is refused by the host's store, and acked with that reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import psycopg
from aiohttp import web

from central.ingest import Refused  # answered and stored in `refusals` by the app's middleware
from central.web.store import DECISIONS_CHANNEL, WebStore

log = logging.getLogger("interlock.central.stream")
MAX_WAIT = 30.0
RECHECK = 1.0

HostOf = Callable[[web.Request], Awaitable[str]]


class DecisionStream:
    """Wakes the long polls of the hosts that have an answer waiting."""

    def __init__(self, store: WebStore, dsn: str, host_of: HostOf):
        self.store = store
        self.dsn = dsn
        self.host_of = host_of
        self._events: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/decisions", self.poll)
        app.router.add_post("/v1/decisions/ack", self.ack)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def _stop(self, app: web.Application) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {DECISIONS_CHANNEL}")
                    async for n in conn.notifies():
                        for ev in self._events.get(n.payload, ()):
                            ev.set()
            except (psycopg.Error, OSError) as e:
                log.warning("decision notifications interrupted (%s); polls fall back to %.0f s re-checks", e, RECHECK)
                await asyncio.sleep(RECHECK)

    async def poll(self, request: web.Request) -> web.Response:
        host = await self.host_of(request)
        try:
            wait = float(request.query.get("wait", "20"))
            if math.isnan(wait):  # NaN would never reach the deadline (and uvloop refuses it as a timer)
                raise ValueError
            wait = min(max(wait, 0.0), MAX_WAIT)
        except ValueError:
            raise Refused(400, "wait must be seconds (0 to 30)") from None
        ev = asyncio.Event()
        self._events.setdefault(host, set()).add(ev)
        try:
            deadline = asyncio.get_running_loop().time() + wait
            while True:
                ev.clear()
                rows = await self.store.undelivered(host)
                left = deadline - asyncio.get_running_loop().time()
                if rows or left <= 0:
                    return web.json_response({"decisions": rows})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(left, RECHECK))
        finally:
            waiting = self._events.get(host)
            if waiting is not None:
                waiting.discard(ev)
                if not waiting:
                    self._events.pop(host, None)

    async def ack(self, request: web.Request) -> web.Response:
        host = await self.host_of(request)
        try:
            body = await request.json()
            results = body["results"]
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise Refused(400, 'the body must be {"results": [{"approval", "result"}]}') from None
        return web.json_response({"acked": await self.store.delivered(host, results[:1000])})
