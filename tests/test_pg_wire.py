"""PostgreSQL v3 framing and codecs: round trips, the startup phase, limits, malformed input, and
hypothesis fuzzing (the reader raises only ProtocolError and always terminates)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.postgres import wire
from proxy.postgres.wire import (
    Frame,
    FrameReader,
    MessageTooLarge,
    ProtocolError,
    parse_backend,
    parse_frontend,
    read_messages,
)

FRONTEND_SAMPLES = [
    wire.Query("select 1"),
    wire.Query(""),
    wire.Parse("s1", "select $1::int, $2", (23, 0)),
    wire.Parse("", "select 1"),
    wire.Bind("p", "s1", (1, 0), (b"\x00\x00\x00\x01", None, b""), (1,)),
    wire.Bind("", "", (), (), ()),
    wire.Describe("S", "s1"),
    wire.Describe("P", ""),
    wire.Execute("p", 100),
    wire.Close("P", "p"),
    wire.Sync(),
    wire.Flush(),
    wire.Terminate(),
    wire.CopyData(b"1\tfoo\n"),
    wire.CopyDone(),
    wire.CopyFail("client gave up"),
    wire.PasswordMessage(b"secret\x00"),
    wire.FunctionCall(1234, (1,), (b"\x00\x01", None), 1),
]

BACKEND_SAMPLES = [
    wire.AuthenticationOk(),
    wire.AuthenticationCleartextPassword(),
    wire.AuthenticationMD5Password(b"\x01\x02\x03\x04"),
    wire.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    wire.AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096"),
    wire.AuthenticationSASLFinal(b"v=c2ln"),
    wire.AuthenticationOther(7),
    wire.AuthenticationOther(8, b"gss-token"),
    wire.ParameterStatus("client_encoding", "UTF8"),
    wire.BackendKeyData(4242, b"\x00\x00\x10\x01"),
    wire.BackendKeyData(4242, bytes(range(32))),  # protocol 3.2 long key
    wire.ReadyForQuery("I"),
    wire.ReadyForQuery("T"),
    wire.ReadyForQuery("E"),
    wire.RowDescription((wire.FieldDescription("id", 23, 16384, 1, 4, -1, 0),
                         wire.FieldDescription("name", 25, 16384, 2, -1, -1, 1))),
    wire.RowDescription(()),
    wire.DataRow((b"1", None, b"", "é".encode())),
    wire.CommandComplete("SELECT 1"),
    wire.ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42P01", "M": 'relation "x" does not exist', "P": "15"}),
    wire.NoticeResponse({"S": "NOTICE", "C": "00000", "M": "hi"}),
    wire.NotificationResponse(7, "chan", "payload"),
    wire.ParseComplete(),
    wire.BindComplete(),
    wire.CloseComplete(),
    wire.NoData(),
    wire.PortalSuspended(),
    wire.EmptyQueryResponse(),
    wire.ParameterDescription((23, 25)),
    wire.CopyInResponse(0, (0, 0)),
    wire.CopyOutResponse(1, (1,)),
    wire.CopyBothResponse(0, ()),
    wire.CopyData(b"x"),
    wire.CopyDone(),
    wire.NegotiateProtocolVersion(0, ("_pq_.foo",)),
    wire.FunctionCallResponse(None),
    wire.FunctionCallResponse(b"\x00\x00\x00\x07"),
]


@pytest.mark.parametrize("msg", FRONTEND_SAMPLES, ids=lambda m: type(m).__name__)
def test_frontend_round_trip(msg):
    data = msg.encode()
    (frame,) = list(_reader("frontend", data))
    assert frame.type == msg.type
    assert frame.length == len(data)
    assert parse_frontend(frame) == msg
    assert parse_frontend(frame).encode() == data


@pytest.mark.parametrize("msg", BACKEND_SAMPLES, ids=lambda m: type(m).__name__)
def test_backend_round_trip(msg):
    data = msg.encode()
    (parsed,) = read_messages("backend", data)
    assert parsed == msg
    assert parsed.encode() == data


def _reader(sender, data, **kw):
    kw.setdefault("startup", False)
    r = FrameReader(sender, **kw)
    r.feed(data)
    return r


def test_startup_message_round_trip_and_phase_switch():
    data = wire.startup_message({"user": "agent", "database": "app", "application_name": "x"})
    r = FrameReader("frontend")
    assert r.in_startup
    r.feed(data + wire.query("select 1"))
    msgs = list(r.messages())
    assert msgs[0] == wire.StartupMessage({"user": "agent", "database": "app", "application_name": "x"})
    assert msgs[0].user == "agent" and msgs[0].database == "app"
    assert msgs[1] == wire.Query("select 1")
    assert not r.in_startup


def test_database_defaults_to_user():
    assert wire.StartupMessage({"user": "bob"}).database == "bob"


def test_ssl_request_then_startup():
    data = wire.ssl_request() + wire.GSSENCRequest().encode() + wire.startup_message({"user": "u"})
    msgs = read_messages("frontend", data)
    assert [type(m) for m in msgs] == [wire.SSLRequest, wire.GSSENCRequest, wire.StartupMessage]


def test_cancel_request_and_nothing_after():
    msgs = read_messages("frontend", wire.cancel_request(99, b"\x01\x02\x03\x04"))
    assert msgs == [wire.CancelRequest(99, b"\x01\x02\x03\x04")]
    r = FrameReader("frontend")
    r.feed(wire.cancel_request(99, b"abcd") + b"Q")
    assert isinstance(parse_frontend(r.next_frame()), wire.CancelRequest)
    with pytest.raises(ProtocolError, match="after CancelRequest"):
        r.next_frame()


def test_cancel_request_long_key_protocol_3_2():
    key = bytes(range(32))
    assert read_messages("frontend", wire.cancel_request(1, key)) == [wire.CancelRequest(1, key)]


@pytest.mark.parametrize("data,match", [
    (struct.pack("!II", 8, 2 << 16), "unsupported protocol version 2"),
    (struct.pack("!I", 4) + b"\0\0\0\0", "too short"),
    (struct.pack("!III", 12, wire.SSL_REQUEST_CODE, 0), "encryption request with a payload"),
    (struct.pack("!III", 12, wire.CANCEL_REQUEST_CODE, 0), "CancelRequest length"),
])
def test_bad_startup_packets(data, match):
    r = FrameReader("frontend")
    r.feed(data)
    with pytest.raises(ProtocolError, match=match):
        list(r)


def test_startup_without_user_is_refused():
    body = struct.pack("!I", wire.PROTOCOL_3_0) + b"database\0x\0\0"
    with pytest.raises(ProtocolError, match="no user"):
        read_messages("frontend", struct.pack("!I", len(body) + 4) + body)


def test_startup_packet_size_limit():
    r = FrameReader("frontend")
    r.feed(struct.pack("!I", 20_000))
    with pytest.raises(MessageTooLarge) as e:
        r.next_frame()
    assert e.value.length == 20_000 and e.value.msg_type == b""


def test_message_too_large_raised_from_header_alone():
    r = FrameReader("backend", max_message_size=1024)
    r.feed(b"D" + struct.pack("!I", 10_000))  # the body never arrives
    with pytest.raises(MessageTooLarge) as e:
        r.next_frame()
    assert e.value.msg_type == b"D" and e.value.limit == 1024
    assert isinstance(e.value, ProtocolError)


def test_message_at_limit_is_accepted():
    msg = wire.CopyData(b"x" * 100).encode()
    r = _reader("backend", msg, max_message_size=len(msg))
    assert len(list(r)) == 1


@pytest.mark.parametrize("data,match", [
    (b"Y\0\0\0\4", "unknown backend message type"),
    (b"Z\0\0\0\3", "invalid length"),
    (b"Y", "unknown backend message type"),
])
def test_bad_typed_headers(data, match):
    r = _reader("backend", data)
    with pytest.raises(ProtocolError, match=match):
        list(r)


def test_non_strict_reader_passes_unknown_types():
    r = _reader("backend", b"Y\0\0\0\6hi", strict=False)
    (m,) = list(r.messages())
    assert m == wire.UnknownMessage(b"Y", b"hi")
    assert m.encode() == b"Y\0\0\0\6hi"


def test_frontend_type_set_differs_from_backend():
    with pytest.raises(ProtocolError):
        list(_reader("frontend", wire.ready_for_query()))  # 'Z' never comes from a client


@pytest.mark.parametrize("data,match", [
    (b"Z\0\0\0\5X", "invalid status"),
    (b"Z\0\0\0\6II", "trailing"),
    (b"C\0\0\0\7abc", "unterminated"),
    (b"D\0\0\0\6\0\1", "truncated"),
    (b"D\0\0\0\x0a\0\1\xff\xff\xff\xfe", "negative value length"),
    (b"T\0\0\0\6\xff\xff", "unterminated"),  # counts are unsigned: 65 535 fields, none there
    (b"R\0\0\0\x08\0\0\0\5", "truncated"),
    (b"E\0\0\0\6Mx", "unterminated"),
])
def test_malformed_backend_payloads(data, match):
    with pytest.raises(ProtocolError, match=match):
        read_messages("backend", data)


@pytest.mark.parametrize("data,match", [
    (b"D\0\0\0\6Xa\0", "kind must be"),
    (b"B\0\0\0\x0ap\0s\0\0\1", "truncated"),
    (b"E\0\0\0\5\0", "truncated"),
])
def test_malformed_frontend_payloads(data, match):
    with pytest.raises(ProtocolError, match=match):
        read_messages("frontend", data, startup=False)


def test_byte_at_a_time_equals_whole():
    data = b"".join(m.encode() for m in BACKEND_SAMPLES)
    whole = [bytes(f.data) for f in _reader("backend", data)]
    r = FrameReader("backend")
    pieces = []
    for i in range(len(data)):
        r.feed(memoryview(data)[i : i + 1])
        pieces += [bytes(f.data) for f in r]
    assert pieces == whole
    assert b"".join(pieces) == data
    assert r.offset == len(data) and r.buffered == 0


def test_frame_offsets_and_payload():
    a, b = wire.query("select 1"), wire.query("select 22")
    frames = list(_reader("frontend", a + b))
    assert [f.offset for f in frames] == [0, len(a)]
    assert bytes(frames[1].payload) == b"select 22\0"
    assert frames[1].header == 5


def test_bytes_are_framed_without_copy():
    data = wire.query("select 1") + wire.sync()
    r = _reader("frontend", data)
    f = r.next_frame()
    assert f.data.obj is data  # a view into the caller's bytes, not a copy


def test_mutable_buffer_is_copied_so_caller_may_reuse_it():
    buf = bytearray(wire.query("select 1"))
    r = _reader("frontend", buf)
    buf[:] = b"\0" * len(buf)
    assert parse_frontend(r.next_frame()) == wire.Query("select 1")


def test_frame_held_across_feed_stays_intact():
    msg = wire.query("select 1")
    r = FrameReader("frontend", startup=False)
    r.feed(bytearray(msg + msg[:3]))
    held = r.next_frame()
    assert r.next_frame() is None
    r.feed(bytearray(msg[3:]))  # the held view pins the old buffer; the reader moves on
    assert bytes(held.data) == msg
    assert bytes(r.next_frame().data) == msg


def test_zero_copy_tail_then_more_data():
    msg = wire.query("select 1")
    r = FrameReader("frontend", startup=False)
    r.feed(msg + msg[:4])  # bytes: parsed in place, tail spilled on the next feed
    assert bytes(r.next_frame().data) == msg
    assert r.next_frame() is None and r.buffered == 4
    r.feed(msg[4:] + msg)
    assert [bytes(f.data) for f in r] == [msg, msg]


def test_encryption_response_no_then_typed():
    r = FrameReader("backend")
    r.expect_encryption_response()
    r.feed(b"N" + wire.authentication_ok())
    msgs = list(r.messages())
    assert msgs == [wire.EncryptionResponse(b"N"), wire.AuthenticationOk()]
    assert not msgs[0].accepted


def test_encryption_response_yes_refuses_stuffed_bytes():
    r = FrameReader("backend")
    r.expect_encryption_response()
    r.feed(b"S" + wire.authentication_ok())  # CVE-2021-23222: plaintext injected before TLS
    assert parse_backend(r.next_frame()) == wire.EncryptionResponse(b"S")
    with pytest.raises(ProtocolError, match="unencrypted"):
        r.next_frame()
    with pytest.raises(ProtocolError, match="before the TLS handshake"):
        r.start_tls()


def test_encryption_response_yes_then_tls():
    r = FrameReader("backend")
    r.expect_encryption_response()
    r.feed(b"S")
    assert parse_backend(r.next_frame()).accepted
    r.start_tls()
    r.feed(wire.authentication_ok())  # decrypted bytes
    assert list(r.messages()) == [wire.AuthenticationOk()]


def test_frontend_start_tls_refuses_pipelined_plaintext():
    r = FrameReader("frontend")
    r.feed(wire.ssl_request() + wire.startup_message({"user": "u"}))  # CVE-2021-23214
    assert isinstance(parse_frontend(r.next_frame()), wire.SSLRequest)
    with pytest.raises(ProtocolError):
        r.start_tls()


def test_encryption_response_error_from_old_server():
    r = FrameReader("backend")
    r.expect_encryption_response()
    r.feed(wire.error_response("FATAL", "08P01", "unsupported frontend protocol"))
    (m,) = list(r.messages())
    assert isinstance(m, wire.ErrorResponse) and m.code == "08P01"


def test_invalid_encryption_response():
    r = FrameReader("backend")
    r.expect_encryption_response()
    r.feed(b"X")
    with pytest.raises(ProtocolError):
        r.next_frame()


def test_reader_argument_checks():
    with pytest.raises(ValueError):
        FrameReader("middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FrameReader("backend", startup=True)
    with pytest.raises(ValueError):
        FrameReader("frontend").expect_encryption_response()


def test_error_response_encoder():
    data = wire.error_response("ERROR", "42501", "refused by policy", detail="rule: no-drop", hint="ask", P="3")
    (m,) = read_messages("backend", data)
    assert (m.severity, m.code, m.message, m.detail, m.hint) == ("ERROR", "42501", "refused by policy",
                                                                  "rule: no-drop", "ask")
    assert m.fields["S"] == m.fields["V"] == "ERROR" and m.fields["P"] == "3"
    assert data.endswith(b"\0\0")
    with pytest.raises(ValueError):
        wire.error_response("ERROR", "425", "x")
    with pytest.raises(ValueError):
        wire.error_response("ERROR", "42501", "x", PP="y")


def test_notice_response_encoder():
    (m,) = read_messages("backend", wire.notice_response("WARNING", "01000", "masked 3 values"))
    assert isinstance(m, wire.NoticeResponse) and m.severity == "WARNING" and m.detail is None


def test_misc_encoders():
    assert wire.ready_for_query("T") == b"Z\0\0\0\5T"
    with pytest.raises(ValueError):
        wire.ready_for_query("X")
    assert wire.command_complete("DELETE 3") == b"C\0\0\0\x0dDELETE 3\0"
    assert wire.authentication_ok() == b"R\0\0\0\x08\0\0\0\0"
    assert wire.parameter_status("a", "b") == b"S\0\0\0\x08a\0b\0"
    assert wire.backend_key_data(1, 0xDEADBEEF) == b"K\0\0\0\x0c\0\0\0\1\xde\xad\xbe\xef"
    assert wire.terminate() == b"X\0\0\0\4"
    assert wire.ssl_request() == b"\0\0\0\x08\x04\xd2\x16\x2f"


def test_data_row_and_row_description_encoders():
    (d,) = read_messages("backend", wire.data_row(["é", None, b"\x00\x01", memoryview(b"mv")]))
    assert [None if v is None else bytes(v) for v in d.values] == ["é".encode(), None, b"\x00\x01", b"mv"]
    (t,) = read_messages("backend", wire.row_description(["a", ("b", 23), wire.FieldDescription("c", 114)]))
    assert [(f.name, f.type_oid) for f in t.fields] == [("a", 25), ("b", 23), ("c", 114)]


def test_frontend_auth_encoders():
    (p,) = read_messages("frontend", wire.password_message("pw"), startup=False)
    assert p.as_password() == "pw"
    (p,) = read_messages("frontend", wire.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"), startup=False)
    assert p.as_sasl_initial_response() == wire.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=x")
    (p,) = read_messages("frontend", wire.sasl_response(b"c=biws"), startup=False)
    assert p.as_sasl_response() == wire.SASLResponse(b"c=biws")
    (p,) = read_messages("frontend", wire.sasl_initial_response("X", None), startup=False)
    assert p.as_sasl_initial_response().data is None
    with pytest.raises(ValueError):
        wire.password_message("a\0b")
    with pytest.raises(ProtocolError):
        wire.PasswordMessage(b"no-nul").as_password()


def test_strings_round_trip_undecodable_bytes():
    raw = b"Q" + struct.pack("!I", 7) + b"\xff\xfe\0"
    (q,) = read_messages("frontend", raw, startup=False)
    assert q.encode() == raw


def test_cstr_refuses_embedded_nul():
    with pytest.raises(ValueError):
        wire.query("a\0b")


def test_bind_result_format_rule():
    assert wire.Bind("", "", result_formats=()).result_format(3) == 0
    assert wire.Bind("", "", result_formats=(1,)).result_format(3) == 1
    assert wire.Bind("", "", result_formats=(0, 1)).result_format(1) == 1


def test_frame_from_bytes():
    assert parse_backend(Frame.from_bytes(b"N")) == wire.EncryptionResponse(b"N")
    assert parse_frontend(Frame.from_bytes(wire.ssl_request(), startup=True)) == wire.SSLRequest()
    assert parse_backend(Frame.from_bytes(wire.ready_for_query())) == wire.ReadyForQuery("I")


def test_untyped_frames_are_refused_in_the_wrong_direction():
    with pytest.raises(ProtocolError):
        parse_frontend(Frame.from_bytes(b"N"))
    with pytest.raises(ProtocolError):
        parse_backend(Frame.from_bytes(wire.ssl_request(), startup=True))


def test_read_messages_refuses_partial_tail():
    with pytest.raises(ProtocolError, match="incomplete"):
        read_messages("backend", wire.ready_for_query()[:-1])


# --------------------------------------------------------------------------------------------
# Fuzzing


def _drain(reader: FrameReader, parse) -> int:
    n = 0
    for frame in reader:
        parse(frame)
        n += 1
        assert n < 100_000
    return n


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=st.sampled_from(["frontend", "backend"]), startup=st.booleans(),
       chunks=st.lists(st.binary(max_size=64), max_size=20), limit=st.integers(5, 4096))
def test_fuzz_reader_only_raises_protocol_error(sender, startup, chunks, limit):
    if sender == "backend":
        startup = False
    r = FrameReader(sender, startup=startup, max_message_size=limit)
    parse = parse_frontend if sender == "frontend" else parse_backend
    try:
        for c in chunks:
            r.feed(c)
            _drain(r, parse)
    except ProtocolError:
        pass


def _typed_stream(types: bytes):
    """Random payloads under valid headers: exercises the payload parsers rather than framing."""
    return st.lists(st.tuples(st.sampled_from(sorted(types)), st.binary(max_size=40)), max_size=12).map(
        lambda items: b"".join(bytes([t]) + struct.pack("!I", len(p) + 4) + p for t, p in items))


@settings(max_examples=400, deadline=None)
@given(data=_typed_stream(wire.BACKEND_TYPES), cut=st.integers(1, 7))
def test_fuzz_backend_payloads(data, cut):
    r = FrameReader("backend")
    try:
        for i in range(0, len(data), cut):
            r.feed(data[i : i + cut])
            _drain(r, parse_backend)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(data=_typed_stream(wire.FRONTEND_TYPES))
def test_fuzz_frontend_payloads(data):
    r = FrameReader("frontend", startup=False)
    try:
        r.feed(data)
        _drain(r, parse_frontend)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda s: "\0" not in s),
                              st.text(max_size=10).filter(lambda s: "\0" not in s), max_size=5),
       tail=st.binary(max_size=30))
def test_fuzz_startup_then_garbage(params, tail):
    params = {"user": "u", **params}
    r = FrameReader("frontend")
    r.feed(wire.startup_message(params) + tail)
    try:
        msgs = []
        for f in r:
            msgs.append(parse_frontend(f))
        assert msgs[0] == wire.StartupMessage(params)
    except ProtocolError:
        pass


_MSG_STRATEGY = st.one_of(
    st.builds(wire.Query, st.text(max_size=30).filter(lambda s: "\0" not in s)),
    st.builds(wire.DataRow, st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=6).map(tuple)),
    st.builds(wire.CommandComplete, st.sampled_from(["SELECT 1", "INSERT 0 1", "BEGIN"])),
    st.builds(wire.ReadyForQuery, st.sampled_from("ITE")),
    st.builds(wire.CopyData, st.binary(max_size=50)),
)


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(_MSG_STRATEGY, max_size=15), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_property_any_chunking_yields_the_same_frames(msgs, cuts):
    data = b"".join(m.encode() for m in msgs)
    r = FrameReader("frontend", startup=False, strict=False)
    out = []
    prev = 0
    for c in sorted(set(cuts)) + [len(data)]:
        c = min(c, len(data))
        if c < prev:
            continue
        r.feed(bytearray(data[prev:c]) if c % 2 else data[prev:c])
        out += [bytes(f.data) for f in r]
        prev = c
    assert b"".join(out) == data
    assert len(out) == len(msgs)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40), tls=st.booleans())
def test_fuzz_after_encryption_request(data, tls):
    r = FrameReader("backend")
    r.expect_encryption_response()
    try:
        r.feed(data)
        for frame in r:
            msg = parse_backend(frame)
            if tls and isinstance(msg, wire.EncryptionResponse) and msg.accepted:
                r.start_tls()
    except ProtocolError:
        pass
