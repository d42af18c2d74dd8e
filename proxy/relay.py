"""The TCP relay: two asyncio Protocols joined back to back.

One write per read in each direction (the kernel batches the rest), backpressure by pausing the
other side's reads, half-close passed through. The first bytes of each side feed the protocol
guess; nothing else is looked at on this path."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from classifier import sniff
from recorder.store import SessionRecord

if TYPE_CHECKING:
    from proxy.server import Proxy


class AgentSide(asyncio.Protocol):
    """The redirected agent connection, accepted on the proxy listener."""

    __slots__ = ("proxy", "transport", "upstream", "pending", "eof_pending", "rec", "closed_sides",
                 "sniffed", "eof_in")

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.pending: list[bytes] = []
        self.eof_pending = False
        self.rec: SessionRecord | None = None
        self.closed_sides = 0
        self.sniffed = False
        self.eof_in = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.rec = self.proxy.admit(self, transport)
        if self.rec is None:
            transport.abort()
            return
        self.proxy.loop.create_task(self._connect())

    async def _connect(self) -> None:
        rec = self.rec
        try:
            _, up = await asyncio.wait_for(
                self.proxy.loop.create_connection(lambda: UpstreamSide(self), rec.dst_addr, rec.dst_port),
                self.proxy.config.connect_timeout)
        except (TimeoutError, OSError) as e:
            rec.outcome = "upstream-error"
            rec.detail = str(e) or type(e).__name__
            self.transport.abort()
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
        rec.bytes_up += len(data)
        if not self.sniffed:
            self.sniffed = True
            rec.protocol = sniff.from_client(data)
        if self.upstream is not None:
            self.upstream.transport.write(data)
        else:
            self.pending.append(data)
            if len(self.pending) > 64:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        """Pass the half-close on; once both directions have ended, close."""
        self.eof_in = True
        if self.upstream is not None:
            if self.upstream.transport.can_write_eof():
                self.upstream.transport.write_eof()
            return not self.upstream.eof_in
        self.eof_pending = True
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
            if agent.rec.protocol == "unknown" and not agent.sniffed:
                agent.rec.protocol = sniff.from_server(data)
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
