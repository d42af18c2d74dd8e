"""Tests for classifier/: the recorded corpus of real clients, synthetic edge cases, and fuzzing.

The corpus (tests/data/classifier/*.pcap, made by record.py there) is replayed the way the proxy
sees a connection: client segments are fed as they arrived; when the server spoke before the
client, the client was silent, so timeout() comes first and the greeting goes to feed_server()."""

from __future__ import annotations

import json
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classifier import LABELS, NEED_MORE, Classifier, NeedMore, Verdict, classify_client, classify_server
from classifier.client import CLIENT_DETECTORS
from classifier.server import SERVER_DETECTORS
from classifier.tls import parse_client_hello

DATA = Path(__file__).parent / "data" / "classifier"
MANIFEST = json.loads((DATA / "manifest.json").read_text())


# --- pcap replay -------------------------------------------------------------------------------

@dataclass
class Flow:
    """One TCP connection: payload segments in capture order, tagged "c" (client) or "s" (server)."""

    client: tuple[bytes, int]
    events: list[tuple[str, bytes]] = field(default_factory=list)
    seen: set[tuple[str, int]] = field(default_factory=set)

    def client_bytes(self) -> bytes:
        return b"".join(p for side, p in self.events if side == "c")

    def client_segments(self) -> int:
        return sum(1 for side, _ in self.events if side == "c")


def read_flows(path: Path) -> list[Flow]:
    """TCP flows of a pcap in SYN order, retransmissions dropped."""
    flows: dict[tuple[Any, ...], Flow] = {}
    with path.open("rb") as f:
        for _, buf in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(buf).data
            if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6) or not isinstance(ip.data, dpkt.tcp.TCP):
                continue
            tcp = ip.data
            a, b = (bytes(ip.src), tcp.sport), (bytes(ip.dst), tcp.dport)
            key = tuple(sorted([a, b]))
            if key not in flows:
                if not (tcp.flags & dpkt.tcp.TH_SYN and not tcp.flags & dpkt.tcp.TH_ACK):
                    continue
                flows[key] = Flow(client=a)
            flow = flows[key]
            if not tcp.data:
                continue
            side = "c" if a == flow.client else "s"
            if (side, tcp.seq) in flow.seen:
                continue
            flow.seen.add((side, tcp.seq))
            flow.events.append((side, bytes(tcp.data)))
    return list(flows.values())


def replay(flow: Flow, split: int | None = None) -> Verdict:
    """Drive a Classifier as the proxy would; `split` re-chunks client bytes to that many per feed."""
    c = Classifier()
    spoke = False
    for side, payload in flow.events:
        if side == "c":
            spoke = True
            chunks = [payload] if split is None else [payload[i:i + split] for i in range(0, len(payload), split)]
            for chunk in chunks:
                r = c.feed(chunk)
                if isinstance(r, Verdict):
                    return r
        else:
            if not spoke and not c.waiting_for_server:
                assert c.timeout() is NEED_MORE
            r = c.feed_server(payload)
            if isinstance(r, Verdict):
                return r
    r = c.timeout()
    if not isinstance(r, Verdict):
        r = c.timeout()
    assert isinstance(r, Verdict)
    return r


def check(v: Verdict, label: str, expect: dict[str, Any], flow: Flow) -> list[str]:
    """Differences between a verdict and the manifest's expectation for its flow."""
    problems = [] if v.protocol == label else [f"label {v.protocol!r} != {label!r}"]
    details = dict(v.details)
    details.update(details.pop("params", None) or {})
    for key, want in expect.items():
        if key == "records_min":
            ok = details.get("records", 0) >= want
        elif key == "segments_min":
            ok = flow.client_segments() >= want and "records" in details
        else:
            ok = details.get(key) == want
        if not ok:
            problems.append(f"{key}: {details.get(key)!r} != {want!r}")
    return problems


def corpus() -> list[tuple[str, int, Flow, str, dict[str, Any]]]:
    out = []
    for row in MANIFEST["cases"]:
        flows = read_flows(DATA / row["file"])
        assert len(flows) == row["flows"], row["file"]
        for i, flow in enumerate(flows):
            expect = row["expect"][i] if i < len(row["expect"]) else {}
            out.append((row["file"], i, flow, row["label"], expect))
    return out


CORPUS = corpus()


def test_corpus_is_small_and_covers_every_protocol() -> None:
    size = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert size < 2 * 1024 * 1024
    labels = {row["label"] for row in MANIFEST["cases"]}
    assert {"http", "http2", "tls", "postgres", "redis", "mongodb", "dns", "ssh", "mysql", "smtp", "tcp"} <= labels


def test_corpus_accuracy() -> None:
    """≥ 99% of real recorded flows get the right label and the expected details."""
    failures = []
    for name, i, flow, label, expect in CORPUS:
        problems = check(replay(flow), label, expect, flow)
        if problems:
            failures.append(f"{name}#{i}: {'; '.join(problems)}")
    accuracy = 1 - len(failures) / len(CORPUS)
    print(f"\nclassifier corpus accuracy: {accuracy:.1%} of {len(CORPUS)} flows "
          f"from {len(MANIFEST['cases'])} captures", *failures, sep="\n  ")
    assert accuracy >= 0.99, failures


@pytest.mark.parametrize("split", [1, 7, 100])
def test_corpus_same_verdict_whatever_the_read_sizes(split: int) -> None:
    """A hello arriving a byte at a time must classify exactly like one arriving whole."""
    for name, i, flow, _, _ in CORPUS:
        assert replay(flow, split) == replay(flow), f"{name}#{i}"


def test_corpus_holds_real_multi_record_and_multi_segment_hellos() -> None:
    by_file = {name: flow for name, _, flow, _, _ in CORPUS}
    mtu = by_file["tls_curl_small_mtu.pcap"]
    assert mtu.client_segments() >= 2 and mtu.events[0][0] == "c"
    first_hello = mtu.events[0][1]
    assert classify_client(first_hello) is NEED_MORE  # one segment is not the whole hello
    split = replay(by_file["tls_s_client_split_records.pcap"])
    assert split.details["records"] >= 2 and split.details["sni"] == "split.example.test"


def test_labels_are_the_proxys_vocabulary() -> None:
    """The proxy's early connect decision enumerates protocols: a label outside its list could
    slip past a per-protocol rule, so the two lists must agree."""
    assert {row["label"] for row in MANIFEST["cases"]} <= set(LABELS)
    try:
        from proxy.server import PROTOCOLS
    except ImportError as e:  # proxy/ is another team's module: its imports may change under us
        pytest.skip(f"proxy.server not importable: {e}")
    assert set(LABELS) <= set(PROTOCOLS)


# --- synthetic edge cases ----------------------------------------------------------------------

def _ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!HH", etype, len(body)) + body


def client_hello(sni: str = "example.test", alpn: tuple[str, ...] = ("h2", "http/1.1"), pad: int = 0) -> bytes:
    """A TLS 1.3-style ClientHello handshake message built from RFC 8446 §4.1.2."""
    name = sni.encode()
    sni_ext = _ext(0, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name)
    protos = b"".join(bytes([len(p)]) + p.encode() for p in alpn)
    alpn_ext = _ext(16, struct.pack("!H", len(protos)) + protos)
    versions = _ext(43, bytes([4]) + b"\x03\x04\x03\x03")
    padding = _ext(21, b"\x00" * pad)
    exts = sni_ext + alpn_ext + versions + padding
    body = (b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + b"\x00\x04\x13\x01\x13\x02" + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, size: int) -> bytes:
    """Fragment a handshake message into TLS records of at most `size` bytes (RFC 8446 §5.1)."""
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(handshake[i:i + size])) + handshake[i:i + size]
                    for i in range(0, len(handshake), size))


@pytest.mark.parametrize("size", [60, 200, 512, 16384])
def test_split_client_hello_over_records_and_reads(size: int) -> None:
    wire = records(client_hello("split.example.test", pad=3000), size)
    c = Classifier(max_bytes=1 << 20)
    results = [c.feed(wire[i:i + 97]) for i in range(0, len(wire), 97)]
    assert all(r is NEED_MORE for r in results[:-1])
    v = results[-1]
    assert isinstance(v, Verdict) and v.protocol == "tls" and v.confidence == 1.0
    assert v.details["sni"] == "split.example.test" and v.details["alpn"] == ["h2", "http/1.1"]
    assert v.details["versions"] == ["TLS1.3", "TLS1.2"]
    assert v.details["records"] == -(-len(client_hello("split.example.test", pad=3000)) // size)


def test_absurdly_fragmented_hello_is_tls_without_details() -> None:
    """One-byte records are legal but only an attacker sends thousands: bounded work, still TLS."""
    wire = records(client_hello(pad=3000), 1)
    c = Classifier()
    v = next(r for i in range(len(wire)) if isinstance(r := c.feed(wire[i:i + 1]), Verdict))
    assert v.protocol == "tls" and v.details["fragmented"] and "sni" not in v.details


def test_truncated_hello_still_tls_when_final() -> None:
    wire = records(client_hello(), 16384)
    assert classify_client(wire[:40]) is NEED_MORE
    v = classify_client(wire[:40], final=True)
    assert isinstance(v, Verdict) and v.protocol == "tls" and v.details.get("truncated")


def test_hello_parse_rejects_lies() -> None:
    hello = client_hello()
    body = bytearray(hello[4:])
    body[-1 - 20] ^= 0xFF  # corrupt a length inside the extensions
    assert parse_client_hello(bytes(body)) is None or isinstance(parse_client_hello(bytes(body)), dict)
    assert parse_client_hello(b"\x03\x03" + bytes(36)) is None  # cipher suite list empty


def test_sslv2_compatible_hello() -> None:
    v = classify_client(b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + bytes(37))
    assert isinstance(v, Verdict) and v.protocol == "tls" and v.details["sslv2_compat"]


@pytest.mark.parametrize(("wire", "message"), [
    (struct.pack("!II", 8, 80877103), "ssl_request"),
    (struct.pack("!II", 8, 80877104), "gssenc_request"),
    (struct.pack("!IIII", 16, 80877102, 4242, 0xDEADBEEF), "cancel_request"),
])
def test_postgres_special_requests(wire: bytes, message: str) -> None:
    for cut in range(1, len(wire)):
        assert classify_client(wire[:cut]) is NEED_MORE
    v = classify_client(wire)
    assert isinstance(v, Verdict) and v.protocol == "postgres" and v.confidence == 1.0
    assert v.details["message"] == message
    if message == "cancel_request":
        assert v.details["pid"] == 4242


def test_postgres_startup_params() -> None:
    body = struct.pack("!I", 196608) + b"user\x00agent\x00database\x00prod\x00application_name\x00bot\x00\x00"
    v = classify_client(struct.pack("!I", len(body) + 4) + body)
    assert isinstance(v, Verdict) and v.details["params"] == {"user": "agent", "database": "prod",
                                                              "application_name": "bot"}


def test_http_and_redis_inline_are_told_apart() -> None:
    assert classify_client(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").protocol == "http"  # type: ignore[union-attr]
    assert classify_client(b"GET / HTTP/1.1\r\nHost: a.test\r\n") is NEED_MORE  # waits for the headers
    v = classify_client(b"GET session:42\r\n")
    assert isinstance(v, Verdict) and (v.protocol, v.details["style"]) == ("redis", "inline")
    assert classify_client(b"GET /") is NEED_MORE


def test_mongodb_op_msg() -> None:
    doc = b"\x10hello\x00\x01\x00\x00\x00\x02$db\x00\x06\x00\x00\x00admin\x00\x00"
    doc = struct.pack("<i", len(doc) + 4) + doc
    body = struct.pack("<I", 0) + b"\x00" + doc
    wire = struct.pack("<iiii", 16 + len(body), 7, 0, 2013) + body
    v = classify_client(wire)
    assert isinstance(v, Verdict) and v.protocol == "mongodb"
    assert v.details == {"opcode": "OP_MSG", "command": "hello", "db": "admin"}


def test_mongodb_legacy_op_query() -> None:
    """pymongo now opens with OP_MSG, but older drivers and the shell send OP_QUERY isMaster."""
    doc = b"\x10isMaster\x00\x01\x00\x00\x00\x00"
    doc = struct.pack("<i", len(doc) + 4) + doc
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + doc
    wire = struct.pack("<iiii", 16 + len(body), 1, 0, 2004) + body
    for cut in range(1, len(wire)):
        assert classify_client(wire[:cut]) is NEED_MORE
    v = classify_client(wire)
    assert isinstance(v, Verdict) and v.protocol == "mongodb"
    assert v.details == {"opcode": "OP_QUERY", "collection": "admin.$cmd", "command": "isMaster"}


def test_dns_waits_for_the_whole_query() -> None:
    question = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    msg = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + question
    wire = struct.pack("!H", len(msg)) + msg
    for cut in range(1, len(wire)):
        assert classify_client(wire[:cut]) is NEED_MORE
    v = classify_client(wire)
    assert isinstance(v, Verdict) and (v.protocol, v.details["qname"], v.details["qtype"]) == (
        "dns", "www.example.test.", "A")
    answer = wire[:4] + b"\x81\x80" + wire[6:]  # a response (QR=1) is not what a client sends
    assert classify_client(answer).protocol == "tcp"  # type: ignore[union-attr]


@pytest.mark.parametrize(("greeting", "label"), [
    (b"220 mx.example.test ESMTP Postfix (Debian/GNU)\r\n", "smtp"),
    (b"220-mx.example.test ESMTP Exim 4.96\r\n220 hi\r\n", "smtp"),
    (b"220 (vsFTPd 3.0.3)\r\n", "tcp/ftp"),  # FTP, POP3, IMAP, VNC: "tcp" with details["service"]
    (b"220 service ready\r\n", "smtp"),  # a bare 220 greeting defaults to SMTP, less sure
    (b"220 ProFTPD Server (Debian) [::ffff:127.0.0.1]\r\n", "tcp/ftp"),
    (b"+OK Dovecot ready.\r\n", "tcp/pop3"),
    (b"* OK [CAPABILITY IMAP4rev1 SASL-IR] Dovecot ready.\r\n", "tcp/imap"),
    (b"RFB 003.008\n", "tcp/vnc"),
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", "ssh"),
    (b"a banner line first\r\nSSH-2.0-dropbear_2022.83\r\n", "ssh"),
    (b"\x17\x00\x00\x00\xffj\x04Host '10.0.0.9' is not allowed", "mysql"),
    (b"\x00\x01\x02garbage", "tcp"),
])
def test_server_greetings(greeting: bytes, label: str) -> None:
    c = Classifier()
    assert c.timeout() is NEED_MORE
    v = c.feed_server(greeting)
    if not isinstance(v, Verdict):
        v = c.timeout()
    assert isinstance(v, Verdict) and v.side == "server"
    protocol, _, service = label.partition("/")
    assert v.protocol == protocol and v.details.get("service") == (service or None)


def test_server_first_flow() -> None:
    c = Classifier(client_silence=0.1)
    assert c.wait == 0.1
    assert c.timeout() is NEED_MORE and c.waiting_for_server
    greeting = b"220 mx.example.test ESMTP ready\r\n"
    assert c.feed_server(greeting[:10]) is NEED_MORE
    v = c.feed_server(greeting[10:])
    assert isinstance(v, Verdict) and (v.protocol, v.side) == ("smtp", "server")
    assert c.feed(b"EHLO x\r\n") is v and c.wait is None


def test_both_sides_silent_is_tcp() -> None:
    c = Classifier()
    assert c.timeout() is NEED_MORE
    v = c.timeout()
    assert isinstance(v, Verdict) and v.protocol == "tcp" and v.side == "none"


def test_gives_up_after_max_bytes() -> None:
    c = Classifier(max_bytes=64)
    r = c.feed(b"GET /" + b"a" * 100)  # a request line longer than we are willing to read
    assert isinstance(r, Verdict) and r.protocol == "http" and r.details.get("truncated")
    c = Classifier(max_bytes=64)
    results = [c.feed(b"\x00") for _ in range(64)]
    assert isinstance(results[-1], Verdict)


def test_garbage_is_tcp() -> None:
    v = classify_client(b"\x01\x02\x03\x04 garbage \xff")
    assert isinstance(v, Verdict) and v.protocol == "tcp"
    v = classify_server(b"SSH-2.0-OpenSSH_9.2p1\r\n", final=True)
    assert isinstance(v, Verdict) and v.protocol == "ssh"


# --- fuzzing -----------------------------------------------------------------------------------

SEEDS = [client_hello(), records(client_hello(), 50), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
         b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
         struct.pack("!IIII", 16, 80877102, 1, 2), b"SSH-2.0-x\r\n"] + [flow.client_bytes()[:600]
                                                                        for _, _, flow, _, _ in CORPUS[:40]]


# CLASSIFIER_FUZZ_EXAMPLES=50000 for a longer campaign than CI's.
FUZZ = settings(max_examples=int(os.environ.get("CLASSIFIER_FUZZ_EXAMPLES", "600")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Arbitrary bytes, often a mutated real or synthetic opening, with arbitrary read boundaries."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=3000))
    else:
        data = bytearray(draw(st.sampled_from(SEEDS)))
        for _ in range(draw(st.integers(0, 8))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data[:draw(st.integers(0, len(data)))])
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return data, cuts


@FUZZ
@given(streams(), st.integers(16, 20000))
def test_fuzz_never_raises_and_terminates(stream: tuple[bytes, list[int]], max_bytes: int) -> None:
    data, cuts = stream
    for detect in CLIENT_DETECTORS + SERVER_DETECTORS:  # unguarded: a bug must show here
        for final in (False, True):
            r = detect(data, final)
            assert r is None or isinstance(r, Verdict) or (r is NEED_MORE and not final)
    for fn in (classify_client, classify_server):
        assert isinstance(fn(data, final=True), Verdict)
        assert isinstance(fn(data), Verdict | NeedMore)
    for feed_name in ("feed", "feed_server"):
        c = Classifier(max_bytes=max_bytes)
        if feed_name == "feed_server":
            c.timeout()
        feed = getattr(c, feed_name)
        bounds = [0, *cuts, len(data)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            feed(data[a:b])
        v = feed(b"")  # EOF always ends it
        assert isinstance(v, Verdict) and c.done and c.wait is None and v.protocol in LABELS
        assert feed(b"more") is v


@FUZZ
@given(streams(), st.data())
def test_fuzz_rejection_is_final(stream: tuple[bytes, list[int]], draw: st.DataObject) -> None:
    """A detector that said None to a prefix says None to the whole: the Classifier relies on it."""
    data, _ = stream
    cut = draw.draw(st.integers(0, len(data)))
    for detect in CLIENT_DETECTORS:
        if cut and detect(data[:cut], False) is None:
            assert detect(data, False) is None, detect.__name__


def test_fuzz_random_splits_match_whole() -> None:
    """Cheap deterministic check across many split points of every corpus opening."""
    rng = random.Random(1)
    for _, _, flow, _, _ in CORPUS:
        data = flow.client_bytes()[:4000]
        if not data:
            continue
        whole = Classifier()
        want = whole.feed(data)
        want = want if isinstance(want, Verdict) else whole.timeout()
        c = Classifier()
        got: Any = NEED_MORE
        pos = 0
        while pos < len(data) and not isinstance(got, Verdict):
            step = rng.randint(1, 300)
            got = c.feed(data[pos:pos + step])
            pos += step
        got = got if isinstance(got, Verdict) else c.timeout()
        assert got == want
