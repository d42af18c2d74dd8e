"""Detectors for client-first protocols, one per protocol, each judging a prefix of the stream.

Every detector takes (data, final) and answers a Verdict, NEED_MORE (still possible, show me more)
or None (this is not my protocol). With final=True the stream will not grow, so a detector answers a
best guess or None, never NEED_MORE. A None without final is final for that detector: no longer
stream starting with the same bytes may match, which lets the Classifier stop asking it. Each parse
is bounded by len(data) and never raises on its own input; the Classifier also guards against a bug
turning into an exception in the relay."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .tls import detect_client_hello
from .verdict import NEED_MORE, NeedMore, Verdict

Detector = Callable[[bytes, bool], Verdict | NeedMore | None]


def _text(raw: bytes, limit: int = 256) -> str:
    """Wire strings are attacker-chosen: decode without failing and keep them short."""
    return raw[:limit].decode("utf-8", "backslashreplace")


_CONTROL = bytes([*range(0, 9), 10, 11, 12, *range(14, 32), 127])


def _printable_line(raw: bytes) -> bool:
    """Text protocols send no control bytes other than TAB and CR in a command line."""
    return len(raw.translate(None, _CONTROL)) == len(raw)  # ten times faster than a regex search


# --- HTTP/2 with prior knowledge (RFC 9113 §3.4) -------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def detect_http2(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """The 24-byte connection preface is unique: a full match is certain."""
    if data.startswith(H2_PREFACE):
        return Verdict("http2", 1.0, {"prior_knowledge": True})
    if H2_PREFACE.startswith(data):
        if final:
            return Verdict("http2", 0.6, {"truncated": True}) if len(data) >= 8 else None
        return NEED_MORE
    return None


# --- HTTP/1.x (RFC 9112 §3) ----------------------------------------------------------------------

HTTP_METHODS = frozenset({
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    # WebDAV, CalDAV and cache-control extensions seen from real clients
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"MKCALENDAR", b"SEARCH", b"PURGE", b"LINK", b"UNLINK",
})
_METHOD = re.compile(rb"[A-Z][A-Z_-]{0,31}")  # extension methods are tokens, uppercase by convention
_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_MAX_REQUEST_LINE = 8192
_MAX_HEADERS = 16384
_HEADER_DETAILS = {b"host": "host", b"upgrade": "upgrade", b"user-agent": "user_agent"}


def detect_http1(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """A request line `METHOD SP target SP HTTP/1.x`; waits for the header block to read Host."""
    sp = data.find(b" ", 0, 34)
    if sp <= 0:
        if sp == -1 and len(data) < 33 and not final and _METHOD.fullmatch(data):
            return NEED_MORE
        return None
    method = data[:sp]
    known = method in HTTP_METHODS
    if not _METHOD.fullmatch(method) or method == b"PRI":  # PRI opens the HTTP/2 preface
        return None
    eol = data.find(b"\n", sp, _MAX_REQUEST_LINE)
    if eol == -1:
        rest = data[sp + 1:_MAX_REQUEST_LINE]
        if not _printable_line(rest):
            return None
        if final or len(data) >= _MAX_REQUEST_LINE:
            return Verdict("http", 0.6, {"method": _text(method), "truncated": True}) if known else None
        return NEED_MORE
    line = data[:eol].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1] or not _VERSION.fullmatch(parts[2]) or not _printable_line(line):
        return None
    details: dict[str, Any] = {"method": _text(method), "target": _text(parts[1]), "version": _text(parts[2][5:])}
    end = data.find(b"\r\n\r\n", eol - 1)
    if end == -1:
        end = data.find(b"\n\n", eol)
    complete = end != -1
    if not (complete or final or len(data) >= _MAX_HEADERS):
        return NEED_MORE  # headers are read once, when whole: re-reading them per segment costs O(n²)
    lines = data[eol + 1:max(end, eol + 1) if complete else _MAX_HEADERS].split(b"\n", 100)[:100]
    for raw in lines if complete else lines[:-1]:  # an unfinished last line may be cut anywhere
        name, sep, value = raw.partition(b":")
        field = _HEADER_DETAILS.get(name.strip().lower()) if sep else None
        if field and field not in details:
            details[field] = _text(value.strip())
    if not complete:
        details["truncated"] = True
    return Verdict("http", 0.99 if known else 0.9, details)


# --- Redis: RESP arrays and inline commands (Redis protocol spec) -------------------------------

REDIS_COMMANDS = frozenset(c.encode() for c in """
acl append asking auth bgrewriteaof bgsave bitcount bitfield bitop bitpos blmove blmpop blpop brpop
brpoplpush bzmpop bzpopmax bzpopmin client cluster command config copy dbsize debug decr decrby del
discard dump echo eval eval_ro evalsha evalsha_ro exec exists expire expireat expiretime failover
fcall fcall_ro flushall flushdb function geoadd geodist geohash geopos georadius georadiusbymember
geosearch geosearchstore get getbit getdel getex getrange getset hdel hello hexists hget hgetall
hincrby hincrbyfloat hkeys hlen hmget hmset hrandfield hscan hset hsetnx hstrlen hvals incr incrby
incrbyfloat info keys lastsave latency lcs lindex linsert llen lmove lmpop lolwut lpop lpos lpush
lpushx lrange lrem lset ltrim memory mget migrate module monitor move mset msetnx multi object
persist pexpire pexpireat pexpiretime pfadd pfcount pfdebug pfmerge pfselftest ping psetex psubscribe
psync pttl publish pubsub punsubscribe quit randomkey readonly readwrite rename renamenx replconf
replicaof reset restore role rpop rpoplpush rpush rpushx sadd save scan scard script sdiff sdiffstore
select set setbit setex setnx setrange shutdown sinter sintercard sinterstore sismember slaveof
slowlog smembers smismember smove sort sort_ro spop spublish srandmember srem sscan ssubscribe strlen
subscribe substr sunion sunionstore sunsubscribe swapdb sync time touch ttl type unlink unsubscribe
unwatch wait waitaof watch xack xadd xautoclaim xclaim xdel xgroup xinfo xlen xpending xrange xread
xreadgroup xrevrange xsetid xtrim zadd zcard zcount zdiff zdiffstore zincrby zinter zintercard
zinterstore zlexcount zmpop zmscore zpopmax zpopmin zrandmember zrange zrangebylex zrangebyscore
zrangestore zrank zrem zremrangebylex zremrangebyrank zremrangebyscore zrevrange zrevrangebylex
zrevrangebyscore zrevrank zscan zscore zunion zunionstore
""".split())
_MAX_INLINE = 4096
_MAX_MULTIBULK = 1024 * 1024
_MAX_BULK = 512 * 1024 * 1024


def _resp_int(data: bytes, pos: int, lead: int) -> tuple[int, int] | NeedMore | None:
    """`<lead><digits>\\r\\n` at pos → (value, next pos)."""
    if pos >= len(data):
        return NEED_MORE
    if data[pos] != lead:
        return None
    end = data.find(b"\r\n", pos + 1, pos + 14)
    if end == -1:
        digits = data[pos + 1:]
        if digits.endswith(b"\r"):
            digits = digits[:-1]
        if len(data) - pos >= 14 or (digits and not digits.isdigit()):
            return None
        return NEED_MORE
    digits = data[pos + 1:end]
    if not digits.isdigit():
        return None
    return int(digits), end + 2


def detect_redis(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """RESP `*N\\r\\n$L\\r\\n<command>\\r\\n` from client libraries, or an inline command line."""
    if data[:1] == b"*":
        return _resp(data, final)
    return _inline(data, final)


def _resp(data: bytes, final: bool) -> Verdict | NeedMore | None:
    head = _resp_int(data, 0, ord("*"))
    if head is None:
        return None
    if isinstance(head, NeedMore):
        return None if final else NEED_MORE
    count, pos = head
    if not 1 <= count <= _MAX_MULTIBULK:
        return None
    bulk = _resp_int(data, pos, ord("$"))
    if bulk is None:
        return None
    if isinstance(bulk, NeedMore):
        return (Verdict("redis", 0.6, {"style": "resp", "truncated": True}) if final and len(data) >= 4
                else None if final else NEED_MORE)
    length, pos = bulk
    if not 1 <= length <= _MAX_BULK:
        return None
    if len(data) < pos + length + 2:
        if final:
            return Verdict("redis", 0.7, {"style": "resp", "truncated": True})
        return NEED_MORE
    name = data[pos:pos + length]
    if data[pos + length:pos + length + 2] != b"\r\n":
        return None
    details = {"style": "resp", "command": _text(name, 64).upper(), "args": count - 1}
    return Verdict("redis", 0.99 if name.lower() in REDIS_COMMANDS else 0.9, details)


def _inline(data: bytes, final: bool) -> Verdict | NeedMore | None:
    eol = data.find(b"\n", 0, _MAX_INLINE)
    if eol == 0:
        return None
    line = data[:eol if eol != -1 else _MAX_INLINE]
    word = line.split(None, 1)[0] if line.strip() else b""
    if not word or not _printable_line(line) or line[:1].isspace():
        if not line and not final:
            return NEED_MORE
        return None
    cmd = word.rstrip(b"\r").lower()
    complete_word = eol != -1 or len(word) < len(line)
    if cmd in REDIS_COMMANDS and complete_word:
        if eol != -1:
            return Verdict("redis", 0.85, {"style": "inline", "command": _text(cmd, 64).upper()})
        if final or len(data) >= _MAX_INLINE:
            return Verdict("redis", 0.5, {"style": "inline", "command": _text(cmd, 64).upper(), "truncated": True})
        return NEED_MORE
    if not complete_word and not final and any(c.startswith(cmd) for c in REDIS_COMMANDS):
        return NEED_MORE
    return None


# --- PostgreSQL (frontend/backend protocol, "Message Formats") ----------------------------------

PG_SSL_REQUEST = 80877103
PG_GSSENC_REQUEST = 80877104
PG_CANCEL_REQUEST = 80877102
_PG_MAX_STARTUP = 10000  # the backend refuses longer startup packets


def detect_postgres(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """Startup packet, SSLRequest, GSSENCRequest or CancelRequest: int32 length, int32 code."""
    if data[:1] != b"\x00" or (len(data) >= 2 and data[1] != 0):
        return None
    if len(data) < 8:
        if len(data) >= 4 and not 8 <= int.from_bytes(data[0:4], "big") <= _PG_MAX_STARTUP:
            return None
        return None if final else NEED_MORE
    length = int.from_bytes(data[0:4], "big")
    code = int.from_bytes(data[4:8], "big")
    if code == PG_SSL_REQUEST and length == 8:
        return Verdict("postgres", 1.0, {"message": "ssl_request"})
    if code == PG_GSSENC_REQUEST and length == 8:
        return Verdict("postgres", 1.0, {"message": "gssenc_request"})
    if code == PG_CANCEL_REQUEST and 16 <= length <= 12 + 256:  # protocol 3.2 allows longer keys
        if len(data) < length and not (final and len(data) >= 12):
            return None if final else NEED_MORE
        return Verdict("postgres", 1.0 if length == 16 else 0.95,
                       {"message": "cancel_request", "pid": int.from_bytes(data[8:12], "big")})
    major, minor = code >> 16, code & 0xFFFF
    # Any 3.x: the server answers a minor it does not know with NegotiateProtocolVersion and goes on.
    if major != 3 or not 8 < length <= _PG_MAX_STARTUP:
        return None
    details: dict[str, Any] = {"message": "startup", "pg_version": f"{major}.{minor}"}
    if len(data) < length:
        if final:
            details["truncated"] = True
            return Verdict("postgres", 0.7, details)
        return NEED_MORE
    params = _pg_params(data[8:length])
    if params is None:
        return Verdict("postgres", 0.7, {**details, "malformed": True})
    details["params"] = params
    return Verdict("postgres", 1.0 if "user" in params else 0.9, details)


def _pg_params(body: bytes) -> dict[str, str] | None:
    """NUL-terminated name/value pairs closed by an empty name."""
    if not body.endswith(b"\x00"):
        return None
    pairs = body[:-1]  # every name and value carries its own NUL; the extra one closes the list
    if pairs and not pairs.endswith(b"\x00"):
        return None
    fields = pairs[:-1].split(b"\x00") if pairs else []
    if len(fields) % 2:
        return None
    params: dict[str, str] = {}
    for i in range(0, len(fields), 2):
        if not fields[i] or not _printable_line(fields[i]):
            return None
        params[_text(fields[i], 64)] = _text(fields[i + 1])
    return params


# --- MongoDB wire protocol (standard message header, OP_MSG / OP_QUERY / OP_COMPRESSED) ---------

MONGO_OPCODES = {2013: "OP_MSG", 2004: "OP_QUERY", 2012: "OP_COMPRESSED"}
_MONGO_MAX_MESSAGE = 48_000_000
_MONGO_COMPRESSORS = {0: "noop", 1: "snappy", 2: "zlib", 3: "zstd"}


def detect_mongodb(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """Header: int32 messageLength, requestID, responseTo (0 from a client), opCode, little-endian."""
    n = len(data)
    if n >= 4 and not 16 < int.from_bytes(data[0:4], "little") <= _MONGO_MAX_MESSAGE:
        return None
    if n >= 12 and data[8:12] != b"\x00\x00\x00\x00":
        return None
    if n >= 16 and int.from_bytes(data[12:16], "little") not in MONGO_OPCODES:
        return None
    if n >= 13 and data[12] not in (0xDD, 0xD4, 0xDC):  # low byte of the opcode, known before all 4 arrive
        return None
    if n < 16:
        return None if final else NEED_MORE
    length = int.from_bytes(data[0:4], "little")
    opname = MONGO_OPCODES[int.from_bytes(data[12:16], "little")]
    details: dict[str, Any] = {"opcode": opname}
    body = data[16:length]
    if opname == "OP_COMPRESSED":
        if len(body) < 9:
            return _mongo_wait(details, final)
        if int.from_bytes(body[0:4], "little") not in MONGO_OPCODES or body[8] not in _MONGO_COMPRESSORS:
            return None
        details["compressor"] = _MONGO_COMPRESSORS[body[8]]
        return Verdict("mongodb", 0.95, details)
    if opname == "OP_MSG":
        if len(body) < 5:
            return _mongo_wait(details, final)
        flags = int.from_bytes(body[0:4], "little")
        if flags & 0xFFFC or body[4] not in (0, 1):  # unknown required flag bits, or bad section kind
            return None
        doc_at = 5 if body[4] == 0 else None
    else:
        name_end = body.find(b"\x00", 4, 4 + 256)
        if name_end == -1:
            if len(body) >= 4 + 256:
                return None
            return _mongo_wait(details, final)
        details["collection"] = _text(body[4:name_end])
        doc_at = name_end + 9
    if doc_at is not None:
        first = _bson_first_key(body, doc_at)
        if first is None:
            return None
        if isinstance(first, NeedMore):
            return _mongo_wait(details, final)
        command, db = first
        details["command"] = command
        if db is not None:
            details["db"] = db
    return Verdict("mongodb", 1.0, details)


def _mongo_wait(details: dict[str, Any], final: bool) -> Verdict | NeedMore:
    if final:
        return Verdict("mongodb", 0.7, {**details, "truncated": True})
    return NEED_MORE


# Sizes of fixed-width BSON element values, to step over them while looking for "$db".
_BSON_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
               0x7F: 0, 0xFF: 0}


def _bson_first_key(buf: bytes, at: int) -> tuple[str, str | None] | NeedMore | None:
    """First element name of the BSON document at `at` (the command), plus a top-level $db string."""
    if len(buf) < at + 4:
        return NEED_MORE
    doc_len = int.from_bytes(buf[at:at + 4], "little")
    if doc_len < 5:
        return None
    if len(buf) < at + doc_len:
        return NEED_MORE
    end = at + doc_len - 1
    pos = at + 4
    command: str | None = None
    db: str | None = None
    while pos < end:
        etype = buf[pos]
        name_end = buf.find(b"\x00", pos + 1, end)
        if name_end == -1:
            return None
        name = buf[pos + 1:name_end]
        if command is None:
            if not name or not _printable_line(name):
                return None
            command = _text(name, 64)
        pos = name_end + 1
        if etype in (0x02, 0x0D, 0x0E):  # string, js code, symbol: int32 length then bytes
            slen = int.from_bytes(buf[pos:pos + 4], "little")
            if name == b"$db":
                db = _text(buf[pos + 4:pos + 4 + slen].rstrip(b"\x00"), 64)
            pos += 4 + slen
        elif etype in (0x03, 0x04, 0x0F):  # embedded document, array, code-with-scope
            pos += int.from_bytes(buf[pos:pos + 4], "little")
        elif etype == 0x05:  # binary: int32 length, subtype, bytes
            pos += 5 + int.from_bytes(buf[pos:pos + 4], "little")
        elif etype == 0x0B:  # regex: two cstrings
            for _ in range(2):
                nul = buf.find(b"\x00", pos, end)
                pos = end if nul == -1 else nul + 1
        elif etype == 0x0C:  # DBPointer: string then 12-byte id
            pos += 4 + int.from_bytes(buf[pos:pos + 4], "little") + 12
        elif etype in _BSON_FIXED:
            pos += _BSON_FIXED[etype]
        else:
            break  # unknown type: the command name is known, stop looking for $db
        if db is not None:
            break
    if command is None:
        return None
    return command, db


# --- DNS over TCP (RFC 1035 §4.2.2, RFC 7766) ----------------------------------------------------

DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
             33: "SRV", 35: "NAPTR", 43: "DS", 48: "DNSKEY", 52: "TLSA", 64: "SVCB", 65: "HTTPS",
             99: "SPF", 251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA"}
_DNS_CLASSES = {1, 3, 4, 254, 255}
_DNS_OPCODES = {0: "QUERY", 1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE", 6: "DSO"}


def detect_dns(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """Two-byte length, then a query header (QR=0, one question) and a well-formed question."""
    n = len(data)
    if n >= 2 and int.from_bytes(data[0:2], "big") < 17:  # 12-byte header + root name + type + class
        return None
    if n >= 4 + 2:
        flags = int.from_bytes(data[4:6], "big")
        opcode = (flags >> 11) & 0xF
        # QR, AA, TC, RA and Z must be clear in a query; RCODE is zero.
        if flags & 0x8000 or flags & 0x0680 or flags & 0x0040 or flags & 0x000F or opcode not in _DNS_OPCODES:
            return None
    if n >= 14:
        qd, an, ns, ar = (int.from_bytes(data[i:i + 2], "big") for i in (6, 8, 10, 12))
        opcode = (int.from_bytes(data[4:6], "big") >> 11) & 0xF
        if opcode in (0, 4, 5):
            if qd != 1:
                return None
        elif qd > 1:
            return None
        if (an and opcode not in (4, 5)) or an > 64 or ns > 64 or ar > 64:
            return None
        if opcode == 0 and (ns > 1 or ar > 3):
            return None
    if n < 14:
        return None if final else NEED_MORE
    length = int.from_bytes(data[0:2], "big")
    msg = data[2:2 + length]
    qd = int.from_bytes(data[6:8], "big")
    opcode = (int.from_bytes(data[4:6], "big") >> 11) & 0xF
    details: dict[str, Any] = {"id": int.from_bytes(data[2:4], "big"), "opcode": _DNS_OPCODES[opcode]}
    if qd == 0:
        if len(msg) < length:
            return _dns_wait(details, final)
        return Verdict("dns", 0.8, details)
    question = _dns_question(msg, 12)
    if question is None:
        return None
    if isinstance(question, NeedMore):
        return _dns_wait(details, final)
    qname, qtype, qclass = question
    details.update(qname=qname, qtype=DNS_TYPES.get(qtype, str(qtype)))
    if qclass not in _DNS_CLASSES:
        return None
    if len(msg) < length:  # the question is enough, but deciding only on whole messages keeps splits moot
        return Verdict("dns", 0.95, details) if final else NEED_MORE
    return Verdict("dns", 0.99, details)


def _dns_wait(details: dict[str, Any], final: bool) -> Verdict | NeedMore:
    if final:
        return Verdict("dns", 0.6, {**details, "truncated": True})
    return NEED_MORE


def _dns_question(msg: bytes, pos: int) -> tuple[str, int, int] | NeedMore | None:
    labels: list[str] = []
    total = 0
    while True:
        if pos >= len(msg):
            return NEED_MORE
        size = msg[pos]
        if size == 0:
            pos += 1
            break
        if size > 63:  # a compression pointer cannot point back at anything in the first name
            return None
        total += size + 1
        if total > 255:
            return None
        label = msg[pos + 1:pos + 1 + size]
        if len(label) < size:
            return NEED_MORE
        labels.append(label.decode("ascii", "backslashreplace"))
        pos += 1 + size
    if len(msg) < pos + 4:
        return NEED_MORE
    qtype = int.from_bytes(msg[pos:pos + 2], "big")
    qclass = int.from_bytes(msg[pos + 2:pos + 4], "big")
    return ".".join(labels) + ".", qtype, qclass


# --- SSH identification string (RFC 4253 §4.2) ---------------------------------------------------

_SSH_MAX_LINE = 255


def detect_ssh_client(data: bytes, final: bool) -> Verdict | NeedMore | None:
    """A client must open with `SSH-protoversion-softwareversion [comments]` CR LF."""
    if not data.startswith(b"SSH-"):
        return None if final or not b"SSH-".startswith(data) else NEED_MORE
    return ssh_banner(data[:_SSH_MAX_LINE + 1], final, "client")


def ssh_banner(data: bytes, final: bool, side: str) -> Verdict | NeedMore | None:
    """Judge one identification line that starts with SSH-."""
    eol = data.find(b"\n")
    if eol == -1:
        if final or len(data) > _SSH_MAX_LINE:
            return Verdict("ssh", 0.8, {"banner": _text(data.rstrip(b"\r")), "truncated": True}, side)
        return NEED_MORE
    line = data[:eol].rstrip(b"\r")
    proto, _, rest = line[4:].partition(b"-")
    software = rest.split(b" ", 1)[0]
    details = {"banner": _text(line), "proto_version": _text(proto, 16), "software": _text(software, 64)}
    sure = proto in (b"2.0", b"1.99", b"1.5") and software and _printable_line(line)
    return Verdict("ssh", 1.0 if sure else 0.8, details, side)


CLIENT_DETECTORS: tuple[Detector, ...] = (
    detect_client_hello, detect_http2, detect_http1, detect_postgres, detect_redis,
    detect_mongodb, detect_dns, detect_ssh_client,
)
"""Order breaks ties between equally sure verdicts."""

CLIENT_LABELS: dict[Detector, str] = {
    detect_client_hello: "tls", detect_http2: "http2", detect_http1: "http", detect_postgres: "postgres",
    detect_redis: "redis", detect_mongodb: "mongodb", detect_dns: "dns", detect_ssh_client: "ssh",
}
"""The label each client detector gives: what a prefix it has not ruled out could still become."""
