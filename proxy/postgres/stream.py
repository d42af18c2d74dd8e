"""Relay-speed framing of one direction of a PostgreSQL connection, sans-IO.

`wire.FrameReader` hands out one Frame object per message; at a few hundred thousand DataRows a
second that bookkeeping is the proxy's whole CPU budget. A relay does not need most messages as
objects: it forwards them. `Splitter` therefore walks length headers and returns runs of
*streamable* messages (types the caller says it will forward verbatim, such as DataRow when no
masking applies) as one raw segment, and stops only at messages the caller must look at.

Streamable messages are also never buffered whole: once a header is seen, the part of the
message in hand is returned at once and the rest passes through as it arrives, so a 500 MB row
or COPY stream costs no memory. Every other message is returned complete, up to `max_size`
(MessageTooLarge before anything of it is buffered beyond the header).

    s = Splitter("backend", stream=b"D")
    s.feed(chunk)
    while (seg := s.next()) is not None:
        kind, view = seg
        if kind == RAW: forward(view)           # whole or partial streamable messages
        else: handle(kind, view)                 # kind is the type byte as an int

Views point into the splitter's buffer and are valid until the next feed(); a caller keeping
one longer copies it (bytes(view)).
"""

from __future__ import annotations

import struct

from proxy.postgres.wire import (
    BACKEND_TYPES,
    CANCEL_REQUEST_CODE,
    DEFAULT_MAX_MESSAGE_SIZE,
    FRONTEND_TYPES,
    MAX_STARTUP_PACKET,
    MessageTooLarge,
    ProtocolError,
    Sender,
)

RAW = -1  # kind of a pass-through segment
UNTYPED = 0  # kind of a startup-phase packet or a one-byte encryption answer
TYPED, STARTUP, BYTE = 0, 1, 2  # modes

_U32 = struct.Struct("!I").unpack_from


class Splitter:
    """Incremental splitter for one direction; see the module docstring.

    mode TYPED: typed messages. STARTUP (frontend): untyped length-prefixed packets, until the
    caller switches to TYPED after a StartupMessage. BYTE (backend): the single-byte answer to
    SSLRequest, then back to TYPED by itself.
    """

    __slots__ = ("sender", "stream", "max_size", "mode", "_buf", "_pos", "_skip", "_types")

    def __init__(self, sender: Sender, *, stream: bytes = b"", max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 mode: int = TYPED):
        self.sender = sender
        self.stream = stream  # type bytes to pass through without stopping
        self.max_size = max_size
        self.mode = mode
        self._types = FRONTEND_TYPES if sender == "frontend" else BACKEND_TYPES
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._skip = 0  # bytes of a streamable message still to pass through

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet returned."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            # Nothing pending: parse the caller's bytes in place (zero copy).
            self._buf = data if isinstance(data, bytes) else bytes(data)
            self._pos = 0
            return
        if isinstance(buf, bytes):
            nb = bytearray(memoryview(buf)[pos:])
        else:
            try:
                del buf[:pos]
                nb = buf
            except BufferError:  # a view the caller still holds pins it: move on to a copy
                nb = bytearray(memoryview(buf)[pos:])
        try:
            nb += data
        except BufferError:
            nb = nb + data
        self._buf, self._pos = nb, 0

    def take_rest(self) -> bytes:
        """Everything buffered and not yet returned (e.g. bytes a TLS layer must decrypt)."""
        rest = bytes(memoryview(self._buf)[self._pos:])
        self._buf, self._pos = b"", 0
        return rest

    def next(self) -> tuple[int, memoryview] | None:
        buf, pos = self._buf, self._pos
        end = len(buf)
        if pos >= end:
            return None
        mode = self.mode
        if mode != TYPED:
            return self._untyped(buf, pos, end)
        start = pos
        if self._skip:
            n = min(self._skip, end - pos)
            self._skip -= n
            pos += n
        stream = self.stream
        if stream and not self._skip:
            while end - pos >= 5:
                t = buf[pos]
                if t not in stream:
                    break
                (ln,) = _U32(buf, pos + 1)
                if ln < 4:
                    raise ProtocolError(f"message {chr(t)!r} has invalid length {ln}")
                nxt = pos + 1 + ln
                if nxt > end:  # streams on: pass the part we have, the rest as it comes
                    self._skip = nxt - end
                    pos = end
                    break
                pos = nxt
        if pos > start:
            self._pos = pos
            return RAW, memoryview(buf)[start:pos]
        if end - pos < 5:
            if buf[pos] not in self._types:
                raise ProtocolError(f"unknown {self.sender} message type {bytes(buf[pos:pos + 1])!r}")
            return None
        t = buf[pos]
        if t not in self._types:
            raise ProtocolError(f"unknown {self.sender} message type {bytes(buf[pos:pos + 1])!r}")
        (ln,) = _U32(buf, pos + 1)
        if ln < 4:
            raise ProtocolError(f"message {chr(t)!r} has invalid length {ln}")
        if ln + 1 > self.max_size:
            raise MessageTooLarge(bytes([t]), ln + 1, self.max_size)
        nxt = pos + 1 + ln
        if nxt > end:
            return None
        self._pos = nxt
        return t, memoryview(buf)[pos:nxt]

    def _untyped(self, buf: bytes | bytearray, pos: int, end: int) -> tuple[int, memoryview] | None:
        if self.mode == BYTE:
            self.mode = TYPED
            self._pos = pos + 1
            return UNTYPED, memoryview(buf)[pos:pos + 1]
        if end - pos < 8:
            if end - pos >= 4:
                self._check_startup_length(_U32(buf, pos)[0])
            return None
        (ln,) = _U32(buf, pos)
        self._check_startup_length(ln)
        (code,) = _U32(buf, pos + 4)
        if code == CANCEL_REQUEST_CODE and ln > 12 + 256:
            raise ProtocolError(f"CancelRequest length {ln} is invalid")
        if end - pos < ln:
            return None
        self._pos = pos + ln
        return UNTYPED, memoryview(buf)[pos:pos + ln]

    def _check_startup_length(self, ln: int) -> None:
        if ln < 8:
            raise ProtocolError(f"startup packet length {ln} is too short")
        if ln > MAX_STARTUP_PACKET:
            raise MessageTooLarge(b"", ln, MAX_STARTUP_PACKET)


# ---- relay-speed field access for the client messages every statement carries ------------------
# wire.parse_frontend builds a message object through a bounds-checked cursor; these read the few
# fields the relay needs straight from the bytes, with the same validation (ProtocolError).

_U16 = struct.Struct("!H").unpack_from
_I32 = struct.Struct("!i").unpack_from


def _cstr(body: bytes, pos: int, what: str, encoding: str = "utf-8") -> tuple[str, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(f"{what}: unterminated string")
    return body[pos:end].decode(encoding, "surrogateescape"), end + 1


# PostgreSQL's client encodings whose text the proxy can read (ASCII-compatible; every byte of a
# multi-byte character >= 0x80), by the name the server reports; others read as UTF-8, where
# non-ASCII text then fails to parse and is refused.
PG_CODECS = {"UTF8": "utf-8", "SQL_ASCII": "latin-1", "LATIN1": "iso8859-1", "LATIN2": "iso8859-2",
             "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
             "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
             "ISO_8859_5": "iso8859-5", "ISO_8859_6": "iso8859-6", "ISO_8859_7": "iso8859-7",
             "ISO_8859_8": "iso8859-8", "WIN866": "cp866", "WIN874": "cp874", "WIN1250": "cp1250",
             "WIN1251": "cp1251", "WIN1252": "cp1252", "WIN1253": "cp1253", "WIN1254": "cp1254",
             "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257", "WIN1258": "cp1258",
             "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUC_JP": "euc-jp", "EUC_KR": "euc-kr",
             "EUC_JIS_2004": "euc-jis-2004", "EUC_CN": "gb2312"}


def python_codec(client_encoding: str) -> str:
    """The Python codec for a client_encoding the server reported ("utf-8" when unknown)."""
    return PG_CODECS.get(client_encoding.upper(), "utf-8")


def _count(body: bytes, pos: int, what: str) -> tuple[int, int]:
    if pos + 2 > len(body):
        raise ProtocolError(f"{what}: message truncated")
    (n,) = _U16(body, pos)  # counts are unsigned: up to 65 535 parameters
    return n, pos + 2


def _int16s(body: bytes, pos: int, what: str) -> tuple[tuple[int, ...], int]:
    n, pos = _count(body, pos, what)
    end = pos + 2 * n
    if end > len(body):
        raise ProtocolError(f"{what}: message truncated")
    return struct.unpack_from(f"!{n}h", body, pos), end


def _done(body: bytes, pos: int, what: str) -> None:
    if pos != len(body):
        raise ProtocolError(f"{what}: {len(body) - pos} trailing bytes")


def parse_fields(msg: memoryview, encoding: str = "utf-8") -> tuple[str, str, tuple[int, ...]]:
    """Parse: (statement name, SQL in the client's encoding, parameter type OIDs)."""
    body = msg[5:].tobytes()
    name, pos = _cstr(body, 0, "Parse")
    sql, pos = _cstr(body, pos, "Parse", encoding)
    n, pos = _count(body, pos, "Parse")
    end = pos + 4 * n
    if end > len(body):
        raise ProtocolError("Parse: message truncated")
    types = struct.unpack_from(f"!{n}I", body, pos)
    _done(body, end, "Parse")
    return name, sql, types


def bind_fields(msg: memoryview) -> tuple[str, str, tuple[int, ...], tuple[bytes | None, ...], tuple[int, ...]]:
    """Bind: (portal, statement, parameter formats, parameter values, result formats)."""
    body = msg[5:].tobytes()
    portal, pos = _cstr(body, 0, "Bind")
    stmt, pos = _cstr(body, pos, "Bind")
    pformats, pos = _int16s(body, pos, "Bind")
    n, pos = _count(body, pos, "Bind")
    values: list[bytes | None] = []
    size = len(body)
    for _ in range(n):
        if pos + 4 > size:
            raise ProtocolError("Bind: message truncated")
        (ln,) = _I32(body, pos)
        pos += 4
        if ln == -1:
            values.append(None)
            continue
        if ln < 0 or pos + ln > size:
            raise ProtocolError("Bind: parameter length invalid")
        values.append(body[pos:pos + ln])
        pos += ln
    rformats, pos = _int16s(body, pos, "Bind")
    _done(body, pos, "Bind")
    return portal, stmt, pformats, tuple(values), rformats


def kind_and_name(msg: memoryview, what: str) -> tuple[str, str]:
    """Describe / Close: ('S' or 'P', name)."""
    body = msg[5:].tobytes()
    if not body or body[0] not in b"SP":
        raise ProtocolError(f"{what}: kind must be 'S' or 'P'")
    name, pos = _cstr(body, 1, what)
    _done(body, pos, what)
    return chr(body[0]), name


def execute_portal(msg: memoryview) -> str:
    """Execute: the portal name (the row limit is the server's business)."""
    body = msg[5:].tobytes()
    name, pos = _cstr(body, 0, "Execute")
    _done(body, pos + 4, "Execute")
    return name
