"""HTTP/1.1 for a proxy, sans-IO, on top of httptools (llhttp, in C).

Two connection objects, one per side of the proxy, both bytes-in/events-out and
calls-in/bytes-out:

    AgentConnection   we are the server; the agent's requests come in, our responses go out
    OriginConnection  we are the client; forwarded requests go out, the origin's responses come in

Why llhttp and our own framing rather than h11: h11's two state machines cost ~70 µs a request,
a quarter of the proxy's whole budget; llhttp parses a head in a few µs. What h11 did for us is
kept here, in a few flags: pipelined requests wait until the current response is sent,
100-continue, refusing a request whose body was never read (Connection: close), re-chunking a
close-delimited response for an HTTP/1.1 agent, protocol switches to a raw tunnel, and errors
for anything malformed (fail closed). Heads are case-preserving and editable, so they can be
judged, re-signed and re-serialised; a head nobody changed goes out as the bytes it came in as.
Bodies are never buffered here: each Body event is one chunk as it arrived.

Events from events(): RequestHead / ResponseHead (1xx included, see .informational), Body, End,
Switched (the connection is now an opaque tunnel: forward Switched.trailing then raw bytes), Closed.
events() stops when it needs more bytes or while a pipelined request waits for our response:
after finishing a response, call events() again, since the next request may already be buffered.
"""

from __future__ import annotations

import json
import posixpath
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from urllib.parse import SplitResult, unquote, urlsplit

import httptools

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

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(_s(k), _s(v)) for k, v in items]
        self._index: dict[str, list[str]] | None = None

    def _lookup(self) -> dict[str, list[str]]:
        """Values by lower-case name, built on the first lookup: a head is asked about the same
        fields several times (framing, Connection, the policy); every mutator drops it."""
        index = self._index
        if index is None:
            index = {}
            for k, v in self._items:
                low = k.lower()
                vals = index.get(low)
                if vals is None:
                    index[low] = [v]
                else:
                    vals.append(v)
            self._index = index
        return index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of name, or default. Use get_joined for list-valued fields."""
        vals = self._lookup().get(name.lower())
        return vals[0] if vals else default

    def get_all(self, name: str) -> list[str]:
        vals = self._lookup().get(name.lower())
        return list(vals) if vals else []

    def get_joined(self, name: str) -> str | None:
        vals = self._lookup().get(name.lower())
        if not vals:
            return None
        return vals[0] if len(vals) == 1 else ",".join(vals)

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
        self._index = None

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
        self._index = None

    def remove(self, *names: str) -> None:
        lows = {n.lower() for n in names}
        self._items = [(k, v) for k, v in self._items if k.lower() not in lows]
        self._index = None

    @classmethod
    def _of(cls, items: list[tuple[str, str]]) -> Headers:
        """Adopt a list of already-decoded pairs without copying (the parser's own list)."""
        h = cls.__new__(cls)
        h._items = items
        h._index = None
        return h


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
    """A request line and header block. target is exactly as the agent sent it.

    A parsed head keeps the bytes it arrived as; serialize() sends them as they are while the
    head is unchanged (same method, target and header list), instead of re-serialising."""

    method: str
    target: str
    headers: Headers = field(default_factory=Headers)
    http_version: str = "1.1"
    _raw = None  # (bytes, method, target, the header list object, its length); not a field

    def _keep_raw(self, raw: bytes) -> None:
        items = self.headers._items
        self._raw = (raw, self.method, self.target, items, len(items))

    @property
    def raw(self) -> bytes | None:
        """The original bytes, while they still describe this head. Headers.set/remove build a
        new list and add() lengthens it, so any edit is seen without a flag on every mutator."""
        r = self._raw
        if r is None:
            return None
        items = self.headers._items
        if r[1] is self.method and r[2] is self.target and r[3] is items and r[4] == len(items):
            return r[0]
        return None

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
        t = self.target
        if t.startswith("/") and "#" not in t and not t.startswith("//"):
            return t.split("?", 1)[0]  # origin-form, the usual case: no URL parser needed
        if self.method.upper() == "CONNECT" or t == "*":
            return ""
        return self._split.path or "/"

    @property
    def query(self) -> str:
        """Raw query string without '?'."""
        t = self.target
        if t.startswith("/") and "#" not in t and not t.startswith("//"):
            return t.split("?", 1)[1] if "?" in t else ""
        return self._split.query

    _auth = None  # (authority, target, header list, its length): host/port/authority are read often

    @property
    def authority(self) -> str:
        """Host[:port] the agent addressed: Host header, else absolute-form or CONNECT target."""
        items = self.headers._items
        c = self._auth
        if c is not None and c[1] is self.target and c[2] is items and c[3] == len(items):
            return c[0]
        if self.method.upper() == "CONNECT":
            a = self.target
        elif self.target.startswith(("http://", "https://")):
            a = self._split.netloc
        else:
            a = (self.headers.get("host") or "").strip()
        self._auth = (a, self.target, items, len(items))
        return a

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
        """An editable copy; it no longer claims the original bytes."""
        return replace(self, headers=self.headers.copy(), **changes)  # type: ignore[arg-type]

    def serialize(self) -> bytes:
        """The head as it goes on the wire: the original bytes when nothing changed."""
        raw = self.raw
        if raw is not None:
            return raw
        return _serialize(f"{self.method} {self.target} HTTP/1.1", self.headers)


@dataclass
class ResponseHead:
    status: int
    reason: str = ""
    headers: Headers = field(default_factory=Headers)
    http_version: str = "1.1"

    _raw = None  # (bytes, status, reason, the header list object, its length); not a field

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200

    def _keep_raw(self, raw: bytes) -> None:
        items = self.headers._items
        self._raw = (raw, self.status, self.reason, items, len(items))

    @property
    def raw(self) -> bytes | None:
        """The original bytes (an HTTP/1.1 head, one CRLF line per field), while they still
        describe this head: same status, reason and header list (see RequestHead.raw)."""
        r = self._raw
        if r is None:
            return None
        items = self.headers._items
        if r[1] == self.status and r[2] is self.reason and r[3] is items and r[4] == len(items):
            return r[0]
        return None

    def copy(self, **changes: object) -> ResponseHead:
        return replace(self, headers=self.headers.copy(), **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes


@dataclass(frozen=True)
class End:
    trailers: Headers = field(default_factory=Headers)


_NO_TRAILERS = End()

# A kept-alive connection sends the same few heads again and again (a client polling one URL; a
# service answering with the same fields, its Date changing once a second). A read that is exactly
# a whole message parsed earlier on this connection, arriving where the parser stands between
# messages, yields that message's events again without running the parser: llhttp in its start
# state makes the same events of the same bytes. Only complete, keep-alive, HTTP/1.1 messages
# framed by their head are remembered (no chunks, no upgrade, no close), at most SEEN_HEADS per
# side and SEEN_HEAD_BYTES each, so a connection holds a few KiB more at most.
SEEN_HEADS = 4
SEEN_HEAD_BYTES = 1024


@dataclass(frozen=True)
class Switched:
    """The connection left HTTP (101 Switching Protocols, or CONNECT accepted)."""

    trailing: bytes = b""


@dataclass(frozen=True)
class Closed:
    pass


Event = RequestHead | ResponseHead | Body | End | Switched | Closed


def _serialize(start: str, headers: Headers) -> bytes:
    """Start line and fields, refusing any CR or LF inside them: a value with a line break would
    let whoever chose it (a credential, a rewritten field) inject a header or a second message."""
    items = headers._items
    text = "\r\n".join([start, *[f"{k}: {v}" for k, v in items], "", ""])
    if text.count("\n") != len(items) + 2 or text.count("\r") != len(items) + 2:
        raise HttpProtocolError("a header name or value contains a line break", 500)
    return text.encode("latin-1")


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + _serialize("", trailers)[2:]


class _Side:
    """What both ends share: an llhttp parser whose callbacks queue events, and the switch state.

    The parser runs ahead of the consumer (pipelined requests are parsed as they arrive and wait
    in the queue); a parse error is queued too, raised when the consumer reaches it, so requests
    before the bad bytes are still served in order."""

    _parser_type: type = httptools.HttpRequestParser

    def __init__(self, max_head_size: int) -> None:
        self._max_head = max_head_size
        self._q: deque[Event | HttpProtocolError] = deque()
        self._parser = self._new_parser()
        self._fields: list[tuple[str, str]] = []
        self._trailers: list[tuple[str, str]] | None = None  # set once the head is complete
        self._url = b""
        self._reason = b""
        self._in_head = False
        self._in_message = False
        self._head_size = 0
        self._feed_mark = 0  # bytes of this feed accounted to earlier messages (head-size guard)
        self._failed = False
        self._eof = False
        self._upgraded: bytearray | None = None  # bytes after an upgrade the parser stopped at
        self._switched = False
        self._switched_reported = False
        self._close = False  # this exchange ends the connection

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        # llhttp takes nothing more after a message it reads as the connection's last (Connection
        # or Proxy-Connection: close, HTTP/1.0, a 1xx saying close): the seen-message cache may
        # answer only while the parser would read on (SEEN_HEADS).
        self._alive = True
        p = self._parser_type(self)
        # Content-Length beside Transfer-Encoding: framed by the chunks, as RFC 9112 §6.3 says, and
        # the length is never forwarded (for_origin/for_agent). llhttp refuses it by default.
        p.set_dangerous_leniencies(lenient_chunked_length=True)
        return p

    @property
    def in_head(self) -> bool:
        """A message head has begun and is not complete yet (what a header timeout measures)."""
        return self._in_head

    # ---- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = self._in_message = True
        self._head_size = -self._feed_mark
        self._fields = []
        self._trailers = None
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._feed_mark += len(url) + 16

    def on_header(self, name: bytes, value: bytes) -> None:
        self._feed_mark += len(name) + len(value) + 4
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        if self._trailers is None:
            self._fields.append(pair)
        else:
            self._trailers.append(pair)

    def on_body(self, body: bytes) -> None:
        self._feed_mark += len(body)
        self._q.append(Body(body))

    # ---- feeding -------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the peer; b'' means the peer closed its sending side."""
        if self._upgraded is not None:
            self._upgraded += data
            return
        if self._failed or self._eof:
            return
        if not data:
            self._eof = True
            self._at_eof()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        self._feed_mark = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded = bytearray(data[e.args[0]:])
        except httptools.HttpParserError as e:
            self._fail(HttpProtocolError(str(e) or "malformed HTTP", 400))
            return
        if self._in_head:
            self._head_size += len(data)
            if self._head_size > self._max_head:
                self._fail(HttpProtocolError("the message head is too large", 431))

    def _fail(self, err: HttpProtocolError) -> None:
        self._failed = True
        self._q.append(err)

    def _at_eof(self) -> None:
        if self._in_message:
            self._fail(HttpProtocolError("peer unexpectedly closed the connection mid-message"))
        else:
            self._q.append(Closed())

    def _keep_raw_head(self, head: RequestHead | ResponseHead, first_line: str) -> None:
        """Let the original bytes stand in for `head` when this read held all of it from its first
        byte and they say exactly what was parsed: `first_line` as re-serialised, then one CRLF
        line per field (no folded lines, no bare LF for the other side to read differently)."""
        buf = self._buf
        if self._head_start == 0 and buf and self._head_size <= 0:
            end = buf.find(b"\r\n\r\n")
            if end != -1 and buf.startswith(first_line.encode("latin-1")):
                raw = buf[:end + 4]
                n = len(self._fields) + 2
                if raw.count(b"\n") == n and raw.count(b"\r") == n:
                    head._keep_raw(raw)

    def _message_end(self) -> None:
        self._in_message = False
        t = self._trailers
        self._q.append(End(Headers._of(t)) if t else _NO_TRAILERS)

    # ---- consuming -----------------------------------------------------------------------------

    def _ready(self) -> bool:
        return True

    def events(self) -> Iterator[Event]:
        """Everything the bytes received so far make up, in order; see the module docstring."""
        q = self._q
        while q and self._ready():
            ev = q.popleft()
            if isinstance(ev, HttpProtocolError):
                q.appendleft(ev)  # stays: the connection is broken for good
                raise ev
            self._after_event(ev)
            yield ev
            if isinstance(ev, Closed):
                q.clear()
                return
        if self._switched and not self._switched_reported and not q:
            self._switched_reported = True
            yield Switched(self.trailing_data)

    def _after_event(self, ev: Event) -> None:
        pass

    @property
    def switched(self) -> bool:
        """Both directions are now raw bytes; stop using this object for them."""
        return self._switched

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the HTTP part, to forward raw after a switch."""
        return bytes(self._upgraded) if self._upgraded is not None else b""

    @property
    def must_close(self) -> bool:
        """This exchange ends the connection (Connection: close, HTTP/1.0 peer, framing by close,
        or a protocol error): close the socket once what was sent has been flushed."""
        return self._close or self._failed or self._eof


class AgentConnection(_Side):
    """The proxy as the server the agent thinks it talks to.

    Per request: events() yields the RequestHead, then Body chunks, then End. The caller answers
    with respond_head/respond_body/respond_end (forwarding the origin), or respond(...) for a
    proxy-generated answer. Pipelined requests stay queued until the response to the current one
    has been fully sent; then events() goes on with the next.
    """

    _parser_type = httptools.HttpRequestParser

    def __init__(self, *, max_head_size: int = 64 * 1024) -> None:
        super().__init__(max_head_size)
        self.current: RequestHead | None = None
        self._request_done = False
        self._waiting = False  # a request was handed out; the next waits for its response
        self._continue = False
        self._responding = False  # a final response head went out, its end not yet
        self._chunked = False  # the response body is sent chunked
        self._body_allowed = True
        self._keep_alive = True
        self._head_start = 0  # where the current head starts in _buf (its raw bytes)
        self._buf = b""
        self._seen: dict[bytes, RequestHead] = {}  # bodyless requests by their bytes (SEEN_HEADS)

    def _feed(self, data: bytes) -> None:
        if not self._in_message and self._alive:
            head = self._seen.get(data)
            if head is not None:
                if head.raw is not None:  # nobody edited it since: it still says exactly these bytes
                    self._q.append(head)
                    self._q.append(_NO_TRAILERS)
                    return
                del self._seen[data]
        q = self._q
        before = len(q)
        self._buf = data  # the raw head is sliced from it when the whole head is in this read
        self._head_start = -1
        super()._feed(data)
        self._buf = b""
        if len(q) == before + 2 and len(data) <= SEEN_HEAD_BYTES:
            self._remember(data, q[-2], q[-1])

    def _remember(self, data: bytes, head: object, end: object) -> None:
        """Keep a request that was this whole read: a head with no body, keep-alive (llhttp's own
        reading, `_alive`), not an upgrade."""
        if (end is _NO_TRAILERS and isinstance(head, RequestHead) and head.raw is not None and self._alive
                and len(head.raw) == len(data) and not self._in_message and not self._failed
                and self._upgraded is None and head.method != "CONNECT"):
            if len(self._seen) >= SEEN_HEADS:
                self._seen.clear()
            self._seen[data] = head

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_start = self._feed_mark  # exact only for the first message of a read; see below

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        version = p.get_http_version()
        method = p.get_method().decode("latin-1")
        head = RequestHead(method, self._url.decode("latin-1"), Headers._of(self._fields), version)
        if version == "1.1":
            self._keep_raw_head(head, f"{method} {head.target} HTTP/1.1\r\n")
        self._feed_mark += 2
        self._trailers = []
        self._q.append(head)

    def on_message_complete(self) -> None:
        self._alive = self._parser.should_keep_alive()  # only right inside this callback
        self._message_end()

    def _ready(self) -> bool:
        return not self._waiting

    def _after_event(self, ev: Event) -> None:
        if isinstance(ev, RequestHead):
            self.current = ev
            self._request_done = False
            conn = _tokens(ev.headers.get_joined("connection"))
            self._keep_alive = ev.http_version == "1.1" and "close" not in conn
            self._continue = ev.http_version == "1.1" and ev.expects_continue
            self._responding = False
        elif isinstance(ev, Body):
            self._continue = False
        elif isinstance(ev, End):
            self._request_done = True
            self._continue = False
            self._waiting = True

    @property
    def expects_continue(self) -> bool:
        """The agent waits for '100 Continue' before sending the body of the current request."""
        return self._continue

    @property
    def request_complete(self) -> bool:
        """The current request's body has been read to its end."""
        return self._request_done

    def send_continue(self) -> bytes:
        """Tell the agent to send its body: call once the request head has been allowed. Without
        it a waiting agent stalls (curl waits a second, others wait forever)."""
        if self._responding:
            raise HttpProtocolError("cannot send that now: a response has begun", 500)
        self._continue = False
        return b"HTTP/1.1 100 \r\n\r\n"

    def respond_head(self, head: ResponseHead) -> bytes:
        """Send a response head (1xx included). A 101 to an Upgrade request, or a 2xx to CONNECT,
        switches the connection: see .switched and .trailing_data."""
        if self._responding or self.current is None or self._switched:
            raise HttpProtocolError("cannot send that now: no request is waiting for a head", 500)
        self._continue = False
        req = self.current
        status = head.status
        if 100 <= status < 200:
            if status == 101 and req.upgrade is not None:
                self._switch()
            return _serialize(f"HTTP/1.1 {status} {head.reason}", head.headers)
        headers = head.headers
        method = req.method
        if method == "CONNECT" and 200 <= status < 300:
            self._switch()
            return _serialize(f"HTTP/1.1 {status} {head.reason}", headers)
        self._responding = True
        self._chunked = False
        self._body_allowed = method != "HEAD" and status not in (204, 304)
        edits: list[tuple[str, str | None]] = []
        says_close = "close" in _tokens(headers.get_joined("connection"))
        if says_close:
            self._close = True
        if not self._keep_alive:
            self._close = True
        if self._body_allowed:
            te = headers.get_joined("transfer-encoding")
            if te is not None:
                if self.current.http_version == "1.1":
                    self._chunked = True
                    if not te.rstrip().lower().endswith("chunked"):  # close-delimited, coded: chunk it too
                        edits.append(("Transfer-Encoding", f"{te}, chunked"))
                else:  # an HTTP/1.0 agent knows no chunks: the body ends with the connection
                    edits.append(("Transfer-Encoding", None))
                    self._close = True
            elif headers.get("content-length") is None:
                if self.current.http_version == "1.1":
                    edits.append(("Transfer-Encoding", "chunked"))  # close-delimited: re-chunked
                    self._chunked = True
                else:
                    self._close = True
        if self._close and not says_close:
            edits.append(("Connection", "close"))
        if edits:
            headers = headers.copy()
            for name, value in edits:
                if value is None:
                    headers.remove(name)
                else:
                    headers.set(name, value)
        else:
            raw = head.raw  # the service's own bytes, when they say exactly this head
            if raw is not None:
                return raw
        return _serialize(f"HTTP/1.1 {status} {head.reason}", headers)

    def _switch(self) -> None:
        self._switched = True
        if self._upgraded is None:
            self._upgraded = bytearray()

    def respond_body(self, data: bytes) -> bytes:
        if not data or not self._body_allowed:
            return b""
        if not self._responding:
            raise HttpProtocolError("cannot send that now: no response head", 500)
        return _chunk(data) if self._chunked else data

    def respond_end(self, trailers: Headers | None = None) -> bytes:
        if not self._responding:
            raise HttpProtocolError("cannot send that now: no response head", 500)
        out = _last_chunk(trailers) if self._chunked and self._body_allowed else b""
        self._responding = False
        self._next_cycle()
        return out

    def _next_cycle(self) -> None:
        """The response is out: with the request read too, the next request may be handed out."""
        if not self._request_done:
            self._close = True  # the rest of its body would be taken for the next request
            return
        if self._close:
            return
        self._waiting = False
        self.current = None
        if self._upgraded is not None:  # an upgrade the service refused: the bytes are HTTP after all
            rest, self._upgraded = bytes(self._upgraded), None
            self._parser = self._new_parser()
            if rest:
                self._feed(rest)

    def respond(self, status: int, headers: Iterable[tuple[str, str]], body: bytes, *, reason: str = "") -> bytes:
        """A whole proxy-generated response (refusal, gateway error) in one go.

        Adds Content-Length; drops the body for HEAD. If the request body was not read (a refusal
        judged on the head alone), asks to close the connection, since the unread body would
        otherwise be taken for the next request.
        """
        if self._responding:
            raise HttpProtocolError("response already started; close the connection", 500)
        hdrs = Headers(headers)
        hdrs.remove("content-length", "transfer-encoding")
        head_only = self.current is not None and self.current.method.upper() == "HEAD"
        hdrs.set("Content-Length", str(len(body)))
        keep = self._keep_alive and self.current is not None
        if not self._request_done or self._failed or not keep:
            hdrs.set("Connection", "close")
            self._close = True
        out = _serialize(f"HTTP/1.1 {status} {reason}", hdrs)
        if body and not head_only:
            out += body
        self._continue = False
        self._next_cycle()
        return out

    def respond_error(self, err: HttpProtocolError) -> bytes:
        """The answer to a request that could not be parsed; the connection must close after it."""
        body = f'{{"error":"bad request","detail":{_json_str(str(err))}}}'.encode()
        self._failed = True
        return self.respond(err.status, [("Content-Type", "application/json")], body)


def _json_str(s: str) -> str:
    return json.dumps(s[:200])


class OriginConnection(_Side):
    """The proxy as the client of the real service.

    send_head/send_body/send_end write a request; events() yields the origin's response (any 1xx
    heads first), Body chunks, End. After End the connection is reusable for the next request
    unless must_close.
    """

    _parser_type = httptools.HttpResponseParser

    def __init__(self, *, max_head_size: int = 64 * 1024) -> None:
        super().__init__(max_head_size)
        self._method = ""
        self._chunked = False
        self._sending = False
        self._outstanding = 0  # requests sent whose final response has not ended
        self._by_close = False  # the current response's body ends with the connection
        self._pending = bytearray()  # a HEAD/CONNECT response, until its head is whole
        self._head_start = 0  # where the current head starts in _buf (its raw bytes)
        self._buf = b""
        self._seen: dict[bytes, tuple[ResponseHead, int]] = {}  # heads framed by Content-Length (SEEN_HEADS)

    def send_head(self, head: RequestHead) -> bytes:
        if self._sending:
            raise HttpProtocolError("cannot send that now: the previous request is not finished", 500)
        self._method = head.method.upper()
        headers = head.headers
        self._chunked = headers.get("transfer-encoding") is not None
        self._sending = True
        self._outstanding += 1
        if "close" in _tokens(headers.get_joined("connection")):
            self._close = True
        return head.serialize()

    def send_body(self, data: bytes) -> bytes:
        if not data:
            return b""
        return _chunk(data) if self._chunked else data

    def send_end(self, trailers: Headers | None = None) -> bytes:
        self._sending = False
        return _last_chunk(trailers) if self._chunked else b""

    # The response parser cannot be told a response has no body because of its request (HEAD,
    # a 2xx to CONNECT): those heads are cut at their blank line and parsed on their own.
    def receive(self, data: bytes) -> None:
        if data and self._upgraded is None and self._method in ("HEAD", "CONNECT") and self._outstanding:
            self._pending += data
            while self._method in ("HEAD", "CONNECT") and self._outstanding and not self._failed:
                end = self._pending.find(b"\r\n\r\n")
                if end == -1:
                    if len(self._pending) > self._max_head:
                        self._fail(HttpProtocolError("the message head is too large", 431))
                    return
                head, rest = bytes(self._pending[:end + 4]), bytes(self._pending[end + 4:])
                self._pending = bytearray()
                self._feed(head)
                if self._in_message and not self._failed:  # a final head: no body follows
                    self._parser = self._new_parser()
                    self._message_end()
                    self._response_done()
                    if self._switched:
                        self._upgraded = bytearray(rest)
                        return
                if not rest:
                    return
                self._pending += rest
            data, self._pending = bytes(self._pending), bytearray()
            if not data:
                return
        super().receive(data)

    def _feed(self, data: bytes) -> None:
        seen = self._seen
        if seen and not self._in_message and self._alive and self._outstanding and self._method not in ("HEAD", "CONNECT"):
            end = data.find(b"\r\n\r\n", 0, SEEN_HEAD_BYTES) + 4
            hit = seen.get(data[:end]) if end > 4 else None
            if hit is not None:
                head, length = hit
                if head.raw is None:  # edited since (a masked answer's head): parse afresh
                    del seen[data[:end]]
                elif len(data) == end + length:  # the whole response, nothing after it
                    q = self._q
                    q.append(head)
                    if length:
                        q.append(Body(data[end:]))
                    q.append(_NO_TRAILERS)
                    self._response_done()
                    return
        q = self._q
        before = len(q)
        self._buf = data  # the raw head is sliced from it when the whole head is in this read
        self._head_start = -1
        super()._feed(data)
        self._buf = b""
        if len(q) - before in (2, 3) and self._method not in ("HEAD", "CONNECT"):
            self._remember(data, q[before], q[-1])

    def _remember(self, data: bytes, head: object, end: object) -> None:
        """Keep a final response that was this whole read, framed by its Content-Length, keep-alive."""
        if not (end is _NO_TRAILERS and isinstance(head, ResponseHead) and head.raw is not None and self._alive
                and 200 <= head.status and head.status not in (204, 304) and not self._in_message
                and not (self._failed or self._close or self._switched or self._upgraded is not None)):
            return
        raw, headers = head.raw, head.headers
        length = headers.get_all("content-length")
        if (len(raw) > SEEN_HEAD_BYTES or len(length) != 1 or not length[0].strip().isdigit()
                or "transfer-encoding" in headers or len(raw) + int(length[0]) != len(data)):
            return
        if len(self._seen) >= SEEN_HEADS:
            self._seen.clear()
        self._seen[raw] = (head, int(length[0]))

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._feed_mark += len(reason)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_start = self._feed_mark  # exact only for the first message of a read
        self._reason = b""

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        status = p.get_status_code()
        version = p.get_http_version()
        headers = Headers._of(self._fields)
        reason = self._reason.decode("latin-1")
        head = ResponseHead(status, reason, headers, version)
        if version == "1.1":
            self._keep_raw_head(head, f"HTTP/1.1 {status} {reason}\r\n")
        self._feed_mark += 2
        self._trailers = []
        self._q.append(head)
        if status >= 200:
            conn = _tokens(headers.get_joined("connection"))
            if "close" in conn or (version != "1.1" and "keep-alive" not in conn):
                self._close = True
            no_body = status in (204, 304) or self._method == "HEAD"
            te = headers.get_joined("transfer-encoding")
            chunked = te is not None and te.rstrip().lower().endswith("chunked")
            self._by_close = not no_body and not chunked and (te is not None or headers.get("content-length") is None)
            if self._by_close:
                self._close = True
            if self._method == "CONNECT" and status < 300:
                self._switched = True

    def on_message_complete(self) -> None:
        self._alive = self._parser.should_keep_alive()  # only right inside this callback
        q = self._q
        last = q[-1] if q else None
        if isinstance(last, ResponseHead) and last.informational:
            self._in_message = False
            if last.status == 101:
                self._switched = True
            return
        self._message_end()
        self._response_done()

    def _response_done(self) -> None:
        self._outstanding = max(0, self._outstanding - 1)
        self._by_close = False

    def _at_eof(self) -> None:
        if self._in_message and self._by_close:
            self._message_end()  # a body framed by the close has just ended
            self._response_done()
            self._q.append(Closed())
        else:
            super()._at_eof()

    @property
    def reusable(self) -> bool:
        """Idle and able to carry another request (keep-alive pool)."""
        return not (self._sending or self._outstanding or self.must_close or self._switched)


def for_origin(head: RequestHead, *, keep_expect: bool = False) -> RequestHead:
    """The agent's request as it should go to the origin.

    Drops proxy-only fields (Proxy-Connection, Proxy-Authorization), a Content-Length that a
    Transfer-Encoding overrides (RFC 9112 §6.3: forwarding both invites request smuggling, since
    the body was framed by Transfer-Encoding and the origin might not), and turns an absolute-form
    target into origin-form. Connection/Upgrade/Transfer-Encoding stay: the body's framing follows
    them and an Upgrade must reach the origin. Expect is dropped unless keep_expect, on the view
    that the proxy answers 100-continue itself once the policy has allowed the head.

    Returns head itself when none of that applies (the usual request): no copy, and its original
    bytes go out as they came. Edit the result only after copy().
    """
    headers = head.headers
    absolute = head.target.startswith(("http://", "https://"))
    if not absolute and head._raw is not None and not any(
            k.lower() in _ORIGIN_DROPS for k, _ in headers._items):
        return head
    h = head.copy()
    h.headers.remove("proxy-connection", "proxy-authorization")
    _drop_conflicting_length(h.headers)
    if not keep_expect:
        h.headers.remove("expect")
    if absolute:
        parts = urlsplit(h.target)
        if "host" not in h.headers:
            h.headers.add("Host", parts.netloc)
        h.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return h


# Fields whose presence means for_origin must rewrite the head (Transfer-Encoding: only with a
# Content-Length beside it, checked again in the slow path; Expect: unless keep_expect).
_ORIGIN_DROPS = frozenset({"proxy-connection", "proxy-authorization", "transfer-encoding", "expect"})


def for_agent(head: ResponseHead) -> ResponseHead:
    """The origin's response head as it should go to the agent: same Content-Length rule as
    for_origin, for the same reason in the other direction. head itself when nothing changes."""
    if head.headers.get("transfer-encoding") is None:
        return head
    h = head.copy()
    _drop_conflicting_length(h.headers)
    return h


def _drop_conflicting_length(headers: Headers) -> None:
    if "transfer-encoding" in headers:
        headers.remove("content-length")
