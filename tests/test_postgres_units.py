"""The PostgreSQL relay's sans-IO pieces on their own: framing, response tracking, startup settings,
the analysis cache, parameter recording and TLS over memory buffers."""

from __future__ import annotations

import ssl
import struct

import pytest

from lab.postgres import through_tracker
from policy.model import Decision, Verdict
from proxy.postgres import startup, wire
from proxy.postgres.analysis import Analyzer, shape
from proxy.postgres.handler import combine, mask_spec, refusal_error
from proxy.postgres.masking import MaskSpec
from proxy.postgres.stream import BYTE, RAW, STARTUP, UNTYPED, Splitter
from proxy.postgres.tlsbio import TlsPipe, client_context, server_end_point_hash
from proxy.postgres.tracker import (
    BINARY_COPY_MASKED,
    BIND,
    DESC_P,
    DESC_S,
    PARSE,
    REFUSAL_PARSE,
    SYNC_K,
    Portal,
    PreparedStatement,
    Statement,
    Tracker,
    UnsafeSetting,
    masked_params,
)
from proxy.tls.ca import CertificateAuthority, LeafMinter

EMAIL_SPEC = MaskSpec.from_names(["email"])


def _segments(s: Splitter) -> list[tuple[int, bytes]]:
    out = []
    while (seg := s.next()) is not None:
        out.append((seg[0], bytes(seg[1])))
    return out


def rows(n: int, value: bytes = b"x") -> bytes:
    return b"".join(wire.data_row([value]) for _ in range(n))


# ---- stream.Splitter -------------------------------------------------------------------------

def test_runs_of_streamable_messages_come_out_as_one_segment():
    data = wire.row_description(["a"]) + rows(100) + wire.command_complete("SELECT 100") + wire.ready_for_query()
    s = Splitter("backend", stream=b"D")
    s.feed(data)
    segs = _segments(s)
    assert [k for k, _ in segs] == [ord("T"), RAW, ord("C"), ord("Z")]
    assert segs[1][1] == rows(100)
    assert b"".join(v for _, v in segs) == data


def test_a_large_streamable_message_passes_through_as_it_arrives():
    big = wire.data_row([b"y" * 1_000_000])
    s = Splitter("backend", stream=b"D")
    seen = b""
    for i in range(0, len(big), 65536):
        s.feed(big[i:i + 65536])
        for kind, view in _segments(s):
            assert kind == RAW
            seen += view
        assert s.buffered == 0, "nothing of a streamed message is held"
    assert seen == big
    s.feed(wire.ready_for_query())
    assert _segments(s) == [(ord("Z"), wire.ready_for_query())]


def test_other_messages_wait_until_complete_and_are_bounded():
    q = wire.query("select 1")
    s = Splitter("frontend", stream=b"d")
    s.feed(q[:3])
    assert s.next() is None
    s.feed(q[3:])
    assert _segments(s) == [(ord("Q"), q)]
    s = Splitter("frontend", max_size=1000)
    s.feed(b"Q" + struct.pack("!I", 5000))
    with pytest.raises(wire.MessageTooLarge):
        s.next()
    for bad in (b"Y\x00\x00\x00\x04", b"Q\x00\x00\x00\x02"):
        s = Splitter("frontend")
        s.feed(bad)
        with pytest.raises(wire.ProtocolError):
            s.next()


def test_views_held_across_feeds_stay_valid():
    s = Splitter("backend")
    a, b = wire.command_complete("A"), wire.command_complete("B")
    s.feed(a + b[:3])
    kind, view = s.next()
    s.feed(b[3:])  # the buffer moves; the view keeps the old bytes
    assert bytes(view) == a and _segments(s) == [(ord("C"), b)]


def test_startup_and_one_byte_modes():
    s = Splitter("frontend", mode=STARTUP)
    s.feed(wire.ssl_request() + wire.startup_message({"user": "u"})[:6])
    assert _segments(s) == [(UNTYPED, wire.ssl_request())]
    s.feed(wire.startup_message({"user": "u"})[6:])
    assert _segments(s) == [(UNTYPED, wire.startup_message({"user": "u"}))]
    s.feed(struct.pack("!II", 20000, 196608))
    with pytest.raises(wire.MessageTooLarge):
        s.next()
    b = Splitter("backend", mode=BYTE)
    b.feed(b"N" + wire.ready_for_query())
    assert _segments(b) == [(UNTYPED, b"N"), (ord("Z"), wire.ready_for_query())]


# ---- tracker.Tracker --------------------------------------------------------------------------

def _people() -> bytes:
    return wire.row_description([("id", 23), ("email", 25)])


_feed = through_tracker


def test_simple_query_rows_are_masked_and_statements_recorded():
    t = Tracker()
    st = [Statement("select * from people", "mask", "m", mask=EMAIL_SPEC), Statement("select 1", "allow", "a")]
    t.query(st)
    out = _feed(t, _people() + wire.data_row(["1", "a@example.com"]) + wire.command_complete("SELECT 1")
                + wire.row_description(["x"]) + wire.data_row(["b@example.com"]) + wire.command_complete("SELECT 1")
                + wire.ready_for_query("T"))
    assert b"a@example.com" not in out and b"[masked:email]" in out
    assert b"b@example.com" in out, "the second statement is not masked"
    assert [s.rows for s in t.finished] == [1, 1] and t.finished[0].masked == {"email": 1}
    assert t.status == "T" and not t.queue


def test_extended_rows_after_a_portal_describe_are_masked():
    # the bug that mattered: Describe(P)'s answer precedes the rows; they must not stream unseen
    t = Tracker()
    ps = PreparedStatement("select", "mask", "m", EMAIL_SPEC)
    portal = Portal(ps, (1,), [])
    t.push(PARSE)
    t.push(BIND)
    e = t.push(DESC_P)
    e.portal = portal
    t.execute(portal, Statement("select", "mask", "m", mask=EMAIL_SPEC))
    t.push(SYNC_K)
    desc = wire.RowDescription((wire.FieldDescription("email", 25, format=1),)).encode()
    out = _feed(t, wire.ParseComplete().encode() + wire.BindComplete().encode() + desc
                + wire.data_row([b"c@example.com"]) * 3 + wire.command_complete("SELECT 3") + wire.ready_for_query())
    assert b"c@example.com" not in out and out.count(b"[masked:email]") == 3
    assert t.finished[0].masked == {"email": 3}


def test_statement_description_with_bind_formats_and_an_injected_describe():
    t = Tracker()
    ps = PreparedStatement("select", "mask", "m", EMAIL_SPEC)
    e = t.push(DESC_S)
    e.prepared = ps
    _feed(t, wire.ParameterDescription(()).encode() + wire.row_description([("email", 25)]))
    assert ps.description is not None
    portal = Portal(ps, (1,), [])
    t.push(BIND)
    t.execute(portal, Statement("select", "mask", "m", mask=EMAIL_SPEC))
    out = _feed(t, wire.BindComplete().encode() + wire.data_row([b"d@example.com"]) + wire.command_complete("SELECT 1"))
    assert b"[masked:email]" in out
    # an injected Describe(P): its answer is used and kept from the client
    p2 = Portal(PreparedStatement("s", "mask", "m", EMAIL_SPEC), (), [])
    e = t.push(DESC_P)
    e.portal, e.injected = p2, True
    t.execute(p2, Statement("s", "mask", "m", mask=EMAIL_SPEC))
    out = _feed(t, wire.row_description([("email", 25)]) + wire.data_row(["e@example.com"]) + wire.command_complete("SELECT 1"))
    assert not out.startswith(b"T") and b"[masked:email]" in out


def test_rows_to_mask_without_a_description_fail_closed():
    t = Tracker()
    p = Portal(PreparedStatement("s", "mask", "m", EMAIL_SPEC), (), [])
    t.execute(p, Statement("s", "mask", "m", mask=EMAIL_SPEC))
    with pytest.raises(wire.ProtocolError):
        _feed(t, wire.data_row(["f@example.com"]))


def test_refusal_error_replaces_the_stand_ins_and_is_dropped_when_the_server_skipped_it():
    t = Tracker()
    ours = refusal_error(Decision(Verdict.DENY, "no-drops", "why"))
    sent = t.refusal(ours, [], simple=True)
    assert sent.startswith(REFUSAL_PARSE) and sent.endswith(wire.sync())
    server_err = wire.error_response("ERROR", "42601", "syntax error")
    out = _feed(t, server_err + wire.ready_for_query("E"))
    assert out == ours + wire.ready_for_query("E") and t.status == "E"
    # an earlier error makes the server skip the stand-in: the client sees only the earlier one
    t = Tracker()
    t.push(BIND)
    t.execute(Portal(PreparedStatement("s", "allow", "a", None), (), []), Statement("s", "allow", "a"))
    t.refusal(ours, [], simple=False)
    t.push(SYNC_K)
    bind_err = wire.error_response("ERROR", "22P02", "bad input")
    out = _feed(t, bind_err + wire.ready_for_query())
    assert out == bind_err + wire.ready_for_query()
    assert t.finished[0].error.startswith("not run") and not t.queue


def test_an_error_at_sync_keeps_the_sync_for_its_ready_for_query():
    t = Tracker()
    t.push(SYNC_K)
    t.query([Statement("select 1", "allow", "a")])
    out = _feed(t, wire.error_response("ERROR", "23505", "deferred constraint") + wire.ready_for_query())
    assert out.endswith(wire.ready_for_query()) and len(t.queue) == 1


def test_unexpected_responses_and_unsafe_settings():
    t = Tracker()
    with pytest.raises(wire.ProtocolError):
        _feed(t, wire.ParseComplete().encode())
    for name, value in (("client_encoding", "SJIS"),):
        t = Tracker()
        with pytest.raises(UnsafeSetting):
            _feed(t, wire.parameter_status(name, value))
        assert t.unsafe == f"{name}={value}"
    # standard_conforming_strings=off is followed (the handler reads each text under it)
    t = Tracker()
    _feed(t, wire.parameter_status("standard_conforming_strings", "off"))
    assert t.params["standard_conforming_strings"] == "off" and t.unsafe is None
    _feed(Tracker(), wire.parameter_status("client_encoding", "LATIN1"))


def test_masked_copy_out_and_binary_copy_refused():
    t = Tracker()
    t.query([Statement("copy people to stdout", "mask", "m", mask=EMAIL_SPEC)])
    out = _feed(t, wire.CopyOutResponse(0, (0,)).encode() + wire.CopyData(b"1\tg@example.com\n").encode()
                + wire.CopyDone().encode() + wire.command_complete("COPY 1") + wire.ready_for_query())
    assert b"g@example.com" not in out and b"[masked:email]" in out and t.finished[0].rows == 1
    # binary COPY cannot be masked: its output is withheld and refused, the session goes on
    t = Tracker()
    t.query([Statement("copy people to stdout (format binary)", "mask", "m", mask=EMAIL_SPEC)])
    out = _feed(t, wire.CopyOutResponse(1, (1,)).encode() + wire.CopyData(b"PGCOPY\n\xff\r\n\0h@example.com").encode()
                + wire.CopyDone().encode() + wire.command_complete("COPY 1") + wire.ready_for_query())
    assert out == BINARY_COPY_MASKED + wire.ready_for_query()
    assert t.finished[0].error.startswith("refused") and not t.queue
    t.query([Statement("select 1", "allow", "a")])  # and the next statement runs as usual
    out = _feed(t, wire.row_description(["x"]) + wire.data_row(["1"]) + wire.command_complete("SELECT 1")
                + wire.ready_for_query())
    assert out.count(b"D") == 1 and t.finished[-1].rows == 1


# ---- startup settings ---------------------------------------------------------------------------

def test_startup_settings_are_judged_like_set_and_unsafe_ones_refused():
    params = {"user": "u", "database": "d", "application_name": "x", "search_path": "s",
              "options": r"-c role=admin --statement-timeout=5 -cwork_mem=1MB -c a\ b=c"}
    assert startup.judged(params) == [("search_path", "s"), ("role", "admin"), ("statement_timeout", "5"),
                                      ("work_mem", "1MB"), ("a b", "c")]
    assert startup.as_sql("role", "it's") == "SET \"role\" TO 'it''s'"
    for bad in ({"replication": "database"}, {"options": "-d 5"}, {"client_encoding": "SJIS"},
                {"options": "-c standard_conforming_strings=off"}, {"client_encoding": "win-932"}):
        with pytest.raises(startup.StartupRefused):
            startup.settings({"user": "u", **bad})
    assert startup.settings({"user": "u", "replication": "false", "client_encoding": "UTF8"}) == [("client_encoding", "UTF8")]


def test_startup_role_setting_is_a_privilege_change():
    ops = Analyzer().analyze(startup.as_sql("role", "admin"))
    assert ops[0].action == "set" and "privilege-change" in ops[0].risks


# ---- analysis cache -----------------------------------------------------------------------------

def test_shapes_only_for_literal_safe_text():
    assert shape("select a from t where id = 7 and n = 'x''y'") == "select a from t where id = ? and n = ?"
    for unsafe in ("select E'a\\'b'", "select $1", "select 1 -- c", "select 1; select 2", "select \"x\" from t",
                   "select U&'x'", "select 'open"):
        assert shape(unsafe) is None, unsafe


def test_cached_answers_never_cross_literal_sensitive_analysis():
    a = Analyzer()
    a.analyze("select abalance from acc where aid = 1")
    hit = a.analyze("select abalance from acc where aid = 2")
    assert hit[0].summary == "select abalance from acc where aid = 2" and hit[0].objects == ("acc",)
    # WHERE 1=1 is "no WHERE"; WHERE 1=2 is not: a DELETE is never answered by shape
    assert "delete-without-where" in a.analyze("delete from t where 1 = 1")[0].risks
    assert "delete-without-where" not in a.analyze("delete from t where 1 = 2")[0].risks
    # functions can run SQL from literals: never by shape
    a.analyze("select query_to_xml('select 1', true, true, '')")
    ops = a.analyze("select query_to_xml('delete from t', true, true, '')")
    assert any(o.action == "delete" for o in ops)
    # session-dependent answers are not cached at all
    a.analyze("prepare p as select 1")
    a.analyze("deallocate p")
    b = Analyzer()
    assert "opaque-code" in b.analyze("execute p")[0].risks


def test_masked_parameters():
    vals = (b"\x00\x07", b"jo@example.com", None, b"\x01\x02\x03", struct.pack("!d", 1.5), b"\x01")
    assert masked_params(vals, (1, 0, 0, 1, 1, 1), (21, 25, 25, 17, 701, 16)) == [
        "7", "[masked:email]", "NULL", "<binary 3 bytes>", "1.5", "true"]
    long = masked_params((b"a" * 5000,), ())[0]
    assert len(long) == 201 and long.endswith("…")


# ---- decisions ----------------------------------------------------------------------------------

def test_combining_decisions_and_mask_specs():
    allow, deny = Decision(Verdict.ALLOW, "a", ""), Decision(Verdict.DENY, "d", "")
    hold, m1 = Decision(Verdict.APPROVE, "h", ""), Decision(Verdict.MASK, "m", "", mask=("email",))
    assert combine([allow, m1, hold]) is hold and combine([hold, deny, allow]) is deny
    assert mask_spec([allow]) is None
    assert [d.name for d in mask_spec([m1]).detectors] == ["email"]
    everything = mask_spec([m1, Decision(Verdict.MASK, "m2", "")])
    assert len(everything.detectors) > 5
    err = wire.read_messages("backend", refusal_error(hold, "expired"))[0]
    assert err.code == "42501" and "not approved (expired) under rule 'h'" in err.message


# ---- TLS over memory ---------------------------------------------------------------------------

def test_tls_pipes_talk_and_channel_binding_hash():
    minter = LeafMinter(CertificateAuthority.create())
    server = TlsPipe.server(minter.server_context("10.1.2.3", alpn=()))
    client = TlsPipe.client(client_context())
    to_server, to_client = client.outgoing(), b""
    for _ in range(6):
        server.receive(to_server)
        to_client = server.outgoing()
        client.receive(to_client)
        to_server = client.outgoing()
    assert client.handshaken and server.handshaken
    assert server.receive(client.encrypt(b"hello")) == b"hello"
    assert client.receive(server.encrypt(b"world")) == b"world"
    der = client.peer_certificate()
    assert len(server_end_point_hash(der)) == 32
    with pytest.raises(ssl.SSLError):
        TlsPipe.server(minter.server_context("10.1.2.3", alpn=())).receive(b"\x16\x03\x01\x00\x05garbage")


def test_fast_field_access_agrees_with_the_codec():
    from proxy.postgres.stream import bind_fields, execute_portal, kind_and_name, parse_fields

    p = wire.Parse("s1", "select $1::int, 'é'", (23, 0)).encode()
    assert parse_fields(memoryview(p)) == ("s1", "select $1::int, 'é'", (23, 0))
    b = wire.Bind("p", "s1", (1, 0), (b"\x00\x00\x00\x07", None, b"x"), (1,)).encode()
    assert bind_fields(memoryview(b)) == ("p", "s1", (1, 0), (b"\x00\x00\x00\x07", None, b"x"), (1,))
    assert kind_and_name(memoryview(wire.Describe("P", "p").encode()), "Describe") == ("P", "p")
    assert kind_and_name(memoryview(wire.Close("S", "").encode()), "Close") == ("S", "")
    assert execute_portal(memoryview(wire.Execute("p", 10).encode())) == "p"
    for bad, fn in ((p[:-2], parse_fields), (b[:-1], bind_fields), (b"E\x00\x00\x00\x07abc", execute_portal),
                    (wire.Parse("a", "b").encode()[:7] + b"\x00\x00\x00\x01\x00\x00", parse_fields)):
        with pytest.raises(wire.ProtocolError):
            fn(memoryview(bad))
    with pytest.raises(wire.ProtocolError):
        kind_and_name(memoryview(b"D\x00\x00\x00\x06X\x00"), "Describe")
