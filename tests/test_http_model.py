"""The sans-IO HTTP/1.1 model: what a proxy needs from both sides of a connection."""

from __future__ import annotations

import json

import pytest

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
from proxy.http.responses import bad_gateway, bad_request, blocked, gateway_timeout
from proxy.http.rules import operation_from_request


def drain(conn, data: bytes | None = None) -> list:
    if data is not None:
        conn.receive(data)
    return list(conn.events())


def parse_response(raw: bytes, method: str = "GET") -> tuple[ResponseHead, bytes]:
    """Read a response back with a client-side parser, as the agent would."""
    o = OriginConnection()
    o.send_head(RequestHead(method, "/", Headers([("Host", "x")])))
    o.send_end()
    evs = drain(o, raw)
    heads = [e for e in evs if isinstance(e, ResponseHead) and not e.informational]
    body = b"".join(e.data for e in evs if isinstance(e, Body))
    assert any(isinstance(e, End) for e in evs), evs
    return heads[0], body


# --- Headers -----------------------------------------------------------------------------------

def test_headers_case_insensitive_and_order_preserving() -> None:
    h = Headers([("Host", "a"), ("X-Thing", "1"), ("x-thing", "2"), ("Accept", "*/*")])
    assert h.get("HOST") == "a"
    assert h.get_all("X-THING") == ["1", "2"]
    assert h.get_joined("x-thing") == "1,2"
    h.set("X-Thing", "3")
    assert h.items() == [("Host", "a"), ("X-Thing", "3"), ("Accept", "*/*")]
    h.remove("accept")
    h.add("New", "v")
    assert [k for k, _ in h] == ["Host", "X-Thing", "New"]
    assert "new" in h and "accept" not in h
    assert Headers([("Connection", "keep-alive, Upgrade")]).tokens("connection") == {"keep-alive", "upgrade"}


def test_request_head_views() -> None:
    r = RequestHead("GET", "/a%20b/c?x=1&y=2", Headers([("Host", "Example.COM:8443")]))
    assert (r.path, r.query, r.host, r.port, r.authority) == ("/a%20b/c", "x=1&y=2", "example.com", 8443,
                                                              "Example.COM:8443")
    assert RequestHead("GET", "http://h.example/p?q", Headers()).host == "h.example"
    assert RequestHead("GET", "/", Headers([("Host", "[::1]:80")])).host == "::1"
    assert RequestHead("GET", "/", Headers([("Host", "[::1]:80")])).port == 80
    c = RequestHead("CONNECT", "db.example:5432", Headers())
    assert (c.host, c.port, c.path) == ("db.example", 5432, "")


def test_normalize_path() -> None:
    assert normalize_path("/admin/../secret") == "/secret"
    assert normalize_path("/%61dmin/") == "/admin/"
    assert normalize_path("//a//b/./c") == "/a/b/c"
    assert normalize_path("") == "/"
    assert normalize_path("/../../etc/passwd") == "/etc/passwd"


# --- Agent side: parsing ----------------------------------------------------------------------

def test_simple_get_roundtrip_and_keepalive() -> None:
    a = AgentConnection()
    evs = drain(a, b"GET /x?y=1 HTTP/1.1\r\nHost: svc\r\nX-Case: KeepMe\r\n\r\n")
    assert isinstance(evs[0], RequestHead)
    assert evs[0].headers.items() == [("Host", "svc"), ("X-Case", "KeepMe")]
    assert isinstance(evs[-1], End)
    out = a.respond_head(ResponseHead(200, "OK", Headers([("Content-Length", "2")])))
    out += a.respond_body(b"hi") + a.respond_end()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhi")
    assert not a.must_close
    evs = drain(a, b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert evs[0].target == "/second"


def test_chunked_body_streams_chunk_by_chunk() -> None:
    a = AgentConnection()
    evs = drain(a, b"POST /u HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert [type(e) for e in evs] == [RequestHead, Body]
    assert evs[1].data == b"hello"
    assert not a.request_complete
    evs = drain(a, b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert evs[0] == Body(b" world")
    assert isinstance(evs[1], End) and evs[1].trailers.get("x-trailer") == "t"
    assert a.request_complete


def test_content_length_body_split_across_reads() -> None:
    a = AgentConnection()
    seen = drain(a, b"PUT /k HTTP/1.1\r\nHost: s\r\nContent-Length: 10\r\n\r\n01234")
    seen += drain(a, b"56789")
    assert b"".join(e.data for e in seen if isinstance(e, Body)) == b"0123456789"
    assert isinstance(seen[-1], End)


def test_head_split_byte_by_byte() -> None:
    a = AgentConnection()
    raw = b"GET /slow HTTP/1.1\r\nHost: s\r\n\r\n"
    evs = []
    for i in range(len(raw)):
        evs += drain(a, raw[i:i + 1])
    assert isinstance(evs[0], RequestHead) and evs[0].target == "/slow"


def test_pipelining_waits_for_response() -> None:
    a = AgentConnection()
    evs = drain(a, b"GET /1 HTTP/1.1\r\nHost: s\r\n\r\nGET /2 HTTP/1.1\r\nHost: s\r\n\r\n"
                   b"DELETE /3 HTTP/1.1\r\nHost: s\r\n\r\n")
    assert [e.target for e in evs if isinstance(e, RequestHead)] == ["/1"]
    assert drain(a) == []  # still paused: /1 has no response yet
    a.respond(200, [], b"one")
    evs = drain(a)
    assert [e.target for e in evs if isinstance(e, RequestHead)] == ["/2"]
    a.respond(200, [], b"two")
    evs = drain(a)
    assert [(e.method, e.target) for e in evs if isinstance(e, RequestHead)] == [("DELETE", "/3")]


def test_expect_continue_then_body() -> None:
    a = AgentConnection()
    evs = drain(a, b"PUT /big HTTP/1.1\r\nHost: s\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert evs[0].expects_continue and a.expects_continue
    assert a.send_continue() == b"HTTP/1.1 100 \r\n\r\n"
    assert not a.expects_continue
    evs = drain(a, b"data")
    assert evs == [Body(b"data"), End(Headers())]


def test_refusal_before_body_closes_connection() -> None:
    a = AgentConnection()
    drain(a, b"PUT /big HTTP/1.1\r\nHost: s\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
    raw = a.respond(*blocked("no-big-uploads", "too big"))
    head, body = parse_response(raw)
    assert head.status == 403 and head.headers.get("connection") == "close"
    assert json.loads(body)["rule"] == "no-big-uploads"
    assert a.must_close


def test_refusal_after_body_keeps_connection() -> None:
    a = AgentConnection()
    drain(a, b"POST /x HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\nhi")
    raw = a.respond(*blocked("r", "no"))
    head, _ = parse_response(raw)
    assert head.headers.get("connection") is None
    assert not a.must_close


def test_head_request_refusal_has_no_body() -> None:
    a = AgentConnection()
    drain(a, b"HEAD /x HTTP/1.1\r\nHost: s\r\n\r\n")
    raw = a.respond(*blocked("r", "no"))
    assert raw.endswith(b"\r\n\r\n")
    head, body = parse_response(raw, "HEAD")
    assert head.status == 403 and body == b""
    assert int(head.headers.get("content-length")) > 0


def test_http10_client_gets_close() -> None:
    a = AgentConnection()
    drain(a, b"GET / HTTP/1.0\r\nHost: s\r\n\r\n")
    a.respond(200, [], b"x")
    assert a.must_close


def test_connection_close_request() -> None:
    a = AgentConnection()
    drain(a, b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    raw = a.respond(200, [], b"x")
    assert b"connection: close" in raw.lower()
    assert a.must_close


def test_garbage_is_a_protocol_error_answered_with_400() -> None:
    a = AgentConnection()
    with pytest.raises(HttpProtocolError) as ei:
        drain(a, b"NOT HTTP AT ALL\r\n\r\n")
    assert ei.value.status == 400
    raw = a.respond_error(ei.value)
    assert raw.startswith(b"HTTP/1.1 400")
    assert a.must_close


def test_oversized_head_is_431() -> None:
    a = AgentConnection(max_head_size=1024)
    with pytest.raises(HttpProtocolError) as ei:
        drain(a, b"GET / HTTP/1.1\r\nHost: s\r\nX-Big: " + b"a" * 4096)
    assert ei.value.status == 431


def test_agent_eof_is_closed_event() -> None:
    a = AgentConnection()
    assert drain(a, b"") == [Closed()]
    assert a.must_close


def test_upgrade_switches_to_tunnel() -> None:
    a = AgentConnection()
    evs = drain(a, b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x05hello")
    head = evs[0]
    assert head.upgrade == "websocket"
    # The origin side: forward the request, get 101 plus the first frame.
    o = OriginConnection()
    wire = o.send_head(for_origin(head)) + o.send_end()
    assert b"Upgrade: websocket" in wire
    oevs = drain(o, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi")
    assert oevs[0].status == 101
    assert oevs[-1] == Switched(b"\x81\x02hi")
    assert o.switched
    out = a.respond_head(oevs[0])
    assert out.startswith(b"HTTP/1.1 101")
    assert a.switched and a.trailing_data == b"\x81\x05hello"
    assert drain(a) == [Switched(b"\x81\x05hello")]


def test_upgrade_refused_by_origin_stays_http() -> None:
    a = AgentConnection()
    drain(a, b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    a.respond(403, [], b"no")
    assert not a.switched
    evs = drain(a, b"GET /next HTTP/1.1\r\nHost: s\r\n\r\n")
    assert evs[0].target == "/next"


def test_connect_accepted_switches() -> None:
    a = AgentConnection()
    evs = drain(a, b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nrawbytes")
    assert evs[0].method == "CONNECT"
    a.respond_head(ResponseHead(200, "Connection Established"))
    assert a.switched and a.trailing_data == b"rawbytes"


# --- Origin side --------------------------------------------------------------------------------

def test_reserialised_request_keeps_case_and_modified_headers() -> None:
    a = AgentConnection()
    head = drain(a, b"POST /api HTTP/1.1\r\nHost: svc\r\nAuthorization: placeholder\r\n"
                    b"Content-Length: 3\r\nX-Mixed-Case: v\r\n\r\nabc")[0]
    fwd = head.copy()
    fwd.headers.set("Authorization", "real")
    o = OriginConnection()
    wire = o.send_head(fwd) + o.send_body(b"abc") + o.send_end()
    assert wire == (b"POST /api HTTP/1.1\r\nHost: svc\r\nAuthorization: real\r\nContent-Length: 3\r\n"
                    b"X-Mixed-Case: v\r\n\r\nabc")
    assert head.headers.get("authorization") == "placeholder"  # copy() did not alias


def test_chunked_request_forwarded_chunked() -> None:
    o = OriginConnection()
    h = RequestHead("POST", "/", Headers([("Host", "s"), ("Transfer-Encoding", "chunked")]))
    wire = o.send_head(h) + o.send_body(b"abc") + o.send_end(Headers([("X-Sum", "1")]))
    assert wire.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")


def test_for_origin_absolute_form_and_proxy_headers() -> None:
    h = RequestHead("GET", "http://api.example:8080/p?q=1",
                    Headers([("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic x"),
                             ("Expect", "100-continue")]))
    f = for_origin(h)
    assert f.target == "/p?q=1"
    assert f.headers.items() == [("Host", "api.example:8080")]
    assert for_origin(h, keep_expect=True).headers.get("expect") == "100-continue"


def test_origin_response_streaming_and_reuse() -> None:
    o = OriginConnection()
    o.send_head(RequestHead("GET", "/", Headers([("Host", "s")])))
    o.send_end()
    evs = drain(o, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n3\r\nabc\r\n")
    assert evs[0].status == 200 and evs[0].headers.get("x-up") == "1"
    assert evs[1] == Body(b"abc")
    evs = drain(o, b"0\r\n\r\n")
    assert isinstance(evs[-1], End)
    assert o.reusable


def test_origin_informational_then_final() -> None:
    o = OriginConnection()
    o.send_head(RequestHead("PUT", "/", Headers([("Host", "s"), ("Content-Length", "1"),
                                                  ("Expect", "100-continue")])))
    evs = drain(o, b"HTTP/1.1 100 Continue\r\n\r\n")
    assert evs[0].informational
    o.send_body(b"x")
    o.send_end()
    evs = drain(o, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert evs[0].status == 204 and isinstance(evs[-1], End)


def test_origin_close_delimited_body_to_http11_agent_is_rechunked() -> None:
    a = AgentConnection()
    drain(a, b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    o = OriginConnection()
    o.send_head(RequestHead("GET", "/", Headers([("Host", "s")])))
    o.send_end()
    evs = drain(o, b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nstream")
    evs += drain(o, b"")
    assert [type(e) for e in evs] == [ResponseHead, Body, End, Closed]
    assert o.must_close
    out = b""
    for e in evs:
        if isinstance(e, ResponseHead):
            out += a.respond_head(e)
        elif isinstance(e, Body):
            out += a.respond_body(e.data)
        elif isinstance(e, End):
            out += a.respond_end()
    assert b"Transfer-Encoding: chunked" in out
    head, body = parse_response(out)
    assert body == b"stream"
    assert not a.must_close


def test_head_response_has_no_body_for_origin() -> None:
    o = OriginConnection()
    o.send_head(RequestHead("HEAD", "/", Headers([("Host", "s")])))
    o.send_end()
    evs = drain(o, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert [type(e) for e in evs] == [ResponseHead, End]


def test_origin_garbage_is_protocol_error() -> None:
    o = OriginConnection()
    o.send_head(RequestHead("GET", "/", Headers([("Host", "s")])))
    o.send_end()
    with pytest.raises(HttpProtocolError):
        drain(o, b"SSH-2.0-OpenSSH\r\n\r\n")


def test_full_proxy_exchange_with_pipelining() -> None:
    """Agent pipelines two requests; each goes through its own origin exchange in order."""
    a = AgentConnection()
    a.receive(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\nPOST /b HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\n\r\nZ")
    to_agent = b""
    o = OriginConnection()
    for n in range(2):
        evs = list(a.events())
        head = next(e for e in evs if isinstance(e, RequestHead))
        o.send_head(for_origin(head))
        for e in evs:
            if isinstance(e, Body):
                o.send_body(e.data)
        o.send_end()
        for e in drain(o, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + str(n).encode()):
            if isinstance(e, ResponseHead):
                to_agent += a.respond_head(e)
            elif isinstance(e, Body):
                to_agent += a.respond_body(e.data)
            elif isinstance(e, End):
                to_agent += a.respond_end()
    assert to_agent.count(b"HTTP/1.1 200 OK") == 2
    assert to_agent.endswith(b"1")


# --- Canned responses -------------------------------------------------------------------------

def test_canned_responses() -> None:
    for canned, status in ((blocked("r1", "why"), 403), (bad_gateway(), 502), (gateway_timeout(), 504),
                           (bad_request("x"), 400)):
        a = AgentConnection()
        drain(a, b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
        head, body = parse_response(a.respond(*canned))
        assert head.status == status
        assert head.headers.get("content-type") == "application/json"
        assert head.headers.get("x-interlock")
        json.loads(body)
    b = json.loads(blocked("deny-prod-delete", "prod is read-only", request_id="r-9").body)
    assert b == {"error": "blocked_by_policy", "rule": "deny-prod-delete", "reason": "prod is read-only",
                 "request_id": "r-9"}
    assert dict(blocked('bad"rule\r\nX: y', "z").headers)["X-Interlock"] == "blocked; rule=bad_rule__X:_y"


# --- Operation --------------------------------------------------------------------------------

def test_operation_from_request() -> None:
    head = RequestHead("DELETE", "/v1/users/../admin/%31?token=sekrit&page=2",
                       Headers([("Host", "API.example.com"), ("Authorization", "Bearer abc.def"),
                                ("Content-Type", "application/json"), ("Cookie", "s=1")]))
    op = operation_from_request(head)
    assert op.protocol == "http" and op.action == "DELETE"
    assert op.objects == ("api.example.com/v1/admin/1",)
    assert op.attributes["host"] == "api.example.com"
    assert op.attributes["path"] == "/v1/admin/1"
    assert "sekrit" not in op.attributes["query"] and "page=2" in op.attributes["query"]
    assert "sekrit" not in op.summary and "abc.def" not in str(op.attributes)
    assert op.attributes["auth_scheme"] == "Bearer"
    assert op.attributes["header.content-type"] == "application/json"
    assert "header.cookie" not in op.attributes


def test_operation_port_and_overrides() -> None:
    head = RequestHead("POST", "/x", Headers([("Host", "svc:8080"), ("X-HTTP-Method-Override", "DELETE")]))
    op = operation_from_request(head, scheme="http")
    assert op.objects == ("svc:8080/x",)
    assert "method-override" in op.risks
    assert op.summary == "POST http://svc:8080/x"
    op2 = operation_from_request(RequestHead("GET", "/", Headers()), scheme="http", default_host="10.0.0.5",
                                 default_port=80)
    assert op2.objects == ("10.0.0.5/",)


def test_content_length_overridden_by_transfer_encoding_is_not_forwarded() -> None:
    """A request smuggling shape: h11 frames by chunked, so the origin must not see the length."""
    a = AgentConnection()
    evs = drain(a, b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: s\r\n\r\n")
    head = evs[0]
    assert b"".join(e.data for e in evs if isinstance(e, Body)) == b"abc"
    o = OriginConnection()
    wire = o.send_head(for_origin(head)) + o.send_body(b"abc") + o.send_end()
    assert b"Content-Length" not in wire and b"Transfer-Encoding: chunked" in wire
    resp = ResponseHead(200, "OK", Headers([("Content-Length", "9"), ("Transfer-Encoding", "chunked")]))
    assert for_agent(resp).headers.items() == [("Transfer-Encoding", "chunked")]
    a.respond(200, [], b"ok")
    assert [e.target for e in drain(a) if isinstance(e, RequestHead)] == ["/smuggled"]


def test_response_head_passes_as_its_own_bytes_only_while_unchanged() -> None:
    """A response head nobody edits goes out as the bytes it came in as; an edit (ours or
    the agent's Connection: close) or a non-1.1 status line is re-serialised from the parse."""
    def exchange(resp: bytes, *, edit: bool = False, agent_close: bool = False) -> bytes:
        a, o = AgentConnection(), OriginConnection()
        req = b"GET / HTTP/1.1\r\nHost: s\r\n" + (b"Connection: close\r\n" if agent_close else b"") + b"\r\n"
        (head,) = [e for e in drain(a, req) if isinstance(e, RequestHead)]
        o.send_head(for_origin(head))
        o.send_end()
        out = b""
        for ev in drain(o, resp):
            if isinstance(ev, ResponseHead):
                h = for_agent(ev)
                if edit:
                    h.headers.set("X-Added", "1")
                out += a.respond_head(h)
                break
        return out

    kept = b"HTTP/1.1 200 OK\r\nServer:  odd  spacing\r\ncontent-length: 2\r\n\r\n"
    assert exchange(kept + b"ok") == kept  # byte for byte, spacing and case included
    assert b"X-Added: 1\r\n" in exchange(kept + b"ok", edit=True)
    closed = exchange(kept + b"ok", agent_close=True)  # Connection: close added for the agent
    assert closed != kept and b"Connection: close\r\n" in closed
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    assert exchange(old).startswith(b"HTTP/1.1 200 OK\r\n")
