"""The HTTP/1.1 handler: every request judged, then refused, held, or forwarded (re-signed, with
credentials added); responses streamed back, or masked when the policy says so.

Glue only: framing is proxy.http.model (llhttp), the policy view proxy.http.rules, AWS naming,
re-signing and refusals proxy.aws, masking proxy.http.masking. The TLS handler
(proxy/tls/handler.py) runs this same class over the bytes it decrypts, by overriding the four
byte seams (on_client/on_server in, send_agent/send_origin out).

Why one request at a time: the upstream is the single connection the relay opened to the
original destination, and nothing may reach it before its request has been judged and recorded.
The model keeps pipelined requests queued until the current response is finished, so their order is
kept for free. Bodies stream chunk by chunk; only what must be read whole is buffered, and that
within limits: an AWS body the identification or the signature depends on, a JSON response to
mask. Past a limit the request is refused, never passed unjudged."""

from __future__ import annotations

import base64
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _q

from policy import detectors
from policy.engine import Destination
from policy.model import Decision, Operation, Verdict
from proxy import naming
from proxy.aws import errors as aws_errors
from proxy.aws.identify import AwsCall, identify_request
from proxy.aws.sigv4 import S3_LIKE_SERVICES, Credentials, SigV4Error, resign
from proxy.gate import DecisionCache
from proxy.handler import Handler, register
from proxy.http import responses
from proxy.http.masking import SECRET_HEADERS, MaskSpec, is_json_content_type, mask_json_bytes, redact_query
from proxy.http.model import (
    AgentConnection,
    Body,
    Closed,
    End,
    Headers,
    HttpProtocolError,
    OriginConnection,
    RequestHead,
    ResponseHead,
    Switched,
    for_agent,
    for_origin,
    normalize_path,
)
from proxy.http.responses import Canned
from proxy.http.rules import operation_from_request
from recorder import approvals
from recorder.store import decision_record

# A request body read whole before judging (AWS query/JSON protocols: the action and the
# signature's payload hash are in it). AWS API documents are small; an upload is S3, streamed.
JUDGE_BODY_LIMIT = 8 << 20
# A JSON response read whole to be masked.
MASK_BODY_LIMIT = 16 << 20
# Bytes the agent may send while its request is being judged before it is paused.
UNREAD_LIMIT = 1 << 20
# Characters of a request's shape (target, Host, rule-named headers) up to which its decision is
# kept for the connection: a head may be 64 KiB, and the cache must not multiply that.
SHAPE_LIMIT = 1024

_REGISTRY: dict | None = None


def mask_spec(names: tuple[str, ...]) -> MaskSpec:
    """A Decision's mask list against the shared detectors, key rules and field categories."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = detectors.span_registry()
    return MaskSpec.from_names(names, _REGISTRY, replacement=detectors.placeholder,
                               key_classifier=detectors.column_category)


@dataclass
class Exchange:
    """One request and its answer, from head to recorded event."""

    head: RequestHead
    started: float = field(default_factory=time.time)
    call: AwsCall | None = None
    op: Operation | None = None
    decision: Decision | None = None
    body: bytearray | None = None  # read whole before judging; None: streamed after
    complete: bool = False  # the agent has sent all of it
    forwarding: bool = False
    answered: bool = False  # a response head reached the agent
    held: ResponseHead | None = None  # masking: the head waits for the whole body
    held_body: bytearray = field(default_factory=bytearray)
    status: int = 0
    up: int = 0
    down: int = 0
    outcome: str = "forwarded"
    names: tuple[str, ...] | None = None  # the names it was judged under


def _recorded_path(path: str, target: str, query: str) -> str:
    """A request's path as its http event records it: normalised, credentials in the query redacted.
    Remembered for short targets (a kept-alive connection asks for the same few paths); a cache of
    long agent-chosen ones would hold megabytes."""
    if len(target) <= SHAPE_LIMIT:
        return _recorded_path_cached(path, target, query)
    return _recorded_path_of(path, target, query)


@functools.lru_cache(maxsize=4096)
def _recorded_path_cached(path: str, target: str, query: str) -> str:
    return _recorded_path_of(path, target, query)


def _recorded_path_of(path: str, target: str, query: str) -> str:
    query = redact_query(query)
    return ((normalize_path(path) if path else target[:300]) + (f"?{query}" if query else ""))[:500]


def http_record(method: str, host: str, path: str, status: int, up: int, down: int, outcome: str, ms: float,
                verdict: str, rule: str) -> str:
    """An `http` event's data exactly as the recorder encodes a dict (JSON, keys sorted, ASCII),
    written directly: it is one per request, and this is a few times cheaper than the encoder."""
    return (f'{{"down": {down:d}, "host": {_q(host)}, "method": {_q(method)}, "ms": {float(ms)!r}, '
            f'"outcome": {_q(outcome)}, "path": {_q(path)}, "rule": {_q(rule)}, "status": {status:d}, '
            f'"up": {up:d}, "verdict": {_q(verdict)}}}')


def _maybe_aws(head: RequestHead) -> bool:
    """Whether proxy.aws.identify could name an AWS call here: it needs a SigV4 signature (an
    Authorization header, or a query that may carry a presigned one) or an AWS host. Most
    requests have none of these and skip it."""
    if head.query or head.headers.get("authorization") is not None:
        return True
    return ".amazonaws.com" in head.authority.lower()  # a superset of identify's host test


def _has_body(head: RequestHead) -> bool:
    if "transfer-encoding" in head.headers:
        return True
    length = (head.headers.get("content-length") or "0").strip()
    return not (length.isdigit() and int(length) == 0)


def _needs_body(call: AwsCall, head: RequestHead) -> bool:
    """An AWS request whose action or payload hash is in its body (everything but S3 uploads)."""
    if call.service not in S3_LIKE_SERVICES:
        return True
    return call.action == "DeleteObjects" or head.headers.get("x-amz-content-sha256") is None


@register
class HttpHandler(Handler):
    protocol = "http"
    scheme = "http"

    def start(self) -> None:
        self.agent = AgentConnection()
        self.origin = OriginConnection()
        self.req: Exchange | None = None
        self.busy = False  # a request is being judged or held: the agent's next bytes wait
        self.unread = 0
        self.tunnel = False  # upgraded: raw bytes both ways
        self.ending = False
        self.agent_eof = False
        self.origin_gone: str | None = None  # why the service cannot take another request
        self.host_hint = ""  # SNI, for the host-sni-mismatch risk
        self.served = 0  # requests finished on this connection
        self._targets: tuple | None = None  # (policy, names, targets) of the last request
        # The last request head and what was worked out from it: the model hands out the same
        # head object again for a request that repeats one byte for byte (proxy.http.model,
        # SEEN_HEADS), so a polling client's requests skip re-deriving it.
        self._seen: RequestHead | None = None
        self._seen_facts: tuple = ()  # (has_body, maybe_aws, recorded method, host, path)
        self._seen_shape: tuple | None = None  # (policy, names, shape or None)
        self.decisions = DecisionCache(size=64)  # allowed request shapes (proxy/gate.py): at most 64 × SHAPE_LIMIT
        # Bytes produced while handling one read go out in one write per side (one TLS record,
        # one segment): a response head, body and end as three sends cost three syscalls.
        self.batch = 0
        self.out_agent: list[bytes] = []
        self.out_origin: list[bytes] = []
        self.head_timer = None  # header_timeout for a kept-alive connection's next request head

    # ---- byte seams (the TLS handler overrides these) -------------------------------------------

    def on_client(self, data: bytes) -> None:
        self.agent_plain(data)

    def on_server(self, data: bytes) -> None:
        self.origin_plain(data)

    def send_agent(self, data: bytes) -> None:
        self.conn.to_client(data)

    def send_origin(self, data: bytes) -> None:
        self.conn.to_server(data)

    def _to_agent(self, data: bytes) -> None:
        if data:
            self.out_agent.append(data)
            if not self.batch:
                self.flush()

    def _to_origin(self, data: bytes) -> None:
        if data and self.origin_gone is None:
            self.out_origin.append(data)
            if not self.batch:
                self.flush()

    def flush(self) -> None:
        if self.out_origin:
            data = b"".join(self.out_origin)
            self.out_origin.clear()
            if self.origin_gone is None:
                self.send_origin(data)
        if self.out_agent:
            data = b"".join(self.out_agent)
            self.out_agent.clear()
            self.send_agent(data)

    def on_client_eof(self) -> bool:
        if self.tunnel:
            self.conn.server_eof()
            return True
        self.agent_eof = True
        if self.req is None:
            self._end("closed", "")
        return True

    def on_server_eof(self) -> bool:
        if self.tunnel:
            self.conn.client_eof()
            return True
        self.origin_plain(b"")
        return True

    def on_server_lost(self) -> bool:
        # The agent stays while it is owed an answer (a 502 saying why), or while a TLS agent's
        # first request is still on its way; a reset without EOF lands here too.
        if self.tunnel or self.ending:
            return False
        self._batched(self.origin_failed, "the service closed the connection")
        return not self.ending

    def keep_without_origin(self) -> bool:
        return False

    # ---- the agent's side -------------------------------------------------------------------------

    def _batched(self, fn, *args) -> None:
        """Run fn with output held back, then send it: one write per side."""
        self.batch += 1
        try:
            fn(*args)
        finally:
            self.batch -= 1
            if not self.batch:
                self.flush()

    def agent_plain(self, data: bytes) -> None:
        """Decrypted (or plain) bytes from the agent."""
        self._batched(self._agent_plain, data)

    def _agent_plain(self, data: bytes) -> None:
        if self.tunnel:
            self._to_origin(data)
            return
        if self.ending:
            return
        self.agent.receive(data)
        if self.busy:
            self.unread += len(data)
            if self.unread > UNREAD_LIMIT:
                self.conn.pause_client()
            return
        self._pump_agent()

    def _head_timeout(self) -> None:
        self.head_timer = None
        if not self.busy and not self.ending and self.agent.in_head:
            self.conn.event("http-header-timeout", {"after": self.conn.proxy.config.header_timeout})
            self.ending = True
            self.conn.close("header-timeout", f"a request head took longer than "
                                              f"{self.conn.proxy.config.header_timeout:g}s (header_timeout)")

    def _pump_agent(self) -> None:
        try:
            for ev in self.agent.events():
                if isinstance(ev, RequestHead):
                    self._request(ev)
                elif isinstance(ev, Body):
                    self._request_body(ev.data)
                elif isinstance(ev, End):
                    self._request_end(ev.trailers)
                elif isinstance(ev, Closed):
                    self.agent_eof = True
                    if self.req is None:
                        self._end("closed", "")
                if self.busy or self.ending or self.tunnel:
                    return
        except HttpProtocolError as e:
            self._bad_request(e)
            return
        if self.head_timer is None and self.agent.in_head:
            # a request head begun and left unfinished (one byte a second): bounded like the first
            self.head_timer = self.conn.proxy.loop.call_later(self.conn.proxy.config.header_timeout, self._head_timeout)

    def _request(self, head: RequestHead) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        req = self.req = Exchange(head)
        if head is not self._seen:
            self._seen, self._seen_shape = head, None
            self._seen_facts = (_has_body(head), _maybe_aws(head), head.method[:16], head.host[:255],
                                _recorded_path(head.path, head.target, head.query))
        has_body, maybe_aws = self._seen_facts[:2]
        req.call = identify_request(head) if maybe_aws else None
        if not has_body:
            req.body = bytearray()  # judged at End, which is already here: a refusal keeps the connection
        elif req.call is not None and _needs_body(req.call, head):
            req.body = bytearray()
            if self.agent.expects_continue:
                self._to_agent(self.agent.send_continue())  # nothing goes upstream before the judgement
        else:
            self._judge(req)

    def _request_body(self, data: bytes) -> None:
        req = self.req
        if req is None:
            return
        req.up += len(data)
        if req.forwarding:
            self._to_origin(self.origin.send_body(data))
        elif req.body is not None:
            req.body += data
            if len(req.body) > JUDGE_BODY_LIMIT:
                self._answer(req, responses.bad_request(f"request body over {JUDGE_BODY_LIMIT} bytes: too large to judge",
                                                        status=413), "refused")

    def _request_end(self, trailers: Headers) -> None:
        req = self.req
        if req is None:
            return
        req.complete = True
        if req.forwarding:
            self._to_origin(self.origin.send_end(trailers))
        else:
            self._judge(req)

    def _bad_request(self, err: HttpProtocolError) -> None:
        """Unparseable: refused and recorded, never passed on."""
        req = self.req or Exchange(RequestHead("?", "?"))
        self.conn.event("http-refused", {"reason": "malformed request", "detail": str(err)[:200]})
        req.status, req.outcome = err.status, "malformed"
        try:
            self._to_agent(self.agent.respond_error(err))
        except HttpProtocolError:
            pass
        self._end("malformed-request", str(err)[:200])

    # ---- judging ----------------------------------------------------------------------------------

    def operation(self, req: Exchange) -> Operation:
        rec = self.conn.rec
        if req.call is not None:
            op = req.call.operation()
        else:
            op = operation_from_request(req.head, scheme=self.scheme, default_host=rec.dst_addr,
                                        default_port=rec.dst_port)
        host = req.head.host
        if self.host_hint and host and host.rstrip(".") != self.host_hint:
            # Judged at connect by one name, asking the server for another (domain fronting).
            op = dataclasses.replace(op, risks=(*op.risks, "host-sni-mismatch"))
        return op

    def names(self, req: Exchange) -> tuple[str, ...]:
        """The names this request is for: its Host and the SNI, each only when it counts for the
        dialled address (proxy/naming.py); not every name the address is known by: hosts sharing
        an address (a CDN, the lab) must not share rules or credentials."""
        return naming.request_names(self.conn, naming.host_only(req.head.host or ""), self.host_hint, self.name_counts)

    def name_counts(self, name: str) -> bool:
        """Plain HTTP proves nothing: a Host counts when the agent resolved it to this address."""
        return naming.counts(self.conn, name)

    def targets(self, req: Exchange) -> list:
        rec, policy = self.conn.rec, self.conn.proxy.policy.current
        names = req.names if req.names is not None else self.names(req)
        hit = self._targets
        if hit is not None and hit[0] is policy and hit[1] == names:
            return hit[2]  # a kept-alive connection asks about the same host again and again
        found = policy.targets_for(Destination(rec.dst_addr, rec.dst_port, names, rec.protocol))
        self._targets = (policy, names, found)
        return found

    def shape(self, req: Exchange, names: tuple[str, ...], policy) -> tuple:
        """What this request's Operation and decision are made of (DecisionCache): the method, the
        target (path and query), the version, the authority (Host), what makes a risk, the names it
        counts under, and the value of every header a rule names (secret ones excepted, as in
        operation_from_request). Two requests of one connection with the same shape get the same
        Operation and the same decision under the same policy."""
        head = req.head
        h = head.headers
        return (head.method, head.target, head.http_version, head.authority, h.get_joined("x-http-method-override"),
                head.upgrade, names, *[h.get_joined(n[7:]) for n in policy.attribute_names()
                                       if n.startswith("header.") and n[7:] not in SECRET_HEADERS])

    @staticmethod
    def _small(shape: tuple) -> bool:
        """A shape short enough to keep (SHAPE_LIMIT), so that a connection's cache stays within 64 KiB."""
        size = sum(map(len, shape[6]))
        for x in shape:
            if isinstance(x, str):
                size += len(x)
        return size <= SHAPE_LIMIT

    def _judge(self, req: Exchange) -> None:
        self.busy = True
        if req.call is not None and req.body:
            req.call = identify_request(req.head, bytes(req.body[:64 << 10]))
        proxy, rec = self.conn.proxy, self.conn.rec
        names = req.names = self.names(req)
        host = naming.host_only(req.head.host or "")
        if host and host not in names and not naming.is_address(host):
            self.conn.event("name-unbound", {"name": host[:255], "address": rec.dst_addr,
                                             "judged": "by address", "in": "Host"})
        policy = proxy.policy.current
        seen = self._seen_shape
        if req.call is not None:
            shape = None  # AWS: signed per request
        elif seen is not None and seen[0] is policy and seen[1] == names and req.head is self._seen:
            shape = seen[2]
        else:
            shape = self.shape(req, names, policy)
            if not self._small(shape):
                shape = None
            if req.head is self._seen:
                self._seen_shape = (policy, names, shape)
        if shape is not None and (ident := policy.identity(rec.agent)) is not None:
            # an expired or invalid token: judged (and refused) every time; a rebound one: its own entries
            shape = None if ident.refusal() is not None else (shape, ident.key)
        if shape is not None and not proxy.recorder.failed:
            hit = self.decisions.get(policy, shape)
            if hit is not None:
                # Allowed before on this connection, under this policy: its record rides the group
                # commit (no wait), with the data encoded once; refusals and holds never come here.
                req.op, req.decision, record = hit
                proxy.metrics.operation(rec.agent, req.op.protocol, req.decision.verdict.value)
                proxy.recorder.event_json("decision", record, rec.id, linger=True)
                self._act(req, "allowed")
                return
        req.op = self.operation(req)
        req.decision, written = proxy.judge(rec, req.op, names=names)
        if shape is not None:  # kept without its attributes (every header): decided, they are not read again
            self.decisions.put(policy, shape, dataclasses.replace(req.op, attributes={}), req.decision,
                               decision_record(req.op, req.decision))
        if req.decision.verdict is Verdict.APPROVE:
            self.conn.spawn(self._hold(req, written))
        else:  # a callback, not a task: most requests are decided in one loop turn
            written.add_done_callback(lambda f: self._recorded(req, f))

    def _recorded(self, req: Exchange, written) -> None:
        if written.cancelled() or written.exception() is not None:  # no record, no request
            self.conn.close("recorder-error", str(written.exception()) if not written.cancelled() else "cancelled")
            return
        if not self.ending:
            self._act(req, "denied" if req.decision.verdict is Verdict.DENY else "allowed")

    async def _hold(self, req: Exchange, written) -> None:
        try:
            await written
        except Exception as e:  # no record, no hold
            self.conn.close("recorder-error", str(e))
            return
        if self.ending:
            return
        outcome = await self.conn.hold(req.op, req.decision)
        if not self.ending:
            self._act(req, outcome)

    def _act(self, req: Exchange, outcome: str) -> None:
        """Carry out the decision once it is on record: 'allowed'/'approved' go on, the rest are refused."""
        d = req.decision
        if outcome == "denied":
            self._batched(self._refuse, req, d.rule, d.reason, outcome)
        elif outcome not in ("allowed", "approved"):
            why = outcome.explained(d.rule) if isinstance(outcome, approvals.Outcome) else f"approval {outcome}"
            self._batched(self._refuse, req, d.rule, why, outcome)
        else:
            self._batched(self._forward, req)

    def _refuse(self, req: Exchange, rule: str, reason: str, outcome: str) -> None:
        canned = aws_errors.access_denied(req.call, rule, reason) if req.call else responses.blocked(rule, reason)
        self._answer(req, canned, outcome)

    # ---- forwarding -------------------------------------------------------------------------------

    def _outbound(self, req: Exchange, head: RequestHead) -> RequestHead:
        """The request as the service must see it: the stored credential put in (AWS: re-signed)."""
        cred = self._credential(req)
        if cred is None:
            return head
        kind = cred.get("kind")
        if kind == "aws":
            return self._resign(req, head, cred)
        if head is req.head:
            head = head.copy()  # for_origin hands back the agent's own head when it had nothing to drop
        if kind == "bearer":
            head.headers.set("Authorization", f"Bearer {cred['token']}")
        elif kind == "basic":
            pair = f"{cred['user']}:{cred['password']}".encode()
            head.headers.set("Authorization", "Basic " + base64.b64encode(pair).decode())
        return head

    def _credential(self, req: Exchange) -> dict | None:
        """The stored secret of the first target this request's host matches that names one."""
        policy = self.conn.proxy.policy.current
        per_agent = getattr(policy, "for_agent", None)  # targets may name a credential per agent
        for t in self.targets(req):
            name = per_agent(t.credentials, self.conn.rec.agent) if per_agent else t.credentials
            if name:
                return self.conn.proxy.credentials.get(name)
        return None

    def _resign(self, req: Exchange, head: RequestHead, cred: dict) -> RequestHead:
        placeholder_id = cred.get("placeholder_access_key_id")
        if not placeholder_id:
            # Without knowing the agent's key, any signature the agent made would be laundered.
            raise SigV4Error("the stored AWS credential has no placeholder_access_key_id")
        real = Credentials(cred["access_key_id"], cred["secret_access_key"], cred.get("session_token") or None)
        placeholder_secret = cred.get("placeholder_secret_access_key")
        placeholder = Credentials(placeholder_id, placeholder_secret) if placeholder_secret else None
        body = bytes(req.body) if req.body is not None and req.complete else None
        return resign(head, real, body=body, placeholder=placeholder, expected_access_key=placeholder_id)

    def _forward(self, req: Exchange) -> None:
        if self.origin_gone is not None:
            self._answer(req, responses.bad_gateway(self.origin_gone), "upstream-error")
            return
        head = for_origin(req.head)
        try:
            head = self._outbound(req, head)
        except SigV4Error as e:
            self.conn.event("aws-resign-refused", {"reason": str(e)[:200], "action": req.op.action})
            self._refuse(req, "interlock-resign", f"cannot re-sign: {e}", "refused")
            return
        if req.decision.verdict is Verdict.MASK:
            if head is req.head:
                head = head.copy()
            head.headers.set("Accept-Encoding", "identity")  # a compressed body cannot be masked
        req.forwarding = True
        try:
            self._to_origin(self.origin.send_head(head))
            if req.body is not None:
                self._to_origin(self.origin.send_body(bytes(req.body)))
                if req.complete:
                    self._to_origin(self.origin.send_end())
                req.body = None
            elif self.agent.expects_continue:
                self._to_agent(self.agent.send_continue())
        except HttpProtocolError as e:
            self._answer(req, responses.bad_request(str(e)), "refused")
            return
        self.busy = False
        self.unread = 0
        self.conn.resume_client()
        self._pump_agent()

    # ---- the service's side -----------------------------------------------------------------------

    def origin_plain(self, data: bytes) -> None:
        """Decrypted (or plain) bytes from the service; b'' when it closed."""
        self._batched(self._origin_plain, data)

    def _origin_plain(self, data: bytes) -> None:
        if self.tunnel:
            self._to_agent(data)
            return
        if self.ending:
            return
        self.origin.receive(data)
        try:
            for ev in self.origin.events():
                req = self.req
                if isinstance(ev, Closed):
                    self.origin_failed("the service closed the connection")
                    return
                if req is None or not req.forwarding:
                    self.origin_failed("the service sent bytes with no request outstanding")
                    return
                if isinstance(ev, ResponseHead):
                    self._response_head(req, ev)
                elif isinstance(ev, Body):
                    self._response_body(req, ev.data)
                elif isinstance(ev, End):
                    self._response_end(req, ev.trailers)
                elif isinstance(ev, Switched):
                    self._switch(req, ev.trailing)
                if self.ending or self.tunnel:
                    return
        except HttpProtocolError as e:
            self.origin_failed("the service closed the connection before answering" if not data
                               else f"the service broke HTTP/1.1: {e}")

    def origin_failed(self, detail: str) -> None:
        """The service cannot answer (gone, TLS verification failed, not HTTP)."""
        if self.origin_gone is None:
            self.origin_gone = detail
        req = self.req
        if req is not None and req.forwarding and not req.answered and req.held is None:
            self._answer(req, responses.bad_gateway(detail), "upstream-error")
        elif req is not None and (req.answered or req.held is not None):
            self._finish(req, "upstream-error")
            self._end("upstream-error", detail)
        elif req is None and not self.keep_without_origin():
            self._end("closed", "")

    def _response_head(self, req: Exchange, head: ResponseHead) -> None:
        if head.informational:
            if head.status == 101:
                req.status = 101
                self._to_agent(self.agent.respond_head(for_agent(head)))
                req.answered = True
            elif head.status != 100:  # 100: the proxy answered Expect itself
                self._to_agent(self.agent.respond_head(for_agent(head)))
            return
        req.status = head.status
        out = for_agent(head)
        if head.http_version == "1.0" and "keep-alive" not in head.headers.tokens("connection"):
            out.headers.set("Connection", "close")  # the service closes after this one
        if (req.decision.verdict is Verdict.MASK and is_json_content_type(head.headers.get("content-type"))
                and req.head.method.upper() != "HEAD" and head.status not in (204, 304)):
            if (head.headers.get("content-encoding") or "identity").strip().lower() != "identity":
                self.origin_failed("the response is compressed and cannot be masked")
                return
            req.held = out
            return
        self._to_agent(self.agent.respond_head(out))
        req.answered = True

    def _response_body(self, req: Exchange, data: bytes) -> None:
        req.down += len(data)
        if req.held is not None:
            req.held_body += data
            if len(req.held_body) > MASK_BODY_LIMIT:
                req.held = None
                self.origin_failed(f"the response to mask is over {MASK_BODY_LIMIT} bytes")
            return
        self._to_agent(self.agent.respond_body(data))

    def _response_end(self, req: Exchange, trailers: Headers) -> None:
        if req.held is not None:
            head, body = req.held, bytes(req.held_body)
            req.held = None
            masked = mask_json_bytes(body, mask_spec(req.decision.mask))
            if masked is None:
                self.origin_failed("the response says JSON but does not parse: it cannot be masked")
                return
            body, report = masked
            if report.changed:
                self.conn.event("masked", {"rule": req.decision.rule, "fields": report.fields[:50],
                                           "detectors": report.detector_hits})
            head.headers.remove("transfer-encoding", "content-length")
            head.headers.set("Content-Length", str(len(body)))
            self._to_agent(self.agent.respond_head(head) + self.agent.respond_body(body) + self.agent.respond_end())
            req.answered = True
        else:
            self._to_agent(self.agent.respond_end(trailers))
        self._done(req)

    def _switch(self, req: Exchange, trailing: bytes) -> None:
        """101: from now on raw bytes both ways (WebSocket); the upgrade itself is on record."""
        self.tunnel = True
        self.conn.event("http-upgrade", {"protocol": (req.head.upgrade or "")[:40], "host": req.head.host,
                                         "path": normalize_path(req.head.path)[:300]})
        self._finish(req, "upgraded")
        self._to_agent(trailing)
        self._to_origin(self.agent.trailing_data)

    # ---- ending a request and the connection ------------------------------------------------------

    def _answer(self, req: Exchange, canned: Canned, outcome: str) -> None:
        """A response the proxy writes itself (refusal, gateway error), then the next request."""
        req.status, req.outcome = canned.status, outcome
        try:
            out = self.agent.respond(*canned)
        except HttpProtocolError:
            self._finish(req, outcome)
            self._end(outcome, f"{canned.status} after the response began")
            return
        req.down += len(canned.body)
        self._to_agent(out)
        req.answered = True
        self._done(req)

    def _finish(self, req: Exchange, outcome: str | None = None) -> None:
        """The request's event: what a reviewer reads in `interlock replay`."""
        if outcome:
            req.outcome = outcome
        d = req.decision
        head = req.head
        recorder, sid = self.conn.proxy.recorder, self.conn.rec.id
        if head is self._seen:
            method, host, path = self._seen_facts[2:]
        else:
            method, host, path = head.method[:16], head.host[:255], _recorded_path(head.path, head.target, head.query)
        host = host or self.conn.rec.dst_addr[:255]
        ms = round((time.time() - req.started) * 1000, 1)
        aws = req.op is not None and req.op.protocol == "aws"
        if d is not None and not aws:  # the usual request: its record written directly, rides a shared commit
            recorder.event_json("http", http_record(method, host, path, req.status, req.up, req.down, req.outcome, ms,
                                                    d.verdict.value, d.rule), sid, linger=True)
        else:
            data = {"method": method, "host": host, "path": path, "status": req.status, "up": req.up,
                    "down": req.down, "outcome": req.outcome, "ms": ms}
            if d is not None:
                data.update(verdict=d.verdict.value, rule=d.rule)
            if aws:
                data["action"] = req.op.action
            recorder.event("http", data, sid, linger=True)
        self.served += 1
        self.req = None

    def _done(self, req: Exchange) -> None:
        self._finish(req)
        self.busy = False
        self.unread = 0
        if self.agent.must_close or not req.complete or self.agent_eof:
            self._end("closed", "")
            return
        if self.origin_gone is not None and not self.keep_without_origin():
            self._end("closed", "")
            return
        self.conn.resume_client()
        self._pump_agent()  # a pipelined request may be waiting already

    def _end(self, outcome: str, detail: str) -> None:
        """Close once what was written has been flushed."""
        if self.ending:
            return
        self.ending = True
        self.flush()
        self.flush_close()
        self.conn.close(outcome, detail, abort=False)

    def flush_close(self) -> None:
        """Last bytes before the close (the TLS handler sends close_notify)."""

    def on_close(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        if self.req is not None and self.req.op is not None:
            self._finish(self.req, "agent-gone" if not self.req.answered else "incomplete")
