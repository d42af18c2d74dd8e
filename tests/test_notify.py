"""central/notify.py against real webhook receivers: aiohttp servers on loopback, started here,
that check what a real receiver would (the HMAC signature, Slack's body) and answer as told."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from central.notify import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Notifier, Webhook, verify

SECRET = b"webhook-secret-for-tests"
APPROVAL = {"id": "ap-1", "host": "h-1", "host_name": "agent-host", "agent": "ci-bot", "destination": "10.0.0.5:5432",
            "protocol": "postgres", "action": "delete", "summary": "DELETE FROM orders <!channel> <https://evil|click>",
            "rule": "hold-deletes", "reason": "deletes wait for a human", "created": 1796050000.0,
            "timeout_at": 1796050600.0, "ignored_column": "x"}


class Receiver:
    """A webhook endpoint: answers the statuses in `script` in turn (then 200), logs each request."""

    def __init__(self, script: list[int] = (), secret: bytes | None = SECRET):
        self.script, self.secret = list(script), secret
        self.seen: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        valid = verify(self.secret, body, request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER)) \
            if self.secret else None
        self.seen.append({"at": time.monotonic(), "body": json.loads(body), "headers": dict(request.headers),
                          "valid": valid})
        status = self.script.pop(0) if self.script else 200
        if self.secret and not valid:
            status = 401
        return web.Response(status=status, text="ok" if status == 200 else "try later")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        await self.runner.cleanup()


def run(coro):
    return asyncio.run(coro)


def test_json_delivery_is_signed_and_carries_the_approval_and_a_link():
    async def go():
        rx = Receiver()
        url = await rx.start()
        recorded = []
        n = Notifier([Webhook("ops", url, "json", SECRET)], page_url="https://recorder.example:8443", record=recorded.append)
        out = await n.notify(APPROVAL)
        await rx.stop()
        return rx, out, recorded

    rx, out, recorded = run(go())
    assert [d.ok for d in out] == [True] and recorded == out and out[0].status == 200 and out[0].final
    (req,) = rx.seen
    assert req["valid"] is True
    body = req["body"]
    assert body["type"] == "approval.pending" and body["link"] == "https://recorder.example:8443/approvals/ap-1"
    assert body["approval"]["summary"] == APPROVAL["summary"] and "ignored_column" not in body["approval"]
    assert req["headers"][DELIVERY_HEADER] == out[0].delivery_id


def test_signature_with_another_secret_or_an_old_timestamp_does_not_verify():
    async def go():
        rx = Receiver(secret=b"the receiver's real secret")
        url = await rx.start()
        out = await Notifier([Webhook("ops", url, "json", b"someone else's")], attempts=1).notify(APPROVAL)
        await rx.stop()
        return rx, out

    rx, out = run(go())
    assert rx.seen[0]["valid"] is False and out[0].status == 401 and not out[0].ok and out[0].final
    body = json.dumps({"x": 1}).encode()
    from central.notify import sign

    old = str(int(time.time()) - 3600)
    assert not verify(SECRET, body, old, sign(SECRET, old, body)), "a replayed (old) delivery is refused"
    now = str(int(time.time()))
    assert verify(SECRET, body, now, sign(SECRET, now, body))
    assert not verify(SECRET, body + b" ", now, sign(SECRET, now, body)), "an altered body is refused"


def test_receiver_failing_twice_then_succeeding_gets_three_attempts_with_backoff():
    async def go():
        rx = Receiver(script=[503, 500])
        url = await rx.start()
        recorded = []

        async def store(d):  # an async store, as the recorder's is
            recorded.append(d.as_dict())

        out = await Notifier([Webhook("ops", url, "json", SECRET)], backoff=0.2, record=store).notify(APPROVAL)
        await rx.stop()
        return rx, out, recorded

    rx, out, recorded = run(go())
    assert [(d.attempt, d.status, d.ok, d.final) for d in out] == [(1, 503, False, False), (2, 500, False, False),
                                                                   (3, 200, True, True)]
    assert [r["status"] for r in recorded] == [503, 500, 200], "every attempt is recorded"
    assert "HTTP 503" in out[0].error
    ids = {r["headers"][DELIVERY_HEADER] for r in rx.seen}
    assert len(ids) == 1, "retries carry the same delivery id (receivers deduplicate)"
    gaps = [b["at"] - a["at"] for a, b in zip(rx.seen, rx.seen[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # backoff doubles (lower bounds only)


def test_a_permanent_refusal_is_not_retried_and_an_absent_receiver_is_retried_then_given_up():
    async def go():
        rx = Receiver(script=[400])
        url = await rx.start()
        bad = await Notifier([Webhook("ops", url, "json", SECRET)], backoff=0.05).notify(APPROVAL)
        await rx.stop()  # nothing listens there any more
        gone = await Notifier([Webhook("ops", url, "json", SECRET)], attempts=3, backoff=0.05).notify(APPROVAL)
        return bad, gone

    bad, gone = run(go())
    assert [(d.status, d.final) for d in bad] == [(400, True)]
    assert len(gone) == 3 and all(d.status is None and "Connect" in d.error for d in gone) and gone[-1].final


def test_slack_body_escapes_agent_text_and_links_the_page():
    async def go():
        rx = Receiver(secret=None)
        url = await rx.start()
        hooks = [Webhook("slack", url, "slack"), Webhook("ops", url, "json", SECRET)]
        out = await Notifier(hooks, page_url="https://recorder.example:8443").notify(APPROVAL)
        await rx.stop()
        return rx, out

    rx, out = run(go())
    assert all(d.ok for d in out) and len(rx.seen) == 2
    slack = next(r["body"] for r in rx.seen if "blocks" in r["body"])
    text = slack["blocks"][0]["text"]["text"]
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text and "&lt;https://evil|click&gt;" in text
    assert "ci-bot" in slack["text"] and "postgres:delete" in slack["text"]
    assert slack["blocks"][1]["elements"][0]["url"] == "https://recorder.example:8443/approvals/ap-1"


def test_webhook_configuration_errors():
    with pytest.raises(ValueError, match="needs a secret"):
        Webhook("x", "https://h.example/x", "json")
    with pytest.raises(ValueError, match="kind must be"):
        Webhook("x", "https://h.example/x", "teams")
    with pytest.raises(ValueError, match="http"):
        Webhook("x", "file:///etc/passwd", "slack")


def test_slack_body_keeps_agent_text_in_its_code_block_and_within_slacks_section_limit():
    """Escaping '<' makes it 4 characters: 2,800 of them used to make a 11,200-character section,
    which Slack refuses (so no one was told of the hold); a ``` of the agent's closed the code block
    and let it format the rest of the message."""
    from central.notify import slack_body

    for summary in ("<" * 2800, "&" * 5000, "x" * 2990 + "<", "SELECT 1```\n*approved by security: safe*\n```"):
        body = json.loads(slack_body({**APPROVAL, "summary": summary}, "https://recorder.example:8443/ui"))
        text = body["blocks"][0]["text"]["text"]
        assert len(text) <= 3000, len(text)
        code = text[text.index("```") + 3:]
        assert code.endswith("```") and "```" not in code[:-3], code[-60:]
        assert "<" not in code and not code[:-3].rstrip("…").endswith(("&", "&l", "&lt", "&a", "&am", "&amp", "&g", "&gt"))
    short = json.loads(slack_body({**APPROVAL, "summary": "DELETE FROM t WHERE a < 3"}, None))
    assert short["blocks"][0]["text"]["text"].endswith("```DELETE FROM t WHERE a &lt; 3```")  # control: shown whole
