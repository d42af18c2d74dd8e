"""The agents' DNS resolver: every query judged by the policy, on record with its agent, and sent
upstream only as a question rebuilt by Interlock.

Agent DNS reaches it through the sendmsg/connect hooks; the recvmsg hooks make the replies look
as if they came from the server the agent asked. For each datagram:

1. Who sent it: the kernel names the sending socket (proxy/sockdiag.py), the hooks filed the
   agent's identity under that socket's cookie. A datagram no hook redirected (someone dialled
   the resolver port directly) is refused and recorded as `no-origin`.
2. Each agent socket is a session (protocol `dns`, destination the nameserver the agent asked);
   every query is an event on it (name, type, outcome, rcode, addresses, agent, pid).
3. The query is read strictly (proxy/dnswire.py): a malformed one, one with bytes after its
   last record, several questions, another opcode or an oversized name gets FORMERR (NOTIMP
   for the opcode) and goes nowhere.
4. The policy judges a `dns` operation: action the record type (`a`, `txt`, …), object the
   name. A refusal is on disk before the agent gets REFUSED.
5. Allowed: the question alone goes upstream under a fresh id; an upstream that does not answer
   within `dns_timeout` (2 s by default) gets the agent SERVFAIL. The A/AAAA records of the answer
   bind their names to their addresses for this agent (proxy/gate.py NameBindings): the only
   way a hostname target can match a later connection without a certificate to prove it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from policy.engine import Destination
from policy.model import Decision, Operation, Verdict
from proxy import dnswire
from proxy.sockdiag import SockDiag
from recorder.store import SessionRecord

if TYPE_CHECKING:
    from proxy.server import Proxy

SESSION_IDLE = 10.0  # a DNS session (one agent socket) is closed on the record after this long quiet
MAX_IN_FLIGHT = 512  # queries waiting on the upstream at once; past it, SERVFAIL at once
MAX_ACTIVE = 2048  # datagrams being served at once; past it, dropped (and counted on record)


def system_nameserver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str | None:
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return None


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, query: dnswire.Query, qid: int, answer: asyncio.Future):
        self.query, self.qid, self.answer = query, qid, answer

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.answer.done() and dnswire.check_reply(self.query, self.qid, data):
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class Resolver(asyncio.DatagramProtocol):
    """One listener (127.0.0.1 or ::1 on dns_port); all share the proxy's sessions and bindings."""

    def __init__(self, proxy: Proxy, local: str, upstream: str | None, timeout: float = 2.0):
        self.proxy = proxy
        self.loop = proxy.loop
        self.local = local
        self.port = proxy.config.dns_port
        self.upstream = upstream
        self.timeout = timeout
        self.diag = SockDiag()
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[int, list] = {}  # socket cookie -> [SessionRecord, last activity]
        self.in_flight = 0
        self.active = 0  # datagrams being served
        self.dropped = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        # The kernel must be able to name a datagram's socket (udp_diag), or every query is
        # refused as no-origin: say so once, where an operator looks.
        if self.diag.cookie_of("::1" if ":" in self.local else "127.0.0.1", 1, self.local, self.port) is None:
            msg = "cannot name the sender of a datagram (NETLINK_SOCK_DIAG / udp_diag): agent DNS is refused"
            print(f"interlock proxy: {msg}", file=sys.stderr)
            self.proxy.recorder.event("dns-unavailable", {"reason": msg, "listener": self.local})

    def datagram_received(self, data: bytes, addr) -> None:
        if self.active >= MAX_ACTIVE:
            self.dropped += 1  # a flood: dropped unanswered (the client retries), counted on record
            if self.dropped == 1:
                self.loop.call_later(1.0, self._report_dropped)
            return
        self.active += 1
        self.loop.create_task(self._serve_counted(data, addr))

    async def _serve_counted(self, data: bytes, addr) -> None:
        try:
            await self._serve(data, addr)
        finally:
            self.active -= 1

    def _report_dropped(self) -> None:
        self.proxy.recorder.event("dns-dropped", {"datagrams": self.dropped, "reason": f"over {MAX_ACTIVE} queries at once"})
        self.dropped = 0

    # ---- one query ------------------------------------------------------------------------

    async def _serve(self, data: bytes, addr) -> None:
        rec = self._session(addr)
        if rec is None:
            info = _describe(data)
            await self._record("dns", {**info, "outcome": "refused", "reason": "no-origin",
                                       "peer": f"{addr[0]}:{addr[1]}"}, None)
            self._reply_error(data, dnswire.REFUSED, addr)
            return
        rec.bytes_up += len(data)
        who = {"agent": rec.agent, "pid": rec.pid, "tgid": rec.tgid}
        try:
            q = dnswire.parse_query(data)
        except dnswire.FormatError as e:
            await self._record("dns", {**who, "outcome": "malformed", "reason": e.reason, "length": len(data),
                                       "rcode": e.rcode}, rec)
            self._send(dnswire.error_reply(e, e.rcode), addr, rec)
            return
        base = {**who, "name": q.name, "type": q.type_name, "length": len(data)}
        if q.qclass != dnswire.CLASS_IN:
            await self._record("dns", {**base, "outcome": "refused", "reason": f"class {q.qclass}: only IN is served"}, rec)
            self._send(dnswire.error_reply(q, dnswire.REFUSED), addr, rec)
            return
        decision, written = judge(self.proxy, rec, q)
        try:
            await written
        except Exception as e:  # no record, no answer  # noqa: BLE001
            self._send(dnswire.error_reply(q, dnswire.SERVFAIL), addr, rec, f"recorder: {e}")
            return
        if decision.verdict in (Verdict.DENY, Verdict.APPROVE):
            # A query cannot wait for a human: a hold is a refusal here.
            self.proxy.recorder.event("dns", {**base, "outcome": "refused", "rule": decision.rule}, rec.id)
            self._send(dnswire.error_reply(q, dnswire.REFUSED), addr, rec)
            return
        reply, why = await self._ask(q)
        if reply is None:
            self.proxy.recorder.event("dns", {**base, "outcome": "servfail", "reason": why}, rec.id)
            self._send(dnswire.error_reply(q, dnswire.SERVFAIL), addr, rec)
            return
        answered(self.proxy, rec, q, reply, base, decision.rule)
        self._send(dnswire.agent_reply(q, reply), addr, rec)

    async def _ask(self, q: dnswire.Query) -> tuple[bytes | None, str]:
        """The upstream's answer, or None and why not, within the timeout."""
        if not self.upstream:
            return None, "no upstream nameserver configured"
        if self.in_flight >= MAX_IN_FLIGHT:
            return None, f"{MAX_IN_FLIGHT} queries already waiting on the upstream"
        self.in_flight += 1
        qid = int.from_bytes(os.urandom(2), "big")
        answer = self.loop.create_future()
        family = socket.AF_INET6 if ":" in self.upstream else socket.AF_INET
        transport = None
        try:
            async with asyncio.timeout(self.timeout):
                transport, _ = await self.loop.create_datagram_endpoint(
                    lambda: _Upstream(q, qid, answer), remote_addr=(self.upstream, 53), family=family)
                transport.sendto(dnswire.upstream_query(q, qid))
                return await answer, ""
        except TimeoutError:
            return None, f"the upstream {self.upstream} did not answer within {self.timeout:g}s"
        except OSError as e:
            return None, f"the upstream {self.upstream}: {e.strerror or e}"
        finally:
            self.in_flight -= 1
            if transport is not None:
                transport.close()

    # ---- sessions and the record ----------------------------------------------------------

    def _session(self, addr) -> SessionRecord | None:
        found = self.diag.cookie_of(self.local, self.port, addr[0], addr[1])
        if found is None:
            return None
        cookie = found[0]
        origin = self.proxy.origins.of_socket(cookie)
        if origin is None:
            return None
        dest, ident = origin
        hit = self.sessions.get(cookie)
        agent = self.proxy.agent_name(ident.agent_id)
        if hit is not None and hit[0].agent == agent:
            hit[1] = time.monotonic()
            hit[0].pid, hit[0].tgid = ident.pid, ident.tgid  # the socket's latest sender
            return hit[0]
        if hit is not None:
            self._close(cookie)
        rec = self.proxy.session_for(dest, ident)
        rec.protocol = "dns"
        self.proxy.recorder.session_open(rec)
        self.sessions[cookie] = [rec, time.monotonic()]
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SESSION_IDLE / 2, self._sweep)
        return rec

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for cookie in [c for c, (_, last) in self.sessions.items() if now - last >= SESSION_IDLE]:
            self._close(cookie)
        if self.sessions:
            self._sweeper = self.loop.call_later(SESSION_IDLE / 2, self._sweep)

    def _close(self, cookie: int) -> None:
        rec, _ = self.sessions.pop(cookie)
        rec.ended = time.time()
        if rec.outcome == "open":
            rec.outcome = "closed"
        self.proxy.recorder.session_close(rec)

    async def _record(self, kind: str, data: dict, rec: SessionRecord | None) -> None:
        """A refusal's event, on disk before the refusal is sent."""
        try:
            await self.proxy.recorder.event(kind, data, rec.id if rec else None, durable=True, wait=True)
        except Exception:  # noqa: BLE001 (the refusal goes out regardless: it lets nothing through)
            pass

    def _send(self, data: bytes | None, addr, rec: SessionRecord, detail: str = "") -> None:
        if data is None or self.transport is None:
            return
        rec.bytes_down += len(data)
        if detail:
            rec.detail = detail
        self.transport.sendto(data, addr)

    def _reply_error(self, query: bytes, rcode: int, addr) -> None:
        try:
            out = dnswire.error_reply(dnswire.parse_query(query), rcode)
        except dnswire.FormatError as e:
            out = dnswire.error_reply(e, rcode)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def close(self) -> None:
        for cookie in list(self.sessions):
            self._close(cookie)
        self.diag.close()


def judge(proxy: Proxy, rec: SessionRecord, q: dnswire.Query) -> tuple[Decision, asyncio.Future]:
    """The policy's answer to one query (a `dns` operation: action the record type, object the
    name), and the future that resolves once it is on record (on disk, for a refusal)."""
    op = Operation("dns", q.type_name, (q.name,), summary=f"{q.type_name.upper()} {q.name}"[:1000])
    decision = proxy.policy.current.decide(rec.agent, Destination(rec.dst_addr, rec.dst_port, (q.name,), "dns"), op)
    proxy.metrics.operation(rec.agent, "dns", decision.verdict.value)
    return decision, proxy.recorder.decision(rec.id, op, decision)


def answered(proxy: Proxy, rec: SessionRecord, q: dnswire.Query, reply: bytes, base: dict, rule: str) -> None:
    """An upstream answer: its A/AAAA records bind their names for the agent; the query's event."""
    bound = dnswire.bound_addresses(q, reply)
    for name, address, ttl in bound:
        proxy.names.bind(rec.agent, name, address, ttl)
    proxy.recorder.event("dns", {**base, "outcome": "answered", "rcode": dnswire.rcode_of(reply), "rule": rule,
                                 "addresses": sorted({a for _, a, _ in bound})[:32]}, rec.id)


def _describe(data: bytes) -> dict:
    try:
        q = dnswire.parse_query(data)
    except dnswire.FormatError as e:
        return {"malformed": e.reason, "length": len(data)}
    return {"name": q.name, "type": q.type_name, "length": len(data)}
