"""Webhook notifications of new pending approvals (central/notify.py delivers them), once per approval
across every recorder instance.

Each instance looks every POLL seconds for pending approvals (ingest's `approvals` index) that no
instance has claimed; it claims one by inserting its row in `approval_notices` (the primary key makes
exactly one instance win), then notifies the configured webhooks, each attempt stored in
`webhook_deliveries` (migration 0101). Notifications are best effort by design: a hold never waits
for one, and one that fails is on record with its error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from central.notify import Delivery, Notifier, Webhook
from central.web.store import WebStore

log = logging.getLogger("interlock.central.notices")
POLL = 0.5


class Notices:
    def __init__(self, store: WebStore, webhooks: list[Webhook], page_url: str):
        self.store, self.webhooks, self.page_url = store, webhooks, page_url
        self._task: asyncio.Task | None = None
        self._sending: set[asyncio.Task] = set()

    def attach(self, app: web.Application) -> None:
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _stop(self, app: web.Application) -> None:
        for t in (self._task, *self._sending):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _run(self) -> None:
        while True:
            try:
                for host, approval_id in await self._claim():
                    a = await self.store.approval(host, approval_id)
                    if a is not None:
                        t = asyncio.get_running_loop().create_task(self._send(a))
                        self._sending.add(t)
                        t.add_done_callback(self._sending.discard)
            except Exception as e:  # noqa: BLE001 -- the store may be down: try again at the next round
                log.warning("pending-approval notifications: %s", e)
            await asyncio.sleep(POLL)

    async def _claim(self) -> list[tuple[str, str]]:
        async with self.store.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO approval_notices (host, approval) SELECT a.host_id, a.id FROM approvals a"
                " WHERE a.status = 'pending' AND NOT EXISTS (SELECT 1 FROM approval_notices n"
                " WHERE n.host = a.host_id AND n.approval = a.id) LIMIT 100"
                " ON CONFLICT DO NOTHING RETURNING host, approval")
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def _send(self, approval: dict) -> None:
        async def record(d: Delivery) -> None:
            async with self.store.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO webhook_deliveries (host, approval, webhook, delivery_id, attempt, at, ok, status, error, final,"
                    " seconds) VALUES (%s,%s,%s,%s,%s,to_timestamp(%s),%s,%s,%s,%s,%s)",
                    (approval["host"], d.approval, d.webhook, d.delivery_id, d.attempt, d.at, d.ok, d.status, d.error,
                     d.final, d.seconds))

        try:
            await Notifier(self.webhooks, page_url=self.page_url, record=record).notify(approval)
        except Exception as e:  # noqa: BLE001 -- a delivery that cannot be stored is not retried unrecorded
            log.error("notifying approval %s/%s: %s", approval.get("host"), approval.get("id"), e)
