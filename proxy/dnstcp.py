"""DNS over TCP (RFC 1035 §4.2.2, RFC 7766): the same treatment as the UDP resolver, per message.

A connection the classifier names `dns` was allowed to the nameserver the agent dialled. Each
two-byte-length-prefixed query is read strictly (proxy/dnswire.py), judged as a `dns` operation
and on record before anything is sent (proxy/resolver.py judge); a refused name is answered
REFUSED by the proxy, a malformed message FORMERR and the connection closed. An allowed query
goes to the server rebuilt (the question alone, under an id of the proxy's), and only a reply
that matches a query sent comes back, under the agent's id; its A/AAAA records bind names for
the agent as the UDP resolver's do."""

from __future__ import annotations

import os
import struct

from policy.model import Verdict
from proxy import dnswire
from proxy.handler import Handler, register
from proxy.resolver import answered, judge

MAX_PENDING = 64  # queries sent to the server and not yet answered
MAX_BUFFER = 2 + 65535  # one message at most waits in each direction


@register
class DnsTcpHandler(Handler):
    protocol = "dns"

    def start(self) -> None:
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.pending: dict[int, tuple[dnswire.Query, dict, str]] = {}
        self.judging = False
        self.ended = False

    # ---- agent -> server -----------------------------------------------------------------

    def on_client(self, data: bytes) -> None:
        if self.ended:
            return
        self.inbox += data
        self._next()

    def _next(self) -> None:
        """Take the next whole query, one at a time: each is on record before the next."""
        while not self.judging and not self.ended and len(self.inbox) >= 2:
            size = struct.unpack_from("!H", self.inbox)[0]
            if len(self.inbox) < 2 + size:
                break
            msg = bytes(self.inbox[2:2 + size])
            del self.inbox[:2 + size]
            self._query(msg)
        if len(self.inbox) > MAX_BUFFER or len(self.pending) >= MAX_PENDING:
            self.conn.pause_client()
        else:
            self.conn.resume_client()

    def _query(self, msg: bytes) -> None:
        rec = self.conn.rec
        who = {"agent": rec.agent, "pid": rec.pid, "tgid": rec.tgid, "transport": "tcp"}
        try:
            q = dnswire.parse_query(msg)
        except dnswire.FormatError as e:
            self.ended = True
            self.conn.event("dns", {**who, "outcome": "malformed", "reason": e.reason, "length": len(msg), "rcode": e.rcode})
            reply = dnswire.error_reply(e, e.rcode)
            if reply is not None:
                self.conn.to_client(_frame(reply))
            self.conn.close("malformed-dns", e.reason[:200], abort=False)
            return
        base = {**who, "name": q.name, "type": q.type_name, "length": len(msg)}
        decision, written = judge(self.conn.proxy, rec, q)
        self.judging = True
        written.add_done_callback(lambda f: self._judged(q, base, decision, f))

    def _judged(self, q: dnswire.Query, base: dict, decision, written) -> None:
        self.judging = False
        if self.ended:
            return
        if written.cancelled() or written.exception() is not None:  # no record, no query
            self.ended = True
            self.conn.close("recorder-error", "the decision could not be recorded")
            return
        if decision.verdict in (Verdict.DENY, Verdict.APPROVE):
            self.conn.event("dns", {**base, "outcome": "refused", "rule": decision.rule})
            self.conn.to_client(_frame(dnswire.error_reply(q, dnswire.REFUSED)))
        else:
            qid = int.from_bytes(os.urandom(2), "big")
            while qid in self.pending:
                qid = (qid + 1) & 0xFFFF
            self.pending[qid] = (q, base, decision.rule)
            self.conn.to_server(_frame(dnswire.upstream_query(q, qid)))
        self._next()

    # ---- server -> agent -----------------------------------------------------------------

    def on_server(self, data: bytes) -> None:
        if self.ended:
            return
        self.outbox += data
        while len(self.outbox) >= 2:
            size = struct.unpack_from("!H", self.outbox)[0]
            if len(self.outbox) < 2 + size:
                break
            reply = bytes(self.outbox[2:2 + size])
            del self.outbox[:2 + size]
            qid = struct.unpack_from("!H", reply)[0] if len(reply) >= 2 else -1
            entry = self.pending.get(qid)
            if entry is None or not dnswire.check_reply(entry[0], qid, reply):
                continue  # answers no query we sent: dropped, as a stub drops it
            del self.pending[qid]
            q, base, rule = entry
            answered(self.conn.proxy, self.conn.rec, q, reply, base, rule)
            self.conn.to_client(_frame(dnswire.agent_reply(q, reply)))
        self._next()


def _frame(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message
