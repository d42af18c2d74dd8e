"""The TCP relay: two asyncio Protocols joined back to back, behind the connection gate.

A connection is classified from the client's first bytes (or, when the client stays silent,
from the server's greeting) and judged by the policy before anything goes upstream: allow
connects, deny closes, approve holds the agent until a human answers. A connection whose
decision cannot depend on the protocol was judged at accept and connects upstream at once.
Once allowed, connected and classified, bytes flow either through the protocol's handler
(proxy/handler.py) or, for protocols without one, straight across: one write per read,
backpressure by pausing the other side, half-closes passed on; past SPLICE_AFTER bytes such an
opaque connection moves to kernel splice threads (proxy/splice.py)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from classifier import Classifier
from classifier import Verdict as Classified
from policy.engine import Destination
from policy.inspection import INSPECTED, opaque_refusal
from policy.model import Decision, Operation, Verdict
from proxy import naming, refusals
from proxy.handler import HANDLERS, Handler
from proxy.splice import SPLICE_AFTER, Splice
from proxy.splice import available as splice_available
from recorder.approvals import Outcome
from recorder.store import RecorderDown, SessionRecord

if TYPE_CHECKING:
    from proxy.server import Proxy

# Bytes kept per direction while a connection is not flowing yet (classifying, judging, held for
# a human, connecting upstream): past it that side stops being read, and the kernel's socket
# buffers and TCP flow control hold the rest. At least the classifier's 16 KiB window.
PENDING_LIMIT = 64 << 10
SPLICE_ENABLED = splice_available()
_LINGER_RST = struct.pack("ii", 1, 0)
INSPECTABLE = frozenset(INSPECTED)
"""Labels the proxy reads (each has a handler): the classifier waits for them."""


class AgentSide(asyncio.Protocol):
    """The redirected agent connection, accepted on the proxy listener."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.rec: SessionRecord | None = None
        self.handler: Handler | None = None
        self.classifier: Classifier | None = None
        self.details: dict[str, Any] = {}
        self.pending: list[bytes] = []  # client bytes not yet handed on
        self.pending_size = 0
        self.server_pending: list[bytes] = []  # server bytes that arrived before classification
        self.server_pending_size = 0
        self.classified = False
        self.decided = False  # a decision exists (it may still be on its way to disk)
        self.provisional: str | None = None  # the label a decision was made for before classification
        self.allowed = False
        self.connecting = False
        self.deadline: asyncio.TimerHandle | None = None  # header_timeout: classify by then
        self.holding = 0  # operations waiting for a human (the idle sweep leaves them be)
        self.idle_mark: tuple[int, int] = (-1, -1)
        self.idle_since = 0.0
        self.flowing = False  # allowed, connected, classified: bytes go across
        self.eof_in = False
        self.eof_pending = False
        self.closed_sides = 0
        self.timer: asyncio.TimerHandle | None = None
        self.splice_ok = SPLICE_ENABLED and proxy.config.splice
        self.splicing = False
        self.proven: set[str] = set()  # names the verified upstream certificate covers (intercept TLS)
        self.unproven_sni: str | None = None  # let through on the condition that the certificate proves it

    # ---- accept, classify, judge ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.rec = self.proxy.admit(transport)
        if self.rec is None:
            _reset(transport)
            return
        config = self.proxy.config
        if not self.proxy.limits.admit(self):
            self.close("refused", f"agent {self.rec.agent!r} has {config.max_connections_per_agent} connections "
                                  "open (max_connections_per_agent)")
            return
        # Wait for any protocol we can inspect: a client that stalls half-way through one is never
        # labelled by its silence (it would be relayed unread).
        self.classifier = Classifier(client_silence=config.first_byte_timeout, hold_for=INSPECTABLE)
        self.deadline = self.proxy.loop.call_later(config.header_timeout, self._unclassified)
        if self.rec.verdict:
            # Judged at accept (the answer cannot depend on the protocol) and on the session row:
            # connect now, in parallel with the client's first write.
            self.decided = self.allowed = True
            self.proxy.loop.create_task(self._connect())
            return  # the first bytes arm the silence timer if they do not decide at once
        self._arm()

    def _arm(self) -> None:
        wait = self.classifier.wait
        if wait is not None:
            self.timer = self.proxy.loop.call_later(wait, self._silence)

    def _silence(self) -> None:
        self.timer = None
        if self.classified or self.transport.is_closing():
            return
        r = self.classifier.timeout()
        if r:
            self._classified(r)
            return
        if not self.decided and self.classifier.waiting_for_server:
            # The client waits for a server greeting. Nothing of the agent's reaches the server
            # before a decision: connect is judged as plain tcp, and judged again once the
            # greeting (or the client's first bytes) names the protocol.
            self.provisional = "tcp"
            self._judge()
        self._arm()

    def _unclassified(self) -> None:
        """header_timeout passed and the connection has not named its protocol: refuse it."""
        self.deadline = None
        if self.classified or self.transport.is_closing():
            return
        sent = self.rec.bytes_up
        what = f"sent {sent} bytes that could still become {'/'.join(sorted(self.classifier.candidates & INSPECTABLE))}" \
            if sent else "both sides stayed silent"
        self._refuse("unclassified", f"the connection did not name its protocol within "
                                     f"{self.proxy.config.header_timeout:g}s (header_timeout): {what}")

    def _refuse(self, rule: str, reason: str) -> None:
        """A refusal of Interlock's own (not a policy rule's): on record first, then a reset."""
        rec = self.rec
        decision = Decision(Verdict.DENY, rule, reason)
        op = Operation(rec.protocol if rec.protocol != "unknown" else "tcp", "connect",
                       (f"{rec.dst_addr}:{rec.dst_port}",), summary=f"connect {rec.dst_addr}:{rec.dst_port}")
        self.decided, self.allowed = True, False
        rec.verdict, rec.rule = "deny", rule
        written = self.proxy.recorder.decision(rec.id, op, decision)
        self.proxy.loop.create_task(self._act(decision, written))

    def _feed(self, data: bytes) -> None:
        r = self.classifier.feed(data)
        if r:
            self._classified(r)
        elif self.timer is None and data:
            self._arm()  # a client that stops mid-way is classified on silence, never left hanging

    def _classified(self, v: Classified) -> None:
        self.classified = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.rec.protocol = v.protocol
        self.details = v.details
        if self._unreadable(v):
            return
        if not self.decided or (self.provisional is not None and self.provisional != v.protocol):
            self._judge()  # first decision, or the provisional one was for another label
        else:
            self._start_flow()

    def _unreadable(self, v: Classified) -> bool:
        """Refuse a connection we cannot read where the policy needs it read (policy/inspection.py).

        Only the agent's own bytes count: a server that spoke first is no HTTP, TLS or PostgreSQL
        server, and a client that sent nothing has nothing to hide."""
        if v.protocol in HANDLERS or v.side != "client" or not self.rec.bytes_up:
            return False
        rec = self.rec
        policy = self.proxy.policy.current
        dest = Destination(rec.dst_addr, rec.dst_port, self.names(), v.protocol)
        allowed_by = rec.rule
        if not self.decided or self.provisional:
            d = policy.decide(rec.agent, dest, Operation(v.protocol, "connect", (f"{rec.dst_addr}:{rec.dst_port}",)))
            if d.verdict not in (Verdict.ALLOW, Verdict.MASK):
                return False  # refused or held at connect anyway: the judge says so in its own words
            allowed_by = d.rule
        rule = opaque_refusal(policy, rec.agent, dest, v.protocol, allowed_by or "default")
        if rule is None:
            return False
        self._refuse("uninspectable", f"the policy reads {v.protocol} connections here (rule '{rule}') and this one "
                                      f"cannot be read: relayed unread it would dodge that rule")
        return True

    # ---- names: what may count as the destination's name (proxy/naming.py) -----------------

    def names(self) -> tuple[str, ...]:
        """The names this connection is judged under: the one it claims (SNI, else the Host of
        its first request) if this agent bound it to the dialled address through the resolver
        or the upstream certificate proved it; with no claim, every name the agent bound to the
        address (each judged alone). A claimed name with neither counts for nothing: the
        connection is judged by its address alone."""
        return naming.connection_names(self)

    def _judge(self) -> None:
        self.decided = True
        if self.rec.protocol == "unknown":
            self.rec.protocol = "tcp"
        if self.classified:
            self.provisional = None
        self.allowed = False  # until this decision is on record
        decision, written = naming.judge_connection(self)
        self.rec.verdict, self.rec.rule = decision.verdict.value, decision.rule
        self.proxy.loop.create_task(self._act(decision, written))

    async def _act(self, decision: Decision, written: asyncio.Future) -> None:
        """Act on a decision once it is on record; a recorder failure refuses the connection."""
        try:
            await written
        except Exception as e:  # no record, no connection
            self.close("recorder-error", str(e))
            return
        if self.transport.is_closing():
            return
        if decision.verdict is Verdict.DENY:
            self._deny("denied", decision.rule, decision.reason)
            return
        if decision.verdict is Verdict.APPROVE:
            self.holding += 1
            try:
                outcome = await self.proxy.hold(self.rec, decision)
            finally:
                self.holding -= 1
            if self.transport.is_closing():
                return
            if outcome != "approved":
                why = outcome.explained(decision.rule) if isinstance(outcome, Outcome) else f"approval {outcome}"
                self._deny(outcome, decision.rule, why)
                return
        self.allowed = True
        if self.upstream is None and not self.connecting:
            await self._connect()
        else:
            self._start_flow()

    async def _connect(self) -> None:
        rec = self.rec
        if self.transport.is_closing():
            return  # cut meanwhile (the recorder failed): not even a SYN goes upstream
        self.connecting = True  # until the upstream is usable: a second judge must not dial again
        try:
            try:
                async with asyncio.timeout(self.proxy.config.connect_timeout):
                    _, up = await self.proxy.loop.create_connection(lambda: UpstreamSide(self), rec.dst_addr, rec.dst_port)
            except (TimeoutError, OSError) as e:
                # A reset, not a clean close: the nearest the agent can get to the ECONNREFUSED it
                # would have had direct (its connect() already succeeded against the proxy).
                self.close("upstream-error", str(e) or type(e).__name__)
                return
            if self.transport.is_closing():
                up.transport.close()  # the agent went away while we dialled: nothing to relay
                return
            try:
                await self.proxy.recorded(rec)  # no byte goes upstream before the session row is on record
            except RecorderDown as e:
                up.transport.close()
                self.close("recorder-error", str(e))
                return
        finally:
            self.connecting = False
        if self.transport.is_closing():
            up.transport.close()
            return
        self.upstream = up
        self._start_flow()

    def _start_flow(self) -> None:
        """Once allowed, connected and classified: hand the buffered bytes on."""
        if self.flowing or not (self.allowed and self.upstream is not None and self.classified):
            return
        self.flowing = True
        handler_cls = HANDLERS.get(self.rec.protocol)
        pending, self.pending = self.pending, []
        server_pending, self.server_pending = self.server_pending, []
        self.pending_size = self.server_pending_size = 0
        if handler_cls is not None:
            try:
                self.handler = handler_cls(self, self.details)
                self.handler.start()
                for chunk in pending:
                    if self.transport.is_closing():
                        return
                    self.handler.on_client(chunk)
                for chunk in server_pending:
                    self.handler.on_server(chunk)
            except Exception as e:  # noqa: BLE001 - a handler bug costs this connection, never a hang
                self._handler_failed(e)
                return
        else:
            if pending:
                self.upstream.transport.writelines(pending)
            if server_pending:
                self.transport.writelines(server_pending)
        self.transport.resume_reading()
        self.upstream.transport.resume_reading()
        if self.eof_pending:
            self._client_eof_now()

    # ---- bytes --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.rec.bytes_up += len(data)
        if self.flowing:
            if self.handler is None:
                self.upstream.transport.write(data)
                if self.rec.bytes_up > SPLICE_AFTER and self.splice_ok:
                    self._begin_splice()
            else:
                try:
                    self.handler.on_client(data)
                except Exception as e:  # noqa: BLE001 - see _handler_failed
                    self._handler_failed(e)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if not self.classified:
            self._feed(data)
        if self.pending_size > PENDING_LIMIT and not self.flowing:
            self.transport.pause_reading()  # held: resumed by _start_flow

    def server_data(self, data: bytes) -> None:
        if self.flowing:
            if self.handler is None:
                self.transport.write(data)
                if self.rec.bytes_down > SPLICE_AFTER and self.splice_ok:
                    self._begin_splice()
            else:
                try:
                    self.handler.on_server(data)
                except Exception as e:  # noqa: BLE001 - see _handler_failed
                    self._handler_failed(e)
            return
        self.server_pending.append(data)
        self.server_pending_size += len(data)
        if not self.classified:
            r = self.classifier.feed_server(data)
            if r:
                self._classified(r)
        if self.server_pending_size > PENDING_LIMIT and not self.flowing and self.upstream is not None:
            self.upstream.transport.pause_reading()

    def _handler_failed(self, e: Exception) -> None:
        """A protocol handler raised: record it and reset the agent, never leave it hanging."""
        self.event("handler-error", {"protocol": self.rec.protocol, "error": f"{type(e).__name__}: {e}"[:300]})
        self.close("handler-error", f"{type(e).__name__}: {e}"[:300])

    # ---- bulk: hand an opaque connection to the kernel -----------------------------------

    def _begin_splice(self) -> None:
        self.splice_ok = False
        self.splicing = True
        self.transport.pause_reading()
        self.upstream.transport.pause_reading()
        self._try_splice()

    def _try_splice(self) -> None:
        up = self.upstream.transport
        if self.transport.is_closing() or up.is_closing():
            return
        if self.transport.get_write_buffer_size() or up.get_write_buffer_size():
            self.proxy.loop.call_later(0.001, self._try_splice)  # let both buffers drain first
            return
        if self.eof_in or self.upstream.eof_in:
            self.splicing = False
            self.transport.resume_reading()  # half-closed already: finish on the loop
            up.resume_reading()
            return
        self.event("splice", {"after_up": self.rec.bytes_up, "after_down": self.rec.bytes_down})
        splice = Splice(self.proxy.loop, self.transport.get_extra_info("socket").fileno(),
                        up.get_extra_info("socket").fileno(), self._spliced)
        self.proxy.recorder.live_counts[self.rec.id] = splice.moved  # in the periodic byte flush

    def _spliced(self, up: int, down: int, error: str | None) -> None:
        self.proxy.recorder.live_counts.pop(self.rec.id, None)
        self.rec.bytes_up += up
        self.rec.bytes_down += down
        if error and self.rec.outcome == "open":
            self.rec.detail = error
        self.upstream.transport.close()
        self.transport.close()

    def eof_received(self) -> bool:
        """Pass the half-close on; once both directions have ended, close."""
        self.eof_in = True
        if not self.classified:
            self._feed(b"")
        if not self.flowing:
            self.eof_pending = True
            return True
        return self._client_eof_now()

    def _client_eof_now(self) -> bool:
        if self.handler is not None:
            keep = self.handler.on_client_eof()
        else:
            self.server_eof()
            keep = True
        return keep and not self.upstream.eof_in

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        # Never while spliced: a loop read would race the splice thread for the same socket.
        if self.upstream is not None and not self.splicing:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rec is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
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
        self.proxy.limits.release(self)
        if self.handler is not None:
            try:
                self.handler.on_close()
            except Exception as e:  # noqa: BLE001 - the session row must still be closed
                rec.detail = rec.detail or f"handler-error at close: {type(e).__name__}: {e}"[:300]
        rec.ended = time.time()
        if rec.outcome == "open":
            rec.outcome = "closed"
        self.proxy.recorder.session_close(rec)

    # ---- for handlers -------------------------------------------------------------------

    def to_server(self, data: bytes) -> None:
        self.upstream.transport.write(data)

    def to_client(self, data: bytes) -> None:
        self.transport.write(data)

    def server_eof(self) -> None:
        if self.upstream.transport.can_write_eof():
            self.upstream.transport.write_eof()

    def client_eof(self) -> None:
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_client(self) -> None:
        self.transport.pause_reading()

    def resume_client(self) -> None:
        self.transport.resume_reading()

    def targets(self) -> list:
        """The policy's targets this connection goes to (for credentials, upstream user, …)."""
        dest = Destination(self.rec.dst_addr, self.rec.dst_port, self.names(), self.rec.protocol)
        return self.proxy.policy.current.targets_for(dest)

    def credential(self) -> dict | None:
        """The stored secret the first matching target names, if any (never shown to the agent)."""
        policy = self.proxy.policy.current
        for t in self.targets():
            name = policy.for_agent(t.credentials, self.rec.agent)
            if name:
                return self.proxy.credentials.get(name)
        return None

    def judge(self, op: Operation) -> tuple[Decision, asyncio.Future]:
        """The policy's answer for one operation, and a future that resolves once it is on record
        (durably, for refusals and holds): act only after it."""
        return self.proxy.judge(self.rec, op, names=self.names())

    async def hold(self, op: Operation, decision: Decision) -> str:
        """Wait for a human: 'approved', 'denied' or 'expired'."""
        self.holding += 1
        try:
            return await self.proxy.hold(self.rec, decision, op)
        finally:
            self.holding -= 1

    def event(self, kind: str, data: dict) -> None:
        self.proxy.recorder.event(kind, data, self.rec.id)

    def spawn(self, coro) -> asyncio.Task:
        return self.proxy.loop.create_task(coro)

    def _deny(self, outcome: str, rule: str, reason: str) -> None:
        """Refuse in the agent's own protocol where it has a way to say so (proxy/refusals.py:
        HTTP 403 JSON, PostgreSQL FATAL, TLS alert), naming the rule and reason; else a reset."""
        answer = refusals.refusal(self.rec.protocol, rule, reason) if self.rec.bytes_up else None
        if answer is None:
            self.close(outcome, f"{rule}: {reason}")
            return
        self.transport.write(answer)
        self.close(outcome, f"{rule}: {reason}", abort=False)

    def close(self, outcome: str, detail: str, abort: bool = True) -> None:
        """End the connection with an outcome for the record; abort sends a reset."""
        if self.rec.outcome == "open":
            self.rec.outcome, self.rec.detail = outcome, detail
        if abort:
            _reset(self.transport)
        else:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.transport.close()


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN: the agent sees ECONNRESET, not a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except (OSError, ValueError):
            pass  # the socket is already gone (ValueError: uvloop's closed pseudo-socket has fd -1)
    transport.abort()


class UpstreamSide(asyncio.Protocol):
    """The proxy's own connection to the original destination (never captured: not an agent)."""

    __slots__ = ("agent", "transport", "eof_in")

    def __init__(self, agent: AgentSide):
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.eof_in = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.agent.rec.bytes_down += len(data)
        self.agent.server_data(data)

    def eof_received(self) -> bool:
        self.eof_in = True
        agent = self.agent
        if not agent.flowing:
            if not agent.classified:
                r = agent.classifier.feed_server(b"")
                if r:
                    agent._classified(r)
            if not agent.flowing:
                return False
        if agent.handler is not None:
            keep = agent.handler.on_server_eof()
        else:
            agent.client_eof()
            keep = True
        return keep and not agent.eof_in

    def pause_writing(self) -> None:
        self.agent.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.agent.splicing:
            self.agent.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        handler = self.agent.handler
        if handler is None or not handler.on_server_lost():
            self.agent.transport.close()
        self.agent.side_done(exc)
