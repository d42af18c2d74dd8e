"""Message flows PostgreSQL accepts that the relay's tracker must follow exactly, sans-IO: each test
feeds the client's messages (as the handler pushes them) and the server's answers, byte for byte
what a PostgreSQL 15 server sends for that flow, and checks what the agent receives."""

from __future__ import annotations

import struct

import pytest

from lab.postgres import through_tracker
from proxy.postgres import wire
from proxy.postgres.masking import MaskSpec
from proxy.postgres.stream import RAW, Splitter, bind_fields, parse_fields
from proxy.postgres.tlsbio import TlsPipe, client_context
from proxy.postgres.tracker import (
    BIND,
    DESC_P,
    EXECUTE,
    PARSE,
    SYNC_K,
    Portal,
    PreparedStatement,
    Statement,
    Tracker,
)
from proxy.tls.ca import CertificateAuthority, LeafMinter

EMAIL_SPEC = MaskSpec.from_names(["email"])
PARSE_OK, BIND_OK = wire.ParseComplete().encode(), wire.BindComplete().encode()
NO_DATA = wire.NoData().encode()


feed = through_tracker


def _allow(summary: str = "s") -> tuple[Portal, Statement]:
    return Portal(PreparedStatement(summary, "allow", "a", None), (), []), Statement(summary, "allow", "a")


def extended_copy_in(t: Tracker, fail: bool = False) -> bytes:
    """libpq's PQsendQueryParams("COPY t FROM STDIN"): Parse, Bind, Describe(P), Execute, Sync,
    then (once CopyInResponse is in) CopyData, CopyDone or CopyFail, Sync."""
    portal, st = _allow("copy t from stdin")
    t.push(PARSE)
    t.push(BIND)
    t.push(DESC_P).portal = portal
    t.execute(portal, st)
    assert t.push(SYNC_K) is not None  # queued: the server has not said COPY yet
    out = feed(t, PARSE_OK + BIND_OK + NO_DATA + wire.CopyInResponse(0, (0,)).encode())
    assert t.push(SYNC_K) is None, "a Sync during COPY-in gets no answer"
    t.copy_end()  # CopyDone / CopyFail
    t.push(SYNC_K)
    if fail:
        return out + feed(t, wire.error_response("ERROR", "57014", "COPY from stdin failed: no")
                          + wire.ready_for_query("I"))
    return out + feed(t, wire.command_complete("COPY 1") + wire.ready_for_query("I"))


def test_extended_copy_in_twice_and_after_copy_fail():
    t = Tracker()
    for fail in (False, False, True, False):
        out = extended_copy_in(t, fail)
        assert out.endswith(wire.ready_for_query("I")) and not t.queue and not t.copy_in
    assert [s.tag or s.error[:5] for s in t.finished] == ["COPY 1", "COPY 1", "57014", "COPY 1"]
    # and the session goes on: a query's rows arrive where they belong
    t.query([Statement("select 1", "allow", "a")])
    out = feed(t, wire.row_description(["x"]) + wire.data_row(["1"]) + wire.command_complete("SELECT 1")
               + wire.ready_for_query())
    assert out.count(wire.data_row(["1"])) == 1


def test_copy_done_pipelined_before_the_copy_in_response():
    # a client that streams the COPY data without waiting: its Syncs up to CopyDone are ignored
    t = Tracker()
    portal, st = _allow()
    t.execute(portal, st)
    t.push(SYNC_K)
    t.copy_end()
    t.push(SYNC_K)
    feed(t, wire.CopyInResponse(0, ()).encode())
    assert [e.kind for e in t.queue] == [EXECUTE, SYNC_K] and not t.copy_in
    assert feed(t, wire.command_complete("COPY 0") + wire.ready_for_query()).endswith(wire.ready_for_query())
    assert not t.queue
    # a CopyDone for a COPY the server never starts is no response to wait for
    t.execute(*_allow())
    t.copy_end()
    t.push(SYNC_K)
    feed(t, wire.error_response("ERROR", "42P01", "no such table") + wire.ready_for_query())
    assert not t.queue


def test_a_data_row_that_belongs_to_no_request_ends_the_session_before_any_of_it_passes():
    # the masking bypass: a Sync the tracker wrongly waits for sits before a masked Execute, and
    # the server's rows for that Execute arrive while the oldest expectation is the Sync
    t = Tracker()
    t.push(SYNC_K)
    masked = Portal(PreparedStatement("select * from people", "mask", "m", EMAIL_SPEC), (0,), [],
                    description=wire.row_description([("email", 25)]))
    t.execute(masked, Statement("select * from people", "mask", "m", mask=EMAIL_SPEC))
    s = Splitter("backend")
    s.feed(wire.data_row(["a@example.com"]) + wire.data_row(["b@example.com"]))
    s.stream = t.stream
    kind, view = s.next()
    assert kind != RAW, "the row is not streamed unseen"
    with pytest.raises(wire.ProtocolError, match="attribute"):
        t.server(kind, view)
    # no request at all, or a query before its RowDescription: the same
    for setup in (lambda t: None, lambda t: t.query([Statement("select 1", "allow", "a")]),
                  lambda t: t.push(PARSE)):
        t = Tracker()
        setup(t)
        assert b"D" not in t.stream
        with pytest.raises(wire.ProtocolError):
            feed(t, wire.data_row(["x"]))
    t = Tracker()
    with pytest.raises(wire.ProtocolError, match="CopyData"):
        feed(t, wire.CopyData(b"x").encode())


def test_messages_after_a_failed_execute_are_dropped_until_sync_a_simple_query_too():
    t = Tracker()
    portal, st = _allow("select 1/0")
    t.push(BIND)
    t.execute(portal, st)
    q = Statement("select 2", "allow", "a")
    t.query([q])  # sent before Sync: the server discards it
    t.push(PARSE)
    t.push(SYNC_K)
    out = feed(t, BIND_OK + wire.error_response("ERROR", "22012", "division by zero") + wire.ready_for_query())
    assert out.endswith(wire.ready_for_query()) and not t.queue
    assert q.error == "not run: skipped after an error"
    t.query([Statement("select 3", "allow", "a")])
    out = feed(t, wire.row_description(["x"]) + wire.data_row(["3"]) + wire.command_complete("SELECT 1")
               + wire.ready_for_query())
    assert wire.data_row(["3"]) in out


def test_int16_counts_are_unsigned():
    n = 40_000  # libpq allows up to 65 535 parameters
    p = wire.Parse("", "insert ...", tuple([23] * n)).encode()
    assert parse_fields(memoryview(p))[2] == (23,) * n
    b = wire.Bind("", "", (0,), tuple(b"1" for _ in range(n)), ()).encode()
    assert len(bind_fields(memoryview(b))[3]) == n
    assert wire.read_messages("frontend", b, startup=False)[0].params[-1] == b"1"
    d = wire.data_row([b"x"] * 40_000)
    assert struct.unpack_from("!H", d, 5)[0] == 40_000
    assert len(wire.read_messages("backend", d)[0].values) == 40_000


def _tls_pair() -> tuple[TlsPipe, TlsPipe]:
    minter = LeafMinter(CertificateAuthority.create())
    server = TlsPipe.server(minter.server_context("10.1.2.3", alpn=()))
    client = TlsPipe.client(client_context())
    to_server = client.outgoing()
    for _ in range(6):
        server.receive(to_server)
        client.receive(server.outgoing())
        to_server = client.outgoing()
    assert server.handshaken and client.handshaken
    return server, client


def _records(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(data):
        typ, _, length = struct.unpack_from("!BHH", data, pos)
        out.append((typ, length))
        pos += 5 + length
    assert pos == len(data)
    return out


def test_tls_records_toward_the_agent_carry_at_most_8_kb():
    # PostgreSQL's own records never exceed 8 KB and libpq only guarantees an 8 KB input buffer:
    # a larger record leaves decrypted bytes inside OpenSSL while the socket is idle.
    server, client = _tls_pair()
    for size in (1, 8192, 8193, 16384, 100_000, 1_000_003):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        data = server.encrypt(payload)
        recs = _records(data)
        assert all(length <= 8192 + 256 for _, length in recs), recs[:3]
        assert len(recs) >= -(-size // 8192)
        assert client.receive(data) == payload


def test_tls_shutdown_sends_close_notify():
    server, client = _tls_pair()
    client.receive(server.shutdown())
    assert client.closed, "the agent reads a clean end of TLS, not 'unexpected eof'"


def test_syntax_errors_are_answered_as_the_server_would():
    from proxy.postgres.analysis import Analyzer
    from proxy.postgres.handler import syntax_error

    for sql, message, pos in (("selec 1", 'syntax error at or near "selec"', "1"),
                              ("select 1 from", "syntax error at end of input", "14"),
                              ("select 'é', 'x' wat 1", 'syntax error at or near "1"', "21")):
        err = wire.read_messages("backend", syntax_error(Analyzer().analyze(sql), sql))[0]
        assert (err.code, err.message, err.fields.get("P")) == ("42601", message, pos)
    assert syntax_error(Analyzer().analyze("select 1"), "select 1") is None


def test_text_is_read_under_standard_conforming_strings_off_where_it_reads_the_same():
    from proxy.postgres.reading import same_reading

    assert same_reading("select 1") and same_reading("select E'a\\\\b', E'\\\\000'::bytea")
    assert not same_reading("select 'a\\\\b'"), "a plain literal with a backslash reads differently"
    assert not same_reading("select 'a\\' or 1=1 --'"), "one string or two"
    # a body the server parses when it runs (DO, functions) may read differently then
    assert not same_reading("do $$ begin perform 'a\\''; drop table t; --'; end $$")
    assert same_reading("do $$ begin perform 1; end $$")


def test_sql_is_read_in_the_client_encoding_the_server_reports():
    from proxy.postgres.handler import _query_text

    t = Tracker()
    feed(t, wire.parameter_status("client_encoding", "LATIN9"))
    text = 'select 1 from "foo\u20acbar"'.encode("latin9") + b"\0"
    q = memoryview(b"Q" + struct.pack("!I", 4 + len(text)) + text)
    assert _query_text(q, t.codec) == 'select 1 from "foo\u20acbar"'
    p = memoryview(wire.Parse("s", "select '\u20ac'", ()).encode().replace("\u20ac".encode(), "\u20ac".encode("latin9")))
    assert parse_fields(p, t.codec)[1] == "select '\u20ac'"
    feed(t, wire.parameter_status("client_encoding", "UTF8"))
    assert t.codec == "utf-8"


def test_copy_data_after_copy_done_belongs_nowhere():
    t = Tracker()
    t.query([Statement("copy t to stdout", "allow", "a")])
    out = feed(t, wire.CopyOutResponse(0, (0,)).encode() + wire.CopyData(b"1\n").encode() + wire.CopyDone().encode())
    assert out.endswith(wire.CopyDone().encode()) and b"d" not in t.stream
    with pytest.raises(wire.ProtocolError, match="CopyData"):
        feed(t, wire.CopyData(b"2\n").encode())
