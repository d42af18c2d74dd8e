"""DNS messages as Interlock's resolver reads and writes them (RFC 1035 §4.1, RFC 6891 for EDNS).

Sans-IO. A query is read strictly, because the query is the part an agent controls: exactly one
question, opcode QUERY, no answer or authority records, at most one additional record and that
an OPT, labels of at most 63 octets, a name of at most 255, and not one byte after the last
record. Anything else is a `FormatError`, answered FORMERR (NOTIMP for another opcode).

The resolver never forwards the agent's bytes: it sends `upstream_query(q)`, a query rebuilt
from the parsed fields under an id of its own, so nothing but the name, type and class can ride
along (no trailing bytes, no EDNS options, no flag bits).

    q = parse_query(data)                     # Query, or raises FormatError
    error_reply(data_or_query, RCODE)         # FORMERR / REFUSED / SERVFAIL for the agent
    upstream_query(q, qid)                    # what goes to the upstream nameserver
    r = check_reply(q, qid, data)             # the upstream's answer, or None if not ours
    agent_reply(q, data)                      # that answer under the agent's id
    bound_addresses(q, data)                  # [(name, address, ttl)] from its A/AAAA records
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
CLASS_IN = 1
MAX_NAME = 255  # octets on the wire, length octets and the root included (RFC 1035 §3.1)
MAX_LABEL = 63
EDNS_PAYLOAD = 1232  # what we advertise upstream (the DNS flag day 2020 value)
TYPES = {1: "a", 2: "ns", 5: "cname", 6: "soa", 12: "ptr", 15: "mx", 16: "txt", 28: "aaaa", 33: "srv",
         35: "naptr", 43: "ds", 48: "dnskey", 52: "tlsa", 64: "svcb", 65: "https", 99: "spf", 255: "any",
         10: "null", 13: "hinfo", 252: "axfr", 251: "ixfr", 257: "caa"}
_HEADER = struct.Struct("!HHHHHH")
# Query flag bits that must be clear: QR, TC, Z and RCODE. AA and RA mean nothing in a query and
# are not passed on; RD and CD are.
_MUST_BE_CLEAR = 0x8000 | 0x0200 | 0x0040 | 0x000F
_RD, _CD = 0x0100, 0x0010


class FormatError(ValueError):
    """A query Interlock will not pass on. rcode: what to answer; qid: None when even the header
    is unreadable (nothing can be answered then)."""

    def __init__(self, reason: str, qid: int | None, rcode: int = FORMERR, opcode: int = 0, rd: bool = False):
        super().__init__(reason)
        self.reason, self.qid, self.rcode, self.opcode, self.rd = reason, qid, rcode, opcode, rd


@dataclass(frozen=True)
class Query:
    qid: int
    flags: int
    labels: tuple[bytes, ...]  # as sent (case kept)
    qtype: int
    qclass: int
    edns: tuple[int, int] | None  # (payload size, DO bit) when the query carried an OPT
    size: int

    @property
    def name(self) -> str:
        """Presentation form for policy and record: lower case, no trailing dot, every octet that
        is not a letter, digit, '-' or '_' escaped as \\DDD (RFC 1035 §5.1), so a dot inside a
        label can never pass for a label boundary in a glob."""
        return ".".join(_present(label) for label in self.labels)

    @property
    def type_name(self) -> str:
        return TYPES.get(self.qtype, str(self.qtype))

    @property
    def question(self) -> bytes:
        return _wire_name(self.labels) + struct.pack("!HH", self.qtype, self.qclass)


def _present(label: bytes) -> str:
    out = []
    for b in label.lower():
        c = chr(b)
        out.append(c if c.isascii() and (c.isalnum() or c in "-_") else f"\\{b:03d}")
    return "".join(out)


def _wire_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\0"


def _read_name(data: bytes, pos: int, qid: int, rd: bool) -> tuple[tuple[bytes, ...], int]:
    """Uncompressed name at pos: a query has nothing earlier to point to."""
    labels: list[bytes] = []
    total = 1
    while True:
        if pos >= len(data):
            raise FormatError("the name runs past the end of the message", qid, rd=rd)
        n = data[pos]
        if n == 0:
            return tuple(labels), pos + 1
        if n > MAX_LABEL:
            kind = "a compression pointer" if n >= 0xC0 else "an extended label type"
            raise FormatError(f"the question's name uses {kind} or a label over {MAX_LABEL} octets", qid, rd=rd)
        total += n + 1
        if total > MAX_NAME:
            raise FormatError(f"the name is over {MAX_NAME} octets", qid, rd=rd)
        if pos + 1 + n > len(data):
            raise FormatError("a label runs past the end of the message", qid, rd=rd)
        labels.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n


def parse_query(data: bytes) -> Query:
    """A query, read strictly (see the module docstring); FormatError says why not."""
    if len(data) < _HEADER.size:
        raise FormatError(f"{len(data)} bytes: shorter than a DNS header", None)
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    opcode, rd = (flags >> 11) & 0xF, bool(flags & _RD)
    if flags & 0x8000:
        raise FormatError("a response, not a query", qid, opcode=opcode, rd=rd)
    if opcode != 0:
        raise FormatError(f"opcode {opcode}: only QUERY is served", qid, NOTIMP, opcode, rd)
    if flags & _MUST_BE_CLEAR:
        raise FormatError(f"header flags {flags:#06x}: TC, Z and RCODE must be zero in a query", qid, rd=rd)
    if qd != 1:
        raise FormatError(f"{qd} questions: exactly one is allowed", qid, rd=rd)
    if an or ns:
        raise FormatError("a query with answer or authority records", qid, rd=rd)
    if ar > 1:
        raise FormatError(f"{ar} additional records: only one OPT is allowed", qid, rd=rd)
    labels, pos = _read_name(data, _HEADER.size, qid, rd)
    if pos + 4 > len(data):
        raise FormatError("the question is cut short", qid, rd=rd)
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    edns = None
    if ar:
        edns, pos = _read_opt(data, pos, qid, rd)
    if pos != len(data):
        raise FormatError(f"{len(data) - pos} bytes after the last record", qid, rd=rd)
    return Query(qid, flags, labels, qtype, qclass, edns, len(data))


def _read_opt(data: bytes, pos: int, qid: int, rd: bool) -> tuple[tuple[int, int], int]:
    """The OPT pseudo-record (RFC 6891 §6.1.2): root owner, type 41, options well formed."""
    if data[pos:pos + 1] != b"\0" or pos + 11 > len(data):
        raise FormatError("the additional record is not an OPT", qid, rd=rd)
    rtype, payload, ttl, rdlen = struct.unpack_from("!HHIH", data, pos + 1)
    if rtype != TYPE_OPT:
        raise FormatError(f"additional record of type {rtype}: only OPT is allowed", qid, rd=rd)
    pos += 11
    end = pos + rdlen
    if end > len(data):
        raise FormatError("the OPT record runs past the end of the message", qid, rd=rd)
    while pos < end:
        if pos + 4 > end:
            raise FormatError("a cut-short EDNS option", qid, rd=rd)
        _, olen = struct.unpack_from("!HH", data, pos)
        pos += 4 + olen
        if pos > end:
            raise FormatError("an EDNS option runs past its record", qid, rd=rd)
    return (payload, (ttl >> 15) & 1), end


def _opt(payload: int, do: int) -> bytes:
    return b"\0" + struct.pack("!HHIH", TYPE_OPT, payload, do << 15, 0)


def error_reply(query: Query | FormatError, rcode: int) -> bytes | None:
    """An answer carrying only rcode (and the question, when it was readable); None when the
    header itself was unreadable and there is nobody to answer."""
    if isinstance(query, FormatError):
        if query.qid is None:
            return None
        flags = 0x8000 | (query.opcode << 11) | (_RD if query.rd else 0) | 0x0080 | rcode
        return _HEADER.pack(query.qid, flags, 0, 0, 0, 0)
    flags = 0x8000 | (query.flags & (_RD | _CD)) | 0x0080 | rcode
    opt = _opt(EDNS_PAYLOAD, 0) if query.edns else b""
    return _HEADER.pack(query.qid, flags, 1, 0, 0, 1 if opt else 0) + query.question + opt


def upstream_query(query: Query, qid: int) -> bytes:
    """The question alone under our own id: RD and CD as asked, an OPT only if the agent sent one."""
    flags = query.flags & (_RD | _CD)
    opt = _opt(min(max(query.edns[0], 512), EDNS_PAYLOAD), query.edns[1]) if query.edns else b""
    labels = tuple(x.lower() for x in query.labels)
    question = _wire_name(labels) + struct.pack("!HH", query.qtype, query.qclass)
    return _HEADER.pack(qid, flags, 1, 0, 0, 1 if opt else 0) + question + opt


def check_reply(query: Query, qid: int, data: bytes) -> bool:
    """Whether data answers the query we sent upstream under qid: a response, same id, same
    question (names compared without case). Anything else is ignored, as a stub would."""
    if len(data) < _HEADER.size:
        return False
    rid, flags, qd, *_ = _HEADER.unpack_from(data)
    if rid != qid or not flags & 0x8000 or (flags >> 11) & 0xF or qd != 1:
        return False
    q = query.question
    got = data[_HEADER.size:_HEADER.size + len(q)]
    return len(got) == len(q) and got.lower() == q.lower()


def agent_reply(query: Query, data: bytes) -> bytes:
    """The upstream's answer under the agent's id, with the question as the agent spelled it."""
    return struct.pack("!H", query.qid) + data[2:_HEADER.size] + query.question + data[_HEADER.size + len(query.question):]


def rcode_of(data: bytes) -> int:
    return data[3] & 0xF if len(data) >= 4 else SERVFAIL


def bound_addresses(query: Query, data: bytes) -> list[tuple[str, str, int]]:
    """(name, address, ttl) for each A/AAAA record answering the query, following CNAMEs from the
    name asked: every name of the chain is bound to the address, with the chain's lowest TTL."""
    try:
        records = _answer_records(data)
    except (IndexError, struct.error, ValueError):
        return []
    chain = {query.name: 2**31}
    out = []
    for _ in range(8):  # CNAME hops, in whatever order the records come
        grew = False
        for owner, rtype, ttl, rdata in records:
            if owner in chain and rtype == TYPE_CNAME and rdata not in chain:
                chain[rdata] = min(chain[owner], ttl)
                grew = True
        if not grew:
            break
    for owner, rtype, ttl, rdata in records:
        if owner in chain and rtype in (TYPE_A, TYPE_AAAA):
            low = min([ttl, *chain.values()])
            out.extend((name, rdata, low) for name in chain)
    return out


def _answer_records(data: bytes) -> list[tuple[str, int, int, str]]:
    _, _, qd, an, _, _ = _HEADER.unpack_from(data)
    pos = _HEADER.size
    for _ in range(qd):
        _, pos = _read_compressed(data, pos)
        pos += 4
    out = []
    for _ in range(an):
        owner, pos = _read_compressed(data, pos)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        rdata = data[pos:pos + rdlen]
        if rclass == CLASS_IN:
            if rtype == TYPE_A and rdlen == 4:
                out.append((owner, rtype, ttl, socket.inet_ntop(socket.AF_INET, rdata)))
            elif rtype == TYPE_AAAA and rdlen == 16:
                out.append((owner, rtype, ttl, socket.inet_ntop(socket.AF_INET6, rdata)))
            elif rtype == TYPE_CNAME:
                out.append((owner, rtype, ttl, _read_compressed(data, pos)[0]))
        pos += rdlen
    return out


def _read_compressed(data: bytes, pos: int) -> tuple[str, int]:
    """A name that may use compression pointers (answers do); its presentation form."""
    labels: list[bytes] = []
    end = None
    for _ in range(128):
        n = data[pos]
        if n == 0:
            return ".".join(_present(x) for x in labels), (end if end is not None else pos + 1)
        if n >= 0xC0:
            if end is None:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            continue
        if n > MAX_LABEL:
            raise ValueError("bad label")
        labels.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n
    raise ValueError("a name that loops")
