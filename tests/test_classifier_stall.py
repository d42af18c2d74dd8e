"""A client that stalls half-way must not be labelled by its silence (issue 9, hole 4).

The classifier answers "could this prefix still become X?" (`candidates`, `could_become`), and a
Classifier given `hold_for` keeps waiting while the answer is yes for a protocol the proxy reads.
Checked over every real flow of the corpus in tests/data/classifier, one byte at a time with a
timeout between bytes (the slowest sender there is), and over hypothesis-made suffixes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_classifier import CORPUS, client_hello, records

from classifier import NEED_MORE, Classifier, Verdict, candidates, classify_client, could_become

READ = frozenset({"http", "tls", "postgres"})  # what the proxy inspects (policy.inspection.INSPECTED)
INSPECTED_FLOWS = [(f, i, flow, label) for f, i, flow, label, _ in CORPUS
                   if label in READ and flow.client_bytes()]
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def whole(data: bytes) -> Verdict:
    c = Classifier(hold_for=READ)
    v = c.feed(data)
    return v if isinstance(v, Verdict) else c.feed(b"")


def byte_by_byte(data: bytes) -> Verdict | None:
    """Feed one byte, then report silence, for every byte: what a slow sender looks like."""
    c = Classifier(hold_for=READ)
    for i in range(len(data)):
        v = c.feed(data[i:i + 1])
        if isinstance(v, Verdict):
            return v
        t = c.timeout()
        if isinstance(t, Verdict):
            return t
    return None


def test_corpus_has_inspected_flows() -> None:
    assert {label for *_, label in INSPECTED_FLOWS} == READ


@pytest.mark.parametrize(("name", "index", "flow", "label"), INSPECTED_FLOWS,
                         ids=[f"{f}#{i}" for f, i, _, _ in INSPECTED_FLOWS])
def test_slow_sender_gets_the_same_label(name, index, flow, label) -> None:
    data = flow.client_bytes()[:20000]
    want = whole(data)
    assert want.protocol == label
    got = byte_by_byte(data)
    assert got is not None and got.protocol == label, f"{name}: silence labelled a stalled {label} stream {got}"


@PROPS
@given(st.sampled_from(INSPECTED_FLOWS), st.data())
def test_every_prefix_of_an_inspected_flow_could_still_become_it(case, data) -> None:
    _, _, flow, label = case
    stream = flow.client_bytes()[:20000]
    cut = data.draw(st.integers(0, len(stream)))
    prefix = stream[:cut]
    if isinstance(classify_client(prefix), Verdict):
        return  # decided already: nothing left to wait for
    assert could_become(prefix, {label}), (label, prefix[:60])
    c = Classifier(hold_for=READ)
    if prefix:
        assert c.feed(prefix) is NEED_MORE
    assert c.timeout() is NEED_MORE and (c.wait is None or not prefix)


@PROPS
@given(st.binary(min_size=1, max_size=40), st.binary(max_size=200))
def test_can_never_become_is_final(prefix: bytes, suffix: bytes) -> None:
    """When a prefix can never become X, no suffix makes it X: waiting longer is pointless."""
    for label in READ:
        if not could_become(prefix, {label}):
            v = classify_client(prefix + suffix, final=True)
            assert v.protocol != label, (label, prefix, suffix)


@PROPS
@given(st.binary(min_size=1, max_size=64))
def test_silence_only_decides_what_can_never_be_read(prefix: bytes) -> None:
    c = Classifier(hold_for=READ)
    r = c.feed(prefix)
    if isinstance(r, Verdict):
        return
    t = c.timeout()
    if could_become(prefix, READ):
        assert t is NEED_MORE and c.stalled
        assert c.feed_server(b"220 greeting\r\n") is NEED_MORE, "a greeting must not label a stalled client"
    else:
        assert isinstance(t, Verdict) and t.protocol not in READ


STARTUP = struct.pack("!II", 0, 196608) + b"user\x00agent\x00database\x00app\x00\x00"
STARTUP = struct.pack("!I", len(STARTUP)) + STARTUP[4:]


@pytest.mark.parametrize(("wire", "label"), [
    (STARTUP, "postgres"),
    (struct.pack("!II", 8, 80877103), "postgres"),  # SSLRequest
    (b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", "http"),
    (records(client_hello("slow.example.test"), 16384), "tls"),
    (records(client_hello("split.example.test", pad=2000), 300), "tls"),  # split over records too
])
def test_synthetic_slow_senders(wire: bytes, label: str) -> None:
    got = byte_by_byte(wire)
    assert got is not None and got.protocol == label


def test_postgres_any_minor_version_is_postgres() -> None:
    """The server negotiates down an unknown 3.x minor (NegotiateProtocolVersion): still PostgreSQL."""
    body = b"user\x00agent\x00\x00"
    for minor in (0, 2, 0x1234, 0xFFFF):
        wire = struct.pack("!II", 8 + len(body), (3 << 16) | minor) + body
        v = classify_client(wire)
        assert isinstance(v, Verdict) and v.protocol == "postgres", minor


def test_silent_on_both_sides_waits_for_bytes() -> None:
    c = Classifier(hold_for=READ)
    assert c.timeout() is NEED_MORE and c.waiting_for_server
    assert c.timeout() is NEED_MORE and c.wait is None, "both silent: nothing but bytes can decide"
    v = c.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(v, Verdict) and v.protocol == "http"


def test_unreadable_prefix_is_decided_on_silence() -> None:
    c = Classifier(hold_for=READ)
    assert c.feed(b"*1\r\n$4\r\nPI") is NEED_MORE  # RESP: could become redis, never a protocol we read
    assert not could_become(b"*1\r\n$4\r\nPI", READ)
    v = c.timeout()
    assert isinstance(v, Verdict) and v.protocol == "redis"
    v = Classifier(hold_for=READ).feed(b"\x01\x02garbage")
    assert isinstance(v, Verdict) and v.protocol == "tcp"


def test_candidates_of_nothing_is_everything() -> None:
    assert READ | {"mysql", "smtp", "ssh"} <= candidates(b"")
    assert candidates(b"G") >= {"http"} and "postgres" not in candidates(b"G")
    assert candidates(b"\x00") >= {"postgres"} and "http" not in candidates(b"\x00")
    assert candidates(b"\x16") >= {"tls"}
