"""HTTP/1.1 for a proxy, sans-IO, on top of h11.

Two connection objects, one per side of the proxy, both bytes-in/events-out and
calls-in/bytes-out:

    AgentConnection   we are the server; the agent's requests come in, our responses go out
    OriginConnection  we are the client; forwarded requests go out, the origin's responses come in

Why wrap h11 rather than hand it out: the proxy wants case-preserving, editable heads it can judge,
re-sign and re-serialise; events that do not leak h11 types into policy code; and the proxy-only
chores (pipelining pauses, 100-continue, refusing a request whose body was never read, protocol
switches to a raw tunnel) handled in one place. Bodies are never buffered here: each Body event is
one chunk as it arrived, to be forwarded or dropped by the caller.

Events from events(): RequestHead / ResponseHead (1xx included, see .informational), Body, End,
Switched (the connection is now an opaque tunnel: forward Switched.trailing then raw bytes), Closed.
events() stops when it needs more bytes or while a pipelined request waits for our response:
after finishing a response, call events() again, since the next request may already be buffered.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from urllib.parse import SplitResult, unquote, urlsplit

import h11

__all__ = [
    "AgentConnection", "Body", "Closed", "End", "Event", "Headers", "HttpProtocolError", "OriginConnection",
    "RequestHead", "ResponseHead", "Switched", "for_agent", "for_origin", "normalize_path",
]

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the explicit-proxy ones; never forwarded as-is.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})


class HttpProtocolError(Exception):
    """The peer broke HTTP/1.1. status is the answer to send the agent (400, 413, 431, 501…)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Headers:
    """Ordered, case-preserving, case-insensitive multi-map of header fields.

    Order and case survive a round trip because some servers and every signature scheme care.
    Names and values are str, decoded as latin-1 so any byte survives.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(_s(k), _s(v)) for k, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of name, or default. Use get_joined for list-valued fields."""
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self._items if k.lower() == low]

    def get_joined(self, name: str) -> str | None:
        vals = self.get_all(name)
        return ",".join(vals) if vals else None

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of a field, lower-cased: 'Connection: keep-alive, Upgrade'."""
        return {t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def copy(self) -> Headers:
        return Headers(self._items)

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every field called name with one, kept where the first one was."""
        low = name.lower()
        out: list[tuple[str, str]] = []
        placed = False
        for k, v in self._items:
            if k.lower() == low:
                if not placed:
                    out.append((k, value))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            out.append((name, value))
        self._items = out

    def remove(self, *names: str) -> None:
        lows = {n.lower() for n in names}
        self._items = [(k, v) for k, v in self._items if k.lower() not in lows]

    def to_h11(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._items]


def _s(x: str | bytes) -> str:
    return x.decode("latin-1") if isinstance(x, bytes) else x


def normalize_path(path: str) -> str:
    """The path a rule should match: percent-decoded, dot segments and doubled slashes removed.

    Why: '/admin/../x', '/%61dmin' and '//admin' must not slip past a rule about '/admin'.
    The request on the wire keeps its raw path; only the policy view is normalised.
    """
    p = unquote(path or "/", errors="replace")
    trailing = p.endswith("/") and p != "/"
    p = posixpath.normpath("/" + p.lstrip("/"))
    p = "/" + p.lstrip("/")
    if trailing and p != "/":
        p += "/"
    return p


@dataclass
class RequestHead:
    """A request line and header block. target is exactly as the agent sent it."""

    method: str
    target: str
    headers: Headers = field(default_factory=Headers)
    http_version: str = "1.1"

    @property
    def _split(self) -> SplitResult:
        t = self.target
        if t.startswith(("http://", "https://")):
            return urlsplit(t)
        if self.method.upper() == "CONNECT" or t == "*":
            return urlsplit("")
        return urlsplit("//x" + t if t.startswith("/") else t)

    @property
    def path(self) -> str:
        """Raw path (still percent-encoded), '/' if empty; '' for CONNECT and '*'."""
        if self.method.upper() == "CONNECT" or self.target == "*":
            return ""
        return self._split.path or "/"

    @property
    def query(self) -> str:
        """Raw query string without '?'."""
        return self._split.query

    @property
    def authority(self) -> str:
        """Host[:port] the agent addressed: Host header, else absolute-form or CONNECT target."""
        if self.method.upper() == "CONNECT":
            return self.target
        if self.target.startswith(("http://", "https://")):
            return self._split.netloc
        return (self.headers.get("host") or "").strip()

    @property
    def host(self) -> str:
        """Lower-case host without port or IPv6 brackets."""
        a = self.authority.lower()
        if a.startswith("["):
            return a[1:a.find("]")] if "]" in a else a[1:]
        return a.rsplit(":", 1)[0] if a.count(":") == 1 else a

    @property
    def port(self) -> int | None:
        a = self.authority
        tail = a.rsplit("]", 1)[-1] if a.startswith("[") else a
        if tail.count(":") == 1:
            try:
                return int(tail.rsplit(":", 1)[1])
            except ValueError:
                return None
        return None

    @property
    def expects_continue(self) -> bool:
        return (self.headers.get("expect") or "").strip().lower() == "100-continue"

    @property
    def upgrade(self) -> str | None:
        """The protocol asked for by an Upgrade request (e.g. 'websocket'), else None."""
        if "upgrade" in self.headers.tokens("connection"):
            return self.headers.get("upgrade")
        return None

    def copy(self, **changes: object) -> RequestHead:
        return replace(self, headers=self.headers.copy(), **changes)  # type: ignore[arg-type]

    def to_h11(self) -> h11.Request:
        return h11.Request(method=self.method, target=self.target, headers=self.headers.to_h11(),
                           http_version=self.http_version)

    @classmethod
    def from_h11(cls, ev: h11.Request) -> RequestHead:
        return cls(_s(ev.method), _s(ev.target), Headers(ev.headers.raw_items()), _s(ev.http_version))


@dataclass
class ResponseHead:
    status: int
    reason: str = ""
    headers: Headers = field(default_factory=Headers)
    http_version: str = "1.1"

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200

    def copy(self, **changes: object) -> ResponseHead:
        return replace(self, headers=self.headers.copy(), **changes)  # type: ignore[arg-type]

    def to_h11(self) -> h11.Response | h11.InformationalResponse:
        cls = h11.InformationalResponse if self.informational else h11.Response
        return cls(status_code=self.status, headers=self.headers.to_h11(), reason=self.reason.encode("latin-1"))

    @classmethod
    def from_h11(cls, ev: h11.Response | h11.InformationalResponse) -> ResponseHead:
        return cls(ev.status_code, _s(ev.reason), Headers(ev.headers.raw_items()), _s(ev.http_version))


@dataclass(frozen=True)
class Body:
    data: bytes


@dataclass(frozen=True)
class End:
    trailers: Headers = field(default_factory=Headers)


@dataclass(frozen=True)
class Switched:
    """The connection left HTTP (101 Switching Protocols, or CONNECT accepted)."""

    trailing: bytes = b""


@dataclass(frozen=True)
class Closed:
    pass


Event = RequestHead | ResponseHead | Body | End | Switched | Closed


def _translate(ev: object) -> Event:
    if isinstance(ev, h11.Request):
        return RequestHead.from_h11(ev)
    if isinstance(ev, (h11.Response, h11.InformationalResponse)):
        return ResponseHead.from_h11(ev)
    if isinstance(ev, h11.Data):
        return Body(bytes(ev.data))
    if isinstance(ev, h11.EndOfMessage):
        return End(Headers(ev.headers.raw_items()))
    if isinstance(ev, h11.ConnectionClosed):
        return Closed()
    raise AssertionError(f"unexpected h11 event {ev!r}")


class _Side:
    def __init__(self, role: type[h11.SERVER] | type[h11.CLIENT], max_head_size: int) -> None:
        self._conn = h11.Connection(our_role=role, max_incomplete_event_size=max_head_size)
        self._switched_reported = False

    def receive(self, data: bytes) -> None:
        """Bytes from the peer; b'' means the peer closed its sending side."""
        self._conn.receive_data(data)

    def events(self) -> Iterator[Event]:
        """Everything the bytes received so far make up, in order; see the module docstring."""
        while True:
            try:
                ev = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise HttpProtocolError(str(e), e.error_status_hint) from e
            if ev is h11.NEED_DATA:
                return
            if ev is h11.PAUSED:
                if self._conn.their_state is h11.SWITCHED_PROTOCOL and not self._switched_reported:
                    self._switched_reported = True
                    yield Switched(self._conn.trailing_data[0])
                return
            out = _translate(ev)
            self._after_event(out)
            yield out
            if isinstance(out, Closed):
                return  # h11 repeats ConnectionClosed forever; report it once per call

    def _after_event(self, ev: Event) -> None:
        pass

    def _send(self, ev: object) -> bytes:
        try:
            return self._conn.send(ev) or b""
        except h11.LocalProtocolError as e:
            raise HttpProtocolError(f"cannot send that now: {e}", 500) from e

    @property
    def switched(self) -> bool:
        """Both directions are now raw bytes; stop using this object for them."""
        return self._conn.our_state is h11.SWITCHED_PROTOCOL

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the HTTP part, to forward raw after a switch."""
        return self._conn.trailing_data[0]

    @property
    def must_close(self) -> bool:
        """This exchange ends the connection (Connection: close, HTTP/1.0 peer, framing by close,
        or a protocol error): close the socket once what was sent has been flushed."""
        return h11.MUST_CLOSE in (self._conn.our_state, self._conn.their_state) or \
            h11.ERROR in (self._conn.our_state, self._conn.their_state) or \
            h11.CLOSED in (self._conn.our_state, self._conn.their_state)

    def _maybe_next_cycle(self) -> None:
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()


class AgentConnection(_Side):
    """The proxy as the server the agent thinks it talks to.

    Per request: events() yields the RequestHead, then Body chunks, then End. The caller answers
    with respond_head/respond_body/respond_end (forwarding the origin), or respond(...) for a
    proxy-generated answer. Pipelined requests stay queued until the response to the current one
    has been fully sent; then events() goes on with the next.
    """

    def __init__(self, *, max_head_size: int = 64 * 1024) -> None:
        super().__init__(h11.SERVER, max_head_size)
        self.current: RequestHead | None = None
        self._request_done = False

    def _after_event(self, ev: Event) -> None:
        if isinstance(ev, RequestHead):
            self.current = ev
            self._request_done = False
        elif isinstance(ev, End):
            self._request_done = True

    @property
    def expects_continue(self) -> bool:
        """The agent waits for '100 Continue' before sending the body of the current request."""
        return self._conn.they_are_waiting_for_100_continue

    @property
    def request_complete(self) -> bool:
        """The current request's body has been read to its end."""
        return self._request_done

    def send_continue(self) -> bytes:
        """Tell the agent to send its body: call once the request head has been allowed. Without
        it a waiting agent stalls (curl waits a second, others wait forever)."""
        return self._send(h11.InformationalResponse(status_code=100, headers=[]))

    def respond_head(self, head: ResponseHead) -> bytes:
        """Send a response head (1xx included). A 101 to an Upgrade request, or a 2xx to CONNECT,
        switches the connection: see .switched and .trailing_data."""
        return self._send(head.to_h11())

    def respond_body(self, data: bytes) -> bytes:
        return self._send(h11.Data(data=data)) if data else b""

    def respond_end(self, trailers: Headers | None = None) -> bytes:
        out = self._send(h11.EndOfMessage(headers=trailers.to_h11() if trailers else []))
        self._maybe_next_cycle()
        return out

    def respond(self, status: int, headers: Iterable[tuple[str, str]], body: bytes, *, reason: str = "") -> bytes:
        """A whole proxy-generated response (refusal, gateway error) in one go.

        Adds Content-Length; drops the body for HEAD. If the request body was not read (a refusal
        judged on the head alone), asks to close the connection, since the unread body would
        otherwise be taken for the next request.
        """
        hdrs = Headers(headers)
        hdrs.remove("content-length", "transfer-encoding")
        head_only = self.current is not None and self.current.method.upper() == "HEAD"
        hdrs.set("Content-Length", str(len(body)))
        if not self._request_done or self._conn.their_state is h11.ERROR:
            hdrs.set("Connection", "close")
        if self._conn.their_state is h11.ERROR and self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise HttpProtocolError("response already started; close the connection", 500)
        out = self._send(h11.Response(status_code=status, headers=hdrs.to_h11(), reason=reason.encode("latin-1")))
        if body and not head_only:
            out += self._send(h11.Data(data=body))
        out += self._send(h11.EndOfMessage())
        self._maybe_next_cycle()
        return out

    def respond_error(self, err: HttpProtocolError) -> bytes:
        """The answer to a request that could not be parsed; the connection must close after it."""
        body = f'{{"error":"bad request","detail":{_json_str(str(err))}}}'.encode()
        return self.respond(err.status, [("Content-Type", "application/json")], body)


def _json_str(s: str) -> str:
    return json.dumps(s[:200])


class OriginConnection(_Side):
    """The proxy as the client of the real service.

    send_head/send_body/send_end write a request; events() yields the origin's response (any 1xx
    heads first), Body chunks, End. After End the connection is reusable for the next request
    unless must_close.
    """

    def __init__(self, *, max_head_size: int = 64 * 1024) -> None:
        super().__init__(h11.CLIENT, max_head_size)

    def send_head(self, head: RequestHead) -> bytes:
        return self._send(head.to_h11())

    def send_body(self, data: bytes) -> bytes:
        return self._send(h11.Data(data=data)) if data else b""

    def send_end(self, trailers: Headers | None = None) -> bytes:
        out = self._send(h11.EndOfMessage(headers=trailers.to_h11() if trailers else []))
        self._maybe_next_cycle()
        return out

    def _after_event(self, ev: Event) -> None:
        if isinstance(ev, End):
            self._maybe_next_cycle()

    @property
    def reusable(self) -> bool:
        """Idle and able to carry another request (keep-alive pool)."""
        return self._conn.our_state is h11.IDLE and self._conn.their_state is h11.IDLE


def for_origin(head: RequestHead, *, keep_expect: bool = False) -> RequestHead:
    """The agent's request as it should go to the origin.

    Drops proxy-only fields (Proxy-Connection, Proxy-Authorization), a Content-Length that a
    Transfer-Encoding overrides (RFC 9112 §6.3: forwarding both invites request smuggling, since
    h11 framed the body by Transfer-Encoding and the origin might not), and turns an absolute-form
    target into origin-form. Connection/Upgrade/Transfer-Encoding stay: h11 frames the body from
    them and an Upgrade must reach the origin. Expect is dropped unless keep_expect, on the view
    that the proxy answers 100-continue itself once the policy has allowed the head.
    """
    h = head.copy()
    h.headers.remove("proxy-connection", "proxy-authorization")
    _drop_conflicting_length(h.headers)
    if not keep_expect:
        h.headers.remove("expect")
    if h.target.startswith(("http://", "https://")):
        parts = urlsplit(h.target)
        if "host" not in h.headers:
            h.headers.add("Host", parts.netloc)
        h.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return h


def for_agent(head: ResponseHead) -> ResponseHead:
    """The origin's response head as it should go to the agent: same Content-Length rule as
    for_origin, for the same reason in the other direction."""
    h = head.copy()
    _drop_conflicting_length(h.headers)
    return h


def _drop_conflicting_length(headers: Headers) -> None:
    if "transfer-encoding" in headers:
        headers.remove("content-length")
