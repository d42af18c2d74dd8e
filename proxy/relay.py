"""The TCP relay: two asyncio Protocols joined back to back, behind a connection-level gate.

Before anything goes upstream the connection is classified (from the client's first bytes, or
"tcp" when the client stays silent) and judged by the policy: allow connects, deny closes,
approve holds the agent until a human answers. Once relaying, each read is one write on the
other side, backpressure pauses the other side's reads, and half-closes pass through."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from classifier import sniff
from policy.model import Verdict
from recorder.store import SessionRecord

if TYPE_CHECKING:
    from proxy.server import Proxy

MAX_PENDING_CHUNKS = 64


class AgentSide(asyncio.Protocol):
    """The redirected agent connection, accepted on the proxy listener."""

    __slots__ = ("proxy", "transport", "upstream", "pending", "eof_pending", "rec", "closed_sides",
                 "judged", "eof_in", "timer")

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.pending: list[bytes] = []
        self.eof_pending = False
        self.rec: SessionRecord | None = None
        self.closed_sides = 0
        self.judged = False
        self.eof_in = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.rec = self.proxy.admit(transport)
        if self.rec is None:
            transport.abort()
            return
        if self.rec.verdict:
            # The answer could not depend on the protocol and is on the session row: connect
            # upstream now, in parallel with the client's first write; the first bytes are
            # classified for the record only.
            self.judged = True
            self.proxy.loop.create_task(self._connect())
            return
        # Server-first protocols: a client that stays silent is judged as plain tcp.
        self.timer = self.proxy.loop.call_later(self.proxy.config.first_byte_timeout, self._judge, b"")

    def _classify(self, first: bytes) -> None:
        guess = sniff.from_client(first) if first else "tcp"
        self.rec.protocol = "tcp" if guess == "unknown" else guess

    def _judge(self, first: bytes) -> None:
        if self.judged or self.transport.is_closing():
            return
        self.judged = True
        if self.timer is not None:
            self.timer.cancel()
        self._classify(first)
        decision, written = self.proxy.judge(self.rec)
        self.rec.verdict, self.rec.rule = decision.verdict.value, decision.rule
        self.proxy.loop.create_task(self._act(decision, written))

    async def _act(self, decision, written) -> None:
        """Act on a decision once it is on record; a recorder failure refuses the connection."""
        try:
            await written
        except Exception as e:  # no record, no connection
            self.refuse("recorder-error", str(e))
            return
        if self.transport.is_closing():
            return
        if decision.verdict is Verdict.DENY:
            self.refuse("denied", f"{decision.rule}: {decision.reason}")
            return
        if decision.verdict is Verdict.APPROVE:
            outcome = await self.proxy.hold(self.rec, decision)
            if self.transport.is_closing():
                return
            if outcome != "approved":
                self.refuse(outcome, f"{decision.rule}: approval {outcome}")
                return
        await self._connect()

    def refuse(self, outcome: str, detail: str) -> None:
        self.rec.outcome, self.rec.detail = outcome, detail
        self.transport.abort()

    async def _connect(self) -> None:
        rec = self.rec
        try:
            async with asyncio.timeout(self.proxy.config.connect_timeout):
                _, up = await self.proxy.loop.create_connection(lambda: UpstreamSide(self), rec.dst_addr, rec.dst_port)
        except (TimeoutError, OSError) as e:
            self.refuse("upstream-error", str(e) or type(e).__name__)
            return
        if self.transport.is_closing():
            up.transport.close()
            return
        self.upstream = up
        if self.pending:
            up.transport.writelines(self.pending)
            self.pending = []
            self.transport.resume_reading()
        if self.eof_pending:
            up.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        rec = self.rec
        if rec.bytes_up == 0 and self.judged:
            self._classify(data)
        rec.bytes_up += len(data)
        if self.upstream is not None:
            self.upstream.transport.write(data)
            return
        self.pending.append(data)
        if not self.judged:
            self._judge(data)
        if len(self.pending) > MAX_PENDING_CHUNKS:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """Pass the half-close on; once both directions have ended, close."""
        self.eof_in = True
        if self.upstream is not None:
            if self.upstream.transport.can_write_eof():
                self.upstream.transport.write_eof()
            return not self.upstream.eof_in
        self.eof_pending = True
        if not self.judged:
            self._judge(b"".join(self.pending))
        return True

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rec is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        if self.upstream is not None:
            self.upstream.transport.close()
        self.side_done(exc)

    def side_done(self, exc: Exception | None) -> None:
        self.closed_sides += 1
        if exc is not None and self.rec.outcome == "open":
            self.rec.detail = str(exc)
        if self.closed_sides == 2 or self.upstream is None:
            self.finish()

    def finish(self) -> None:
        rec = self.rec
        if rec.ended is not None:
            return
        rec.ended = time.time()
        if rec.outcome == "open":
            rec.outcome = "closed"
        self.proxy.recorder.session_close(rec)


class UpstreamSide(asyncio.Protocol):
    """The proxy's own connection to the original destination (never captured: not an agent)."""

    __slots__ = ("agent", "transport", "sniffed", "eof_in")

    def __init__(self, agent: AgentSide):
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.sniffed = False
        self.eof_in = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        agent = self.agent
        agent.rec.bytes_down += len(data)
        if not self.sniffed:
            self.sniffed = True
            if agent.rec.protocol == "tcp":
                agent.rec.protocol = sniff.from_server(data)
                if agent.rec.protocol == "unknown":
                    agent.rec.protocol = "tcp"
        agent.transport.write(data)

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.agent.transport.can_write_eof():
            self.agent.transport.write_eof()
        return not self.agent.eof_in

    def pause_writing(self) -> None:
        self.agent.transport.pause_reading()

    def resume_writing(self) -> None:
        self.agent.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.transport.close()
        self.agent.side_done(exc)
