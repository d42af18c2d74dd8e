"""proxy.http.model's seen-message cache (SEEN_HEADS): a read that repeats a whole message parsed
earlier on the connection yields that message's events without the parser. The property that
matters is that nothing changes but the cost: every test runs the same traffic through a side
with the cache and one without and compares what each hands the proxy and what each sends."""

from __future__ import annotations

import random

import pytest

from proxy.http import model
from proxy.http.model import (
    AgentConnection,
    Body,
    End,
    Headers,
    HttpProtocolError,
    OriginConnection,
    RequestHead,
    ResponseHead,
)


def describe(ev) -> tuple:
    """An event as plain values (heads by what they say, not by identity)."""
    if isinstance(ev, RequestHead):
        return ("req", ev.method, ev.target, ev.http_version, tuple(ev.headers.items()), ev.serialize())
    if isinstance(ev, ResponseHead):
        return ("resp", ev.status, ev.reason, ev.http_version, tuple(ev.headers.items()), ev.raw)
    if isinstance(ev, Body):
        return ("body", ev.data)
    if isinstance(ev, End):
        return ("end", tuple(ev.trailers.items()))
    return (type(ev).__name__,)


@pytest.fixture
def uncached():
    """A factory of sides that never remember a message (the parser runs on every read)."""
    def make(cls):
        side = cls()
        side._seen = _Forgetful()
        return side
    return make


class _Forgetful(dict):
    def __setitem__(self, key, value) -> None:
        pass


# ---- the agent's side ---------------------------------------------------------------------------

REQUESTS = [
    b"GET /small HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /small HTTP/1.1\r\nHost: b\r\nX-Debug: on\r\n\r\n",
    b"GET /small HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
    b"GET /small HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /p HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HEAD /small HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /old HTTP/1.0\r\nHost: b\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /small HTTP/1.1\r\nHost: b\r\n Folded\r\n\r\n",
    b"GET /small HTTP/1.1\nHost: b\n\n",
    b"GET /bad HTTP/1.1\r\nHost: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
]


def serve(agent: AgentConnection, reads: list[bytes]) -> list:
    """Feed reads; answer every complete request with a small response, as the proxy would."""
    log: list = []
    for data in reads:
        agent.receive(data)
        try:
            while True:
                evs = list(agent.events())
                if not evs:
                    break
                for ev in evs:
                    log.append(describe(ev))
                    if isinstance(ev, End):
                        out = agent.respond_head(ResponseHead(200, "OK", Headers([("Content-Length", "2")])))
                        out += agent.respond_body(b"ok") + agent.respond_end()
                        log.append(("sent", out, agent.must_close))
        except HttpProtocolError as e:
            log.append(("error", e.status))
            break
        if agent.must_close or agent.switched:
            log.append(("closing", agent.switched))
            break
    return log


def test_a_repeated_request_is_the_same_head_and_the_same_events(uncached) -> None:
    req = REQUESTS[0]
    cached, plain = AgentConnection(), uncached(AgentConnection)
    assert serve(cached, [req] * 5) == serve(plain, [req] * 5)
    heads = []
    again = AgentConnection()
    for _ in range(3):
        again.receive(req)
        evs = list(again.events())
        heads.append(evs[0])
        again.respond(200, [], b"")
    assert heads[0] is heads[1] is heads[2], "the parser did not run again"


def test_an_edited_head_is_parsed_afresh() -> None:
    agent = AgentConnection()
    agent.receive(REQUESTS[0])
    first = list(agent.events())[0]
    first.headers.set("Authorization", "Bearer injected")  # what a credential injection does (on a copy, normally)
    agent.respond(200, [], b"")
    agent.receive(REQUESTS[0])
    second = list(agent.events())[0]
    assert second is not first and second.headers.get("authorization") is None
    assert second.serialize() == REQUESTS[0]


@pytest.mark.parametrize("index", range(1, len(REQUESTS)))
def test_what_is_not_remembered_still_parses_the_same(uncached, index) -> None:
    reads = [REQUESTS[index]] * 3
    assert serve(AgentConnection(), reads) == serve(uncached(AgentConnection), reads)


def test_close_and_upgrade_and_bodies_are_never_remembered() -> None:
    for req in (REQUESTS[3], REQUESTS[4], REQUESTS[5], REQUESTS[7], REQUESTS[8]):
        agent = AgentConnection()
        serve(agent, [req])
        assert not agent._seen, req


def test_a_remembered_request_split_or_joined_differently_goes_through_the_parser(uncached) -> None:
    a, b = REQUESTS[0], REQUESTS[1]
    reads = [a, a[:7], a[7:], a + b, b, a, a]
    assert serve(AgentConnection(), reads) == serve(uncached(AgentConnection), reads)


def test_random_request_streams_match_the_parser(uncached) -> None:
    rnd = random.Random(1414)
    for _ in range(400):
        msgs = [rnd.choice(REQUESTS[:8]) for _ in range(rnd.randint(1, 8))]
        stream = b"".join(msgs)
        reads, i = [], 0
        while i < len(stream):
            how = rnd.random()
            if how < 0.6:  # whole messages, the usual case
                n = len(msgs[len(reads)]) if len(reads) < len(msgs) and sum(map(len, reads)) == i else rnd.randint(1, 80)
            else:
                n = rnd.randint(1, 80)
            reads.append(stream[i:i + n])
            i += n
        assert serve(AgentConnection(), reads) == serve(uncached(AgentConnection), reads), reads


# ---- the service's side -------------------------------------------------------------------------

def response(body: bytes = b"ok", date: str = "Tue, 01 Dec 2026 10:00:00 GMT", **extra: str) -> bytes:
    fields = [("Server", "nginx"), ("Date", date), ("Content-Length", str(len(body))), *extra.items()]
    return b"HTTP/1.1 200 OK\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields) + b"\r\n" + body


RESPONSES = [
    response(),
    response(b"other"),
    response(date="Tue, 01 Dec 2026 10:00:01 GMT"),
    response(b""),
    b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\n" + response(),
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
]


def fetch(origin: OriginConnection, exchanges: list[tuple[str, list[bytes]]]) -> list:
    """One request per exchange (its method), then the service's reads for it."""
    log: list = []
    for method, reads in exchanges:
        if not origin.reusable:
            log.append(("not reusable",))
            break
        origin.send_head(RequestHead(method, "/", Headers([("Host", "b")])))
        origin.send_end()
        try:
            for data in reads:
                origin.receive(data)
                log.extend(describe(ev) for ev in origin.events())
        except HttpProtocolError as e:
            log.append(("error", e.status))
            break
        log.append(("state", origin.reusable, origin.must_close, origin._outstanding))
    return log


def test_a_repeated_response_is_the_same_head_and_the_same_events(uncached) -> None:
    ex = [("GET", [RESPONSES[0]])] * 5
    assert fetch(OriginConnection(), ex) == fetch(uncached(OriginConnection), ex)
    origin = OriginConnection()
    heads = []
    for _ in range(3):
        origin.send_head(RequestHead("GET", "/", Headers([("Host", "b")])))
        origin.send_end()
        origin.receive(RESPONSES[0])
        heads.append(next(iter(origin.events())))
        list(origin.events())
    assert heads[0] is heads[1] is heads[2]


def test_a_head_request_after_a_remembered_response_expects_no_body(uncached) -> None:
    head_only = RESPONSES[0][:RESPONSES[0].index(b"\r\n\r\n") + 4]
    ex = [("GET", [RESPONSES[0]]), ("GET", [RESPONSES[0]]), ("HEAD", [head_only]), ("GET", [RESPONSES[0]])]
    got = fetch(OriginConnection(), ex)
    assert got == fetch(uncached(OriginConnection), ex)
    assert got[-1] == ("state", True, False, 0)


@pytest.mark.parametrize("index", range(1, len(RESPONSES)))
def test_responses_not_remembered_still_parse_the_same(uncached, index) -> None:
    ex = [("GET", [RESPONSES[0]]), ("GET", [RESPONSES[index]]), ("GET", [RESPONSES[index]]), ("GET", [RESPONSES[0]])]
    assert fetch(OriginConnection(), ex) == fetch(uncached(OriginConnection), ex)


def test_a_remembered_head_with_a_body_split_or_extra_bytes_goes_through_the_parser(uncached) -> None:
    r = RESPONSES[1]
    cut = r.index(b"\r\n\r\n") + 4
    ex = [("GET", [r]), ("GET", [r[:cut], r[cut:]]), ("GET", [r[:cut + 2], r[cut + 2:]]), ("GET", [r + b"HTTP/1.1 2"])]
    assert fetch(OriginConnection(), ex) == fetch(uncached(OriginConnection), ex)


def test_an_edited_response_head_is_parsed_afresh() -> None:
    origin = OriginConnection()
    origin.send_head(RequestHead("GET", "/", Headers([("Host", "b")])))
    origin.send_end()
    origin.receive(RESPONSES[0])
    first = next(iter(origin.events()))
    list(origin.events())
    first.headers.remove("content-length")  # what masking does to the head it holds
    origin.send_head(RequestHead("GET", "/", Headers([("Host", "b")])))
    origin.send_end()
    origin.receive(RESPONSES[0])
    second = next(iter(origin.events()))
    assert second is not first and second.headers.get("content-length") == "2"


def test_random_response_streams_match_the_parser(uncached) -> None:
    rnd = random.Random(1515)
    for _ in range(400):
        ex = []
        for _ in range(rnd.randint(1, 6)):
            method = rnd.choice(["GET", "GET", "GET", "HEAD"])
            r = rnd.choice(RESPONSES[:4] + RESPONSES[6:7])
            if method == "HEAD":
                r = r[:r.index(b"\r\n\r\n") + 4]
            if rnd.random() < 0.3:
                cut = rnd.randint(1, len(r) - 1)
                reads = [r[:cut], r[cut:]]
            else:
                reads = [r]
            ex.append((method, reads))
        assert fetch(OriginConnection(), ex) == fetch(uncached(OriginConnection), ex), ex


def test_the_cache_is_bounded() -> None:
    agent = AgentConnection()
    for i in range(50):
        serve(agent, [f"GET /p{i} HTTP/1.1\r\nHost: b\r\n\r\n".encode()])
        assert len(agent._seen) <= model.SEEN_HEADS
    long = b"GET /" + b"a" * model.SEEN_HEAD_BYTES + b" HTTP/1.1\r\nHost: b\r\n\r\n"
    agent = AgentConnection()
    serve(agent, [long])
    assert not agent._seen


def test_nothing_is_answered_from_memory_once_the_parser_reads_the_connection_as_closed(uncached) -> None:
    """llhttp takes no message after one it reads as the last (here Proxy-Connection: close, which
    the model's own keep-alive view does not weigh): neither may the cache (found by an attack
    review: the cache served the request again where the parser refused it)."""
    req = b"GET /a HTTP/1.1\r\nHost: b\r\nProxy-Connection: close\r\n\r\n"
    cached, plain = AgentConnection(), uncached(AgentConnection)
    for side in (cached, plain):
        side.receive(req)
        list(side.events())
        side.respond(200, [], b"")
        side.receive(req)
    with pytest.raises(HttpProtocolError):
        list(plain.events())
    with pytest.raises(HttpProtocolError):
        list(cached.events())


def test_a_1xx_saying_close_ends_what_the_origin_cache_may_answer(uncached) -> None:
    ok = RESPONSES[0]
    early = b"HTTP/1.1 103 Early Hints\r\nConnection: close\r\n\r\n"
    ex = [("GET", [ok]), ("GET", [early, ok]), ("GET", [ok])]
    cached = fetch(OriginConnection(), ex)
    assert cached == fetch(uncached(OriginConnection), ex)
    assert ("error", 400) in cached
