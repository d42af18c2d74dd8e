"""Webhook notifications for new pending approvals: a person learns that something waits.

    notifier = Notifier([Webhook("ops", "https://hooks.example/x", kind="json", secret=b"…"),
                         Webhook("slack", "https://hooks.slack.com/services/…", kind="slack")],
                        page_url="https://recorder.example:8443", record=store_delivery)
    deliveries = await notifier.notify(approval)   # approval: the approvals row as a dict

Formats:
- `json`: {"type": "approval.pending", "approval": {...}, "link": URL, "sent_at": unix seconds}, with
  headers `X-Interlock-Delivery` (one id per approval and webhook, the same on every retry: receivers
  deduplicate on it), `X-Interlock-Timestamp` (unix seconds of this attempt) and
  `X-Interlock-Signature: sha256=HEX`, HMAC-SHA256 (RFC 2104) keyed with the webhook's secret over
  `TIMESTAMP.BODY` — the timestamp is signed so a captured request cannot be replayed later
  (`verify()` is the receiver's check, with a tolerance).
- `slack`: Slack's incoming-webhook body ({"text", "blocks"}: a section and an "Open" button linking
  the page). Text the agent chose (the statement, the path) is escaped for Slack (&, <, >), so it
  can neither mention a channel nor forge a link.

Each attempt is a `Delivery` passed to `record` (the recorder stores it) and returned. An attempt
that fails for a reason that may pass (connection error, timeout, 408, 429, 5xx) is retried up to
`attempts` times with exponential backoff (`backoff` · 2^n, at most `max_backoff`, `Retry-After`
honoured within it); other 4xx are final. Redirects are not followed (a webhook URL that moved is
the operator's to fix, and the body would go where nobody configured). Webhooks are notified
concurrently; one slow receiver delays no other."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass

import aiohttp

KINDS = ("json", "slack")
SIGNATURE_HEADER = "X-Interlock-Signature"
TIMESTAMP_HEADER = "X-Interlock-Timestamp"
DELIVERY_HEADER = "X-Interlock-Delivery"
# The approval fields a notification carries (the approvals row may have more).
FIELDS = ("id", "host", "host_name", "session", "agent", "destination", "protocol", "action", "summary", "rule",
          "reason", "created", "timeout_at", "approvers", "identity")
MAX_SUMMARY = 3000  # characters of the statement or request shown (Slack's section text limit is 3000)


@dataclass(frozen=True)
class Webhook:
    name: str
    url: str
    kind: str = "json"
    secret: bytes | None = None  # json: the HMAC key (required); slack: the URL is the secret

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"webhook {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.url.lower().startswith(("https://", "http://")):
            raise ValueError(f"webhook {self.name}: url must be http(s)")
        if self.kind == "json" and not self.secret:
            raise ValueError(f"webhook {self.name}: a json webhook needs a secret to sign its bodies with")


@dataclass
class Delivery:
    """One attempt to deliver one approval to one webhook."""

    webhook: str
    approval: str
    delivery_id: str
    attempt: int  # 1, 2, …
    at: float  # unix seconds the attempt started
    ok: bool
    status: int | None = None  # the receiver's HTTP status, None when there was no answer
    error: str | None = None  # why it failed, for the record
    final: bool = False  # no further attempt follows
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, timestamp: str | None, signature: str | None, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """The receiver's check of a `json` delivery: the signature over TIMESTAMP.BODY, and a
    timestamp within `tolerance` seconds of now (a replayed request is refused)."""
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _link(page_url: str | None, approval: dict) -> str | None:
    return f"{page_url.rstrip('/')}/approvals/{approval.get('id')}" if page_url else None


def json_body(approval: dict, page_url: str | None, now: float) -> bytes:
    shown = {k: approval[k] for k in FIELDS if k in approval}
    return json.dumps({"type": "approval.pending", "approval": shown, "link": _link(page_url, approval),
                       "sent_at": int(now)}, sort_keys=True, default=str).encode()


def slack_escape(text: str) -> str:
    """Slack's control characters in message text (&, <, >) as entities: agent text stays text."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(approval: dict, page_url: str | None) -> bytes:
    e = slack_escape
    head = (f"Approval needed: {e(approval.get('agent', '?'))} on {e(approval.get('host_name') or approval.get('host') or '?')} "
            f"wants {e(approval.get('protocol', '?'))}:{e(approval.get('action', '?'))} at {e(approval.get('destination', '?'))}")
    intro = f"*{head}*\nRule `{e(approval.get('rule', '?'))}`: {e(approval.get('reason', ''))}"[:MAX_SUMMARY // 2]
    # the agent's text stays inside its code block (a ``` of its own would close it) and, escaped,
    # within Slack's 3000-character section (escaping can make it 5 times longer: over it, Slack
    # refuses the whole message and nobody hears of the hold)
    summary = e(str(approval.get("summary", ""))[:MAX_SUMMARY].replace("```", "`\u200b`\u200b`"))
    room = MAX_SUMMARY - len(intro) - 8
    if len(summary) > room:
        cut = summary[:room - 1]
        amp = cut.rfind("&", max(0, len(cut) - 5))
        summary = (cut[:amp] if amp >= 0 and ";" not in cut[amp:] else cut) + "…"
    detail = f"{intro}\n```{summary}```"
    blocks: list[dict] = [{"type": "section", "text": {"type": "mrkdwn", "text": detail}}]
    link = _link(page_url, approval)
    if link:
        blocks.append({"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Open"},
                                                        "url": link}]})
    return json.dumps({"text": head, "blocks": blocks}).encode()


class Notifier:
    def __init__(self, webhooks: Iterable[Webhook], page_url: str | None = None, attempts: int = 5,
                 backoff: float = 1.0, max_backoff: float = 60.0, timeout: float = 10.0,
                 record: Callable[[Delivery], Awaitable[None] | None] | None = None,
                 session: aiohttp.ClientSession | None = None):
        self.webhooks = list(webhooks)
        self.page_url = page_url
        self.attempts = max(1, attempts)
        self.backoff, self.max_backoff, self.timeout = backoff, max_backoff, timeout
        self.record = record
        self._session = session

    async def notify(self, approval: dict) -> list[Delivery]:
        """Deliver `approval` to every webhook (concurrently, each retried); every attempt."""
        own = self._session is None
        session = self._session or aiohttp.ClientSession()
        try:
            results = await asyncio.gather(*(self._deliver(session, w, approval) for w in self.webhooks))
        finally:
            if own:
                await session.close()
        return [d for r in results for d in r]

    async def _deliver(self, session: aiohttp.ClientSession, hook: Webhook, approval: dict) -> list[Delivery]:
        delivery_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{hook.name}/{approval.get('host', '')}/{approval.get('id')}"))
        out: list[Delivery] = []
        for attempt in range(1, self.attempts + 1):
            started = time.time()
            d = Delivery(hook.name, str(approval.get("id")), delivery_id, attempt, started, ok=False)
            retry_after = None
            try:
                if hook.kind == "json":
                    body = json_body(approval, self.page_url, started)
                    ts = str(int(started))
                    headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id, TIMESTAMP_HEADER: ts,
                               SIGNATURE_HEADER: sign(hook.secret, ts, body)}
                else:
                    body, headers = slack_body(approval, self.page_url), {"Content-Type": "application/json"}
                async with session.post(hook.url, data=body, headers=headers, allow_redirects=False,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                    d.status = r.status
                    text = (await r.content.read(2048)).decode("utf-8", "replace")
                    d.ok = 200 <= r.status < 300
                    if not d.ok:
                        d.error = f"HTTP {r.status}: {text[:200]}"
                        retry_after = r.headers.get("Retry-After")
            except TimeoutError:
                d.error = f"no answer within {self.timeout:g}s"
            except aiohttp.ClientError as e:
                d.error = f"{type(e).__name__}: {e}"
            d.seconds = round(time.time() - started, 3)
            transient = d.status is None or d.status in (408, 429) or d.status >= 500
            d.final = d.ok or not transient or attempt == self.attempts
            out.append(d)
            await self._record(d)
            if d.final:
                break
            await asyncio.sleep(self._delay(attempt, retry_after))
        return out

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff * 2 ** (attempt - 1)
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        return min(delay, self.max_backoff)

    async def _record(self, d: Delivery) -> None:
        """Store the attempt before the next one; a store that raises stops this webhook and
        notify() raises: a delivery that cannot be recorded is not retried unrecorded."""
        if self.record is None:
            return
        result = self.record(d)
        if inspect.isawaitable(result):
            await result
