"""The resolver's strict DNS reader and writer (proxy/dnswire.py), the `dns` policy operation, and
the per-agent name bindings, against queries and answers made by dnspython (a real client)."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rrset
import pytest

from policy.engine import Destination, load
from policy.model import Operation, Verdict
from proxy import dnswire, naming
from proxy.gate import NameBindings


def wire(name: str = "www.lab.test", rdtype: str = "A", edns: int = -1, **kw) -> bytes:
    return dns.message.make_query(name, rdtype, use_edns=edns, **kw).to_wire()


@pytest.mark.parametrize("edns", [-1, 0])
def test_a_real_query_is_read_and_rebuilt_without_the_agents_bytes(edns):
    raw = wire("WWW.Lab.Test", "AAAA", edns=edns)
    q = dnswire.parse_query(raw)
    assert (q.name, q.type_name, q.qclass) == ("www.lab.test", "aaaa", 1)
    assert (q.edns is not None) == (edns == 0)
    up = dnswire.upstream_query(q, 0x4242)
    parsed = dns.message.from_wire(up)
    assert parsed.id == 0x4242 and str(parsed.question[0].name) == "www.lab.test."
    assert parsed.flags & dns.flags.RD and parsed.edns == edns


@pytest.mark.parametrize("mangle, why", [
    (lambda b: b + b"exfil-bytes", "after the last record"),
    (lambda b: b[:-2], "cut short"),
    (lambda b: b[:4] + b"\x00\x02" + b[6:] + b[12:], "2 questions"),
    (lambda b: b[:2] + bytes([b[2] | 0x80]) + b[3:], "a response"),
    (lambda b: b[:3] + bytes([b[3] | 0x40]) + b[4:], "must be zero"),
    (lambda b: b[:6] + b"\x00\x01" + b[8:], "answer or authority"),
    (lambda b: b[:12] + b"\xc0\x0c" + b[-4:], "compression pointer"),
    (lambda b: b[:10] + b"\x00\x01" + b[12:] + b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + b"exfl", "only OPT"),
    (lambda b: b[:10] + b"\x00\x02" + b[12:], "2 additional"),
])
def test_malformed_queries_are_format_errors(mangle, why):
    raw = wire()
    with pytest.raises(dnswire.FormatError) as e:
        dnswire.parse_query(mangle(raw))
    assert why in str(e.value)
    reply = dnswire.error_reply(e.value, e.value.rcode)
    assert reply is not None and reply[3] & 0xF == dnswire.FORMERR and reply[:2] == raw[:2]


def test_other_opcodes_are_not_implemented_and_short_messages_get_no_answer():
    raw = bytearray(wire())
    raw[2] |= 5 << 3  # UPDATE
    with pytest.raises(dnswire.FormatError) as e:
        dnswire.parse_query(bytes(raw))
    assert e.value.rcode == dnswire.NOTIMP
    with pytest.raises(dnswire.FormatError) as e:
        dnswire.parse_query(b"\x12\x34\x01")
    assert dnswire.error_reply(e.value, dnswire.FORMERR) is None


def _raw_query(labels: list[bytes]) -> bytes:
    name = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    return struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 16, 1)


def test_oversized_names_and_labels_are_refused_and_odd_octets_are_escaped():
    with pytest.raises(dnswire.FormatError, match="over 255"):
        dnswire.parse_query(_raw_query([b"a" * 63] * 4 + [b"example"]))
    with pytest.raises(dnswire.FormatError, match="label over 63"):
        dnswire.parse_query(b"\0\7\1\0\0\1\0\0\0\0\0\0" + b"\x50" + b"a" * 80 + b"\0\0\1\0\1")
    q = dnswire.parse_query(_raw_query([b"x.lab", b"te*st\x00", b"attacker", b"example"]))
    assert q.name == "x\\046lab.te\\042st\\000.attacker.example" and q.type_name == "txt"
    # an escaped dot is no label boundary: a glob for the lab does not match it
    pol = load("p.yaml", "rules:\n  - {protocol: dns, object: '*.lab.te*', decision: allow}\n")
    assert pol.decide("bot", Destination("10.0.0.53", 53, (q.name,), "dns"), _op(q)).verdict is Verdict.DENY


def _op(q: dnswire.Query) -> Operation:
    return Operation("dns", q.type_name, (q.name,))


def test_edns_options_are_checked_and_never_forwarded():
    raw = dns.message.make_query("www.lab.test", "A", use_edns=0, options=[dns.edns.GenericOption(65001, b"secret")]).to_wire()
    q = dnswire.parse_query(raw)
    assert b"secret" not in dnswire.upstream_query(q, 1)
    with pytest.raises(dnswire.FormatError, match="runs past"):
        dnswire.parse_query(raw[:-2])  # rdlen now overstates the options: cut short
    assert q.edns is not None and q.edns[0] >= 512


def test_replies_are_matched_rewritten_and_bind_the_cname_chain():
    q = dnswire.parse_query(wire("Www.Lab.Test"))
    up = dns.message.from_wire(dnswire.upstream_query(q, 99))
    r = dns.message.make_response(up)
    r.answer.append(dns.rrset.from_text("www.lab.test.", 300, "IN", "CNAME", "edge.cdn.test."))
    r.answer.append(dns.rrset.from_text("edge.cdn.test.", 60, "IN", "A", "10.9.8.7"))
    data = r.to_wire()
    assert dnswire.check_reply(q, 99, data) and not dnswire.check_reply(q, 98, data)
    other = dns.message.make_response(dns.message.make_query("evil.test", "A", id=99)).to_wire()
    assert not dnswire.check_reply(q, 99, other)
    back = dns.message.from_wire(dnswire.agent_reply(q, data))
    assert back.id == q.qid and str(back.question[0].name) == "Www.Lab.Test."
    assert sorted(dnswire.bound_addresses(q, data)) == [("edge.cdn.test", "10.9.8.7", 60), ("www.lab.test", "10.9.8.7", 60)]


POLICY = """\
default: deny
targets:
  www: {hostname: "www.lab.test", port: [80, 443]}
  db: {address: 10.0.0.5, port: 5432}
rules:
  - name: no-tunnels
    protocol: dns
    object: "*.attacker.example"
    decision: deny
  - name: no-txt
    protocol: dns
    operation: txt
    decision: deny
  - name: www-ok
    target: www
    decision: allow
  - name: db-ok
    target: db
    decision: allow
"""


def test_dns_queries_are_judged_by_name_and_target_hostnames():
    pol = load("p.yaml", POLICY)

    def verdict(name: str, qtype: str = "a") -> tuple[Verdict, str]:
        d = pol.decide("bot", Destination("10.0.0.53", 53, (name,), "dns"), Operation("dns", qtype, (name,)))
        return d.verdict, d.rule

    assert verdict("www.lab.test") == (Verdict.ALLOW, "www-ok")  # the target's name may be resolved
    assert verdict("www.lab.test", "txt") == (Verdict.DENY, "no-txt")
    assert verdict("x" * 60 + ".attacker.example") == (Verdict.DENY, "no-tunnels")
    assert verdict("other.test") == (Verdict.DENY, "default")  # default deny is an allow-list
    assert verdict("db.internal") == (Verdict.DENY, "default")  # an address target names no name


def test_a_destination_with_several_names_gets_the_most_restrictive_answer():
    pol = load("p.yaml", """\
targets:
  good: {hostname: good.test}
  evil: {hostname: evil.test}
rules:
  - {name: good-ok, target: good, decision: allow}
  - {name: evil-no, target: evil, decision: deny}
""")
    op = Operation("tls", "connect", ("10.1.1.1:443",))
    both = pol.decide("bot", Destination("10.1.1.1", 443, ("good.test", "evil.test"), "tls"), op)
    assert both.verdict is Verdict.DENY and both.rule == "evil-no"
    assert pol.decide("bot", Destination("10.1.1.1", 443, ("good.test",), "tls"), op).verdict is Verdict.ALLOW


def test_name_bindings_are_per_agent_per_address_and_expire():
    now = [1000.0]
    b = NameBindings(clock=lambda: now[0])
    b.bind("bot", "WWW.lab.test.", "::ffff:10.1.1.1", 5)
    assert b.bound("bot", "www.lab.test", "10.1.1.1")
    assert not b.bound("other", "www.lab.test", "10.1.1.1")
    assert not b.bound("bot", "www.lab.test", "10.1.1.2")
    now[0] += NameBindings.MIN_TTL + 1
    assert not b.bound("bot", "www.lab.test", "10.1.1.1") and b.names("bot", "10.1.1.1") == ()


def test_certificate_coverage_and_host_spelling():
    cert = {"subjectAltName": (("DNS", "www.lab.test"), ("DNS", "*.api.lab.test"), ("IP Address", "10.0.0.1"))}
    assert naming.certificate_covers(cert, "WWW.lab.test.")
    assert naming.certificate_covers(cert, "eu.api.lab.test")
    assert not naming.certificate_covers(cert, "a.eu.api.lab.test") and not naming.certificate_covers(cert, "api.lab.test")
    assert not naming.certificate_covers(cert, "10.0.0.1")
    assert [naming.host_only(h) for h in ("Www.Lab.Test:8080", "[fd00::1]:443", "fd00::1", "x.test.")] == \
        ["www.lab.test", "fd00::1", "fd00::1", "x.test"]
