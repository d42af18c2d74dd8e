"""PostgreSQL v3 wire framing and message codecs, sans-IO.

Bytes go in through `FrameReader.feed`; frames (type, stream offset, a memoryview of the whole
message) come out, and `parse_frontend` / `parse_backend` turn a frame into a message object.
Every message class can `encode()` itself, so the proxy can synthesize replies (errors, fake
auth, ReadyForQuery) and re-encode rewritten ones (masked DataRows) with correct lengths.

Why frames first and messages second: the relay forwards almost everything verbatim, and only
parses what policy needs (Query, Parse, RowDescription, DataRow, ...). A frame is a view into the
reader's buffer, so forwarding it costs no copy.

Why the reader knows about the startup phase: the first message from a client carries no type
byte, SSLRequest/GSSENCRequest may precede it, and the server's answer to those is a single
unframed byte. Getting this wrong is how framing desyncs and buffer-stuffing attacks
(CVE-2021-23214/23222) happen, so the reader tracks it and refuses data that arrives where TLS
must start.

Strings are decoded as UTF-8 with surrogateescape: re-encoding is lossless whatever the bytes,
and text that is not UTF-8 cannot parse as SQL downstream (so it is refused, not misjudged).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

Sender = Literal["frontend", "backend"]

PROTOCOL_3_0 = 3 << 16  # 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MAX_STARTUP_PACKET = 10_000  # the server's own limit (MAX_STARTUP_PACKET_LENGTH)
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")
_I32x2 = struct.Struct("!ii")

FRONTEND_TYPES = frozenset(b"QPBDECSHXdcfpF")
BACKEND_TYPES = frozenset(b"RSKZTDCENA123nstGHWdcIvV")


class ProtocolError(Exception):
    """The byte stream is not valid PostgreSQL v3: the connection cannot be relayed safely."""


class MessageTooLarge(ProtocolError):
    """A length header announced more than the reader accepts; raised before buffering the body."""

    def __init__(self, msg_type: bytes, length: int, limit: int):
        self.msg_type, self.length, self.limit = msg_type, length, limit
        label = msg_type.decode("latin-1") if msg_type else "startup"
        super().__init__(f"{label!r} message of {length} bytes exceeds the limit of {limit}")


# --------------------------------------------------------------------------------------------
# Frames and the reader


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message as it sits in the reader's buffer.

    type:   b"Q", b"D", ...; b"" for the untyped startup-phase packets and the one-byte answer to
            SSLRequest/GSSENCRequest.
    offset: stream offset of the first byte (bytes fed before it), for recorders and errors.
    data:   the whole message, header included. A view: valid until the next `feed()`;
            `bytes(frame.data)` to keep it longer.
    header: bytes before the payload (5 typed, 4 startup, 0 for the one-byte answer).
    """

    type: bytes
    offset: int
    data: memoryview
    header: int

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def payload(self) -> memoryview:
        return self.data[self.header :]

    @classmethod
    def from_bytes(cls, data: bytes, *, startup: bool = False) -> Frame:
        """A frame for one complete message given as bytes (tests, re-parsing a stored message)."""
        mv = memoryview(data)
        if startup:
            return cls(b"", 0, mv, 4)
        if len(mv) == 1:
            return cls(b"", 0, mv, 0)
        return cls(bytes(mv[:1]), 0, mv, 5)


_STARTUP, _TYPED, _ENC_RESPONSE, _AWAIT_TLS, _DONE = range(5)


class FrameReader:
    """Incremental framer for one direction of one connection.

    `sender` is who wrote the bytes: "frontend" (the agent/client) or "backend" (the server).
    A frontend reader starts in the startup phase unless `startup=False`; a backend reader is
    typed from the start, except right after `expect_encryption_response()`.

        reader.feed(chunk)
        for frame in reader:              # complete frames only; partial data stays buffered
            ...parse_frontend(frame)...   # or reader.messages()

    Feeding `bytes` is zero-copy (bytes cannot change under us); other buffers are copied once,
    so the caller may reuse a recv_into() buffer right after feed().
    """

    def __init__(self, sender: Sender, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 startup: bool | None = None, strict: bool = True):
        if sender not in ("frontend", "backend"):
            raise ValueError(f"sender must be 'frontend' or 'backend', not {sender!r}")
        self.sender: Sender = sender
        self.max_message_size = max_message_size
        self.strict = strict
        self._types = FRONTEND_TYPES if sender == "frontend" else BACKEND_TYPES
        if startup is None:
            startup = sender == "frontend"
        self._state = _STARTUP if startup else _TYPED
        if self._state == _STARTUP and sender != "frontend":
            raise ValueError("only a frontend stream has a startup phase")
        self._buf = bytearray()
        self._pos = 0
        self._ext: memoryview | None = None  # a fed bytes object, parsed in place
        self._ext_pos = 0
        self._consumed = 0  # stream offset of the next unread byte

    # -- state -------------------------------------------------------------------------------

    @property
    def in_startup(self) -> bool:
        """True while the next frontend message is an untyped startup-phase packet."""
        return self._state == _STARTUP

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to be framed."""
        return self._consumed

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as frames (a partial message, or frames not read)."""
        if self._ext is not None:
            return len(self._ext) - self._ext_pos
        return len(self._buf) - self._pos

    def expect_encryption_response(self) -> None:
        """Backend only: the proxy just sent SSLRequest/GSSENCRequest, so the next byte is 'S',
        'G' or 'N' (or an 'E' ErrorResponse from a server that refuses the request)."""
        if self.sender != "backend":
            raise ValueError("the encryption response comes from the backend")
        self._state = _ENC_RESPONSE

    def start_tls(self) -> None:
        """Call when TLS/GSS is about to start on this stream: anything still buffered was sent
        in cleartext before the handshake and would be spliced into the encrypted session."""
        if self.buffered:
            raise ProtocolError(f"{self.buffered} unencrypted bytes arrived before the TLS handshake")
        if self._state == _AWAIT_TLS:
            self._state = _TYPED
        self._buf = bytearray()
        self._pos = 0
        self._ext = None

    # -- input -------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the socket. Never parses; iterate to get frames."""
        mv = data if isinstance(data, memoryview) else memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if not len(mv):
            return
        if self._ext is not None:
            self._spill()
        if self._pos == len(self._buf) and isinstance(mv.obj, bytes):
            self._buf = bytearray()
            self._pos = 0
            self._ext, self._ext_pos = mv, 0
            return
        if self._pos:
            # A frame still held by the caller pins the buffer; then move to a fresh one.
            try:
                del self._buf[: self._pos]
            except BufferError:
                self._buf = self._buf[self._pos :]
            self._pos = 0
        try:
            self._buf += mv
        except BufferError:
            self._buf = self._buf + mv

    def _spill(self) -> None:
        """Move the unread tail of a zero-copy chunk into the owned buffer."""
        assert self._ext is not None
        # The owned buffer was empty when the chunk was taken, so the tail is all that is pending.
        self._buf = bytearray(self._ext[self._ext_pos :])
        self._pos = 0
        self._ext = None
        self._ext_pos = 0

    # -- output ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    def messages(self) -> Iterator[Message]:
        """Frames parsed into message objects (for the sender this reader was made for)."""
        parse = parse_frontend if self.sender == "frontend" else parse_backend
        for frame in self:
            yield parse(frame)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        if self._ext is not None:
            view, pos = self._ext, self._ext_pos
        else:
            if self._pos == len(self._buf):
                return None
            view, pos = memoryview(self._buf), self._pos
        avail = len(view) - pos
        if avail == 0:
            return None
        state = self._state

        if state == _DONE:
            raise ProtocolError("data after CancelRequest")
        if state == _AWAIT_TLS:
            raise ProtocolError("unencrypted data after the server agreed to encrypt")

        if state == _ENC_RESPONSE:
            first = view[pos : pos + 1].tobytes()
            if first in (b"S", b"G"):
                self._state = _AWAIT_TLS
                return self._emit(view, pos, 1, b"", 0)
            if first == b"N":
                self._state = _TYPED
                return self._emit(view, pos, 1, b"", 0)
            if first == b"E":
                self._state = _TYPED
                state = _TYPED
            else:
                raise ProtocolError(f"invalid response to an encryption request: {first!r}")

        if state == _STARTUP:
            if avail < 4:
                return None
            (length,) = _U32.unpack_from(view, pos)
            if length < 8:
                raise ProtocolError(f"startup packet length {length} is too short")
            limit = min(MAX_STARTUP_PACKET, self.max_message_size)
            if length > limit:
                raise MessageTooLarge(b"", length, limit)
            if avail < 8:
                return None
            (code,) = _U32.unpack_from(view, pos + 4)
            if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
                if length != 8:
                    raise ProtocolError("encryption request with a payload")
            elif code == CANCEL_REQUEST_CODE:
                if not 16 <= length <= 12 + 256:
                    raise ProtocolError(f"CancelRequest length {length} is invalid")
            elif code >> 16 != 3:
                raise ProtocolError(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
            if avail < length:
                return None
            if code == CANCEL_REQUEST_CODE:
                self._state = _DONE
            elif code >> 16 == 3:
                self._state = _TYPED
            return self._emit(view, pos, length, b"", 4)

        # typed
        if avail < 5:
            if self.strict and view[pos] not in self._types:
                raise ProtocolError(f"unknown {self.sender} message type {bytes(view[pos:pos + 1])!r}")
            return None
        type_byte, length = _HEADER.unpack_from(view, pos)
        if self.strict and type_byte[0] not in self._types:
            raise ProtocolError(f"unknown {self.sender} message type {type_byte!r}")
        if length < 4:
            raise ProtocolError(f"message {type_byte!r} has invalid length {length}")
        if length + 1 > self.max_message_size:
            raise MessageTooLarge(type_byte, length + 1, self.max_message_size)
        if avail < length + 1:
            return None
        return self._emit(view, pos, length + 1, type_byte, 5)

    def _emit(self, view: memoryview, pos: int, size: int, type_byte: bytes, header: int) -> Frame:
        frame = Frame(type_byte, self._consumed, view[pos : pos + size], header)
        self._consumed += size
        if self._ext is not None:
            self._ext_pos = pos + size
            if self._ext_pos == len(self._ext):
                self._ext = None
                self._ext_pos = 0
        else:
            self._pos = pos + size
        return frame


# --------------------------------------------------------------------------------------------
# Payload decoding helpers


class _Cursor:
    """Reads fields from a payload view; every failure becomes ProtocolError."""

    __slots__ = ("mv", "pos", "end", "what")

    def __init__(self, mv: memoryview, what: str):
        self.mv, self.pos, self.end, self.what = mv, 0, len(mv), what

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise ProtocolError(f"{self.what}: message truncated")

    def byte(self) -> int:
        self._need(1)
        b = self.mv[self.pos]
        self.pos += 1
        return b

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.mv, self.pos)
        self.pos += 2
        return v

    def uint16(self) -> int:
        self._need(2)
        (v,) = _U16.unpack_from(self.mv, self.pos)
        self.pos += 2
        return v

    def count16(self) -> int:
        """An Int16 count: unsigned on the wire (libpq sends up to 65 535 parameters)."""
        return self.uint16()

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def uint32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def take(self, n: int) -> memoryview:
        self._need(n)
        v = self.mv[self.pos : self.pos + n]
        self.pos += n
        return v

    def value(self) -> memoryview | None:
        """An int32-length-prefixed value; -1 is NULL."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise ProtocolError(f"{self.what}: negative value length {n}")
        return self.take(n)

    def cstr(self) -> str:
        # memoryview has no find(): scan in growing chunks, so a short string costs a short copy
        # and a long one stays linear (copying the whole tail per string would be quadratic).
        start = i = self.pos
        step = 64
        while i < self.end:
            j = min(i + step, self.end)
            k = self.mv[i:j].tobytes().find(b"\0")
            if k >= 0:
                nul = i + k
                self.pos = nul + 1
                return self.mv[start:nul].tobytes().decode("utf-8", "surrogateescape")
            i = j
            step *= 2
        raise ProtocolError(f"{self.what}: unterminated string")

    def cstrs(self) -> list[str]:
        """NUL-terminated strings up to an empty one (the list terminator)."""
        out = []
        while True:
            s = self.cstr()
            if not s:
                return out
            out.append(s)

    def rest(self) -> memoryview:
        v = self.mv[self.pos : self.end]
        self.pos = self.end
        return v

    def done(self) -> None:
        if self.pos != self.end:
            raise ProtocolError(f"{self.what}: {self.end - self.pos} trailing bytes")


def _cstr(s: str) -> bytes:
    b = s.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValueError("string contains NUL")
    return b + b"\0"


def _msg(type_byte: bytes, *parts: bytes | bytearray | memoryview) -> bytes:
    body = b"".join(parts)
    return type_byte + _U32.pack(len(body) + 4) + body


def _value(v: bytes | bytearray | memoryview | str | None) -> bytes:
    if v is None:
        return _I32.pack(-1)
    if isinstance(v, str):
        v = v.encode("utf-8", "surrogateescape")
    return _I32.pack(len(v)) + bytes(v)


def _int16s(values: Iterable[int]) -> bytes:
    vals = list(values)
    return _U16.pack(len(vals)) + b"".join(_I16.pack(v) for v in vals)


# --------------------------------------------------------------------------------------------
# Messages. Each class has `type` (b"" for untyped) and encode(); parsing lives in the tables
# at the end. Classes shared by both directions (CopyData, CopyDone) are listed in both.


class Message:
    """Base of all messages; `encode()` returns the complete wire bytes."""

    __slots__ = ()
    type: ClassVar[bytes] = b""

    def encode(self) -> bytes:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


# ---- frontend: startup phase


@dataclass(frozen=True, slots=True)
class StartupMessage(Message):
    params: dict[str, str]
    protocol: int = PROTOCOL_3_0

    @property
    def user(self) -> str | None:
        return self.params.get("user")

    @property
    def database(self) -> str | None:
        return self.params.get("database", self.params.get("user"))

    def encode(self) -> bytes:
        body = _U32.pack(self.protocol) + b"".join(_cstr(k) + _cstr(v) for k, v in self.params.items()) + b"\0"
        return _U32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class SSLRequest(Message):
    def encode(self) -> bytes:
        return _U32.pack(8) + _U32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest(Message):
    def encode(self) -> bytes:
        return _U32.pack(8) + _U32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    """key is 4 bytes in protocol 3.0; protocol 3.2 (PostgreSQL 18) allows up to 256."""

    pid: int
    key: bytes

    def encode(self) -> bytes:
        return _U32.pack(12 + len(self.key)) + _U32.pack(CANCEL_REQUEST_CODE) + _U32.pack(self.pid) + self.key


# ---- frontend: typed


@dataclass(frozen=True, slots=True)
class Query(Message):
    type: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return _msg(b"Q", _cstr(self.sql))


@dataclass(frozen=True, slots=True)
class Parse(Message):
    type: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _msg(b"P", _cstr(self.name), _cstr(self.sql), _U16.pack(len(self.param_types)),
                    b"".join(_U32.pack(t) for t in self.param_types))


@dataclass(frozen=True, slots=True)
class Bind(Message):
    type: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[memoryview | bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _msg(b"B", _cstr(self.portal), _cstr(self.statement), _int16s(self.param_formats),
                    _U16.pack(len(self.params)), b"".join(_value(v) for v in self.params),
                    _int16s(self.result_formats))

    def result_format(self, column: int) -> int:
        """The format of result column `column` under the protocol's 0/1/N rule."""
        rf = self.result_formats
        if not rf:
            return 0
        if len(rf) == 1:
            return rf[0]
        return rf[column] if column < len(rf) else 0


@dataclass(frozen=True, slots=True)
class Describe(Message):
    type: ClassVar[bytes] = b"D"
    kind: str  # "S" statement or "P" portal
    name: str

    def encode(self) -> bytes:
        return _msg(b"D", self.kind.encode("ascii"), _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Execute(Message):
    type: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return _msg(b"E", _cstr(self.portal), _I32.pack(self.max_rows))


@dataclass(frozen=True, slots=True)
class Close(Message):
    type: ClassVar[bytes] = b"C"
    kind: str  # "S" or "P"
    name: str

    def encode(self) -> bytes:
        return _msg(b"C", self.kind.encode("ascii"), _cstr(self.name))


@dataclass(frozen=True, slots=True)
class Sync(Message):
    type: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return _msg(b"S")


@dataclass(frozen=True, slots=True)
class Flush(Message):
    type: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return _msg(b"H")


@dataclass(frozen=True, slots=True)
class Terminate(Message):
    type: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        return _msg(b"X")


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    type: ClassVar[bytes] = b"d"
    data: memoryview | bytes

    def encode(self) -> bytes:
        return _msg(b"d", self.data)


@dataclass(frozen=True, slots=True)
class CopyDone(Message):
    type: ClassVar[bytes] = b"c"

    def encode(self) -> bytes:
        return _msg(b"c")


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    type: ClassVar[bytes] = b"f"
    message: str

    def encode(self) -> bytes:
        return _msg(b"f", _cstr(self.message))


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """Any 'p' message. Its meaning depends on the authentication request it answers
    (cleartext/md5 password, SASLInitialResponse, SASLResponse, GSSResponse), which only the
    connection knows, so the raw payload is kept and interpreted on demand."""

    type: ClassVar[bytes] = b"p"
    data: bytes

    @classmethod
    def from_password(cls, password: str | bytes) -> PasswordMessage:
        pw = password.encode("utf-8") if isinstance(password, str) else password
        if b"\0" in pw:
            raise ValueError("password contains NUL")
        return cls(pw + b"\0")

    def encode(self) -> bytes:
        return _msg(b"p", self.data)

    def as_password(self) -> str:
        c = _Cursor(memoryview(self.data), "PasswordMessage")
        s = c.cstr()
        c.done()
        return s

    def as_sasl_initial_response(self) -> SASLInitialResponse:
        c = _Cursor(memoryview(self.data), "SASLInitialResponse")
        mech = c.cstr()
        data = c.value()
        c.done()
        return SASLInitialResponse(mech, None if data is None else bytes(data))

    def as_sasl_response(self) -> SASLResponse:
        return SASLResponse(self.data)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    type: ClassVar[bytes] = b"p"
    mechanism: str
    data: bytes | None

    def encode(self) -> bytes:
        return _msg(b"p", _cstr(self.mechanism), _value(self.data))


@dataclass(frozen=True, slots=True)
class SASLResponse(Message):
    type: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return _msg(b"p", self.data)


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    """Fast-path function call by OID: it runs a function without any SQL text to judge."""

    type: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[memoryview | bytes | None, ...] = ()
    result_format: int = 0

    def encode(self) -> bytes:
        return _msg(b"F", _U32.pack(self.function_oid), _int16s(self.arg_formats), _U16.pack(len(self.args)),
                    b"".join(_value(v) for v in self.args), _I16.pack(self.result_format))


# ---- backend: authentication


@dataclass(frozen=True, slots=True)
class AuthenticationOk(Message):
    type: ClassVar[bytes] = b"R"

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(0))


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(Message):
    type: ClassVar[bytes] = b"R"

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(3))


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Message):
    type: ClassVar[bytes] = b"R"
    salt: bytes

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(5), self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Message):
    type: ClassVar[bytes] = b"R"
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(10), b"".join(_cstr(m) for m in self.mechanisms), b"\0")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(Message):
    type: ClassVar[bytes] = b"R"
    data: bytes

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(11), self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(Message):
    type: ClassVar[bytes] = b"R"
    data: bytes

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(12), self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationOther(Message):
    """Kerberos (2), GSS (7), GSSContinue (8), SSPI (9) and unknown codes: the proxy does not
    speak them, but must be able to name them in an error."""

    type: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return _msg(b"R", _I32.pack(self.code), self.data)


# ---- backend: everything else


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    type: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return _msg(b"S", _cstr(self.name), _cstr(self.value))


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    type: ClassVar[bytes] = b"K"
    pid: int
    key: bytes  # 4 bytes in 3.0, up to 256 in 3.2

    def encode(self) -> bytes:
        return _msg(b"K", _U32.pack(self.pid), self.key)


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    type: ClassVar[bytes] = b"Z"
    status: str = "I"  # I idle, T in transaction, E failed transaction

    def encode(self) -> bytes:
        return _msg(b"Z", self.status.encode("ascii"))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    type_oid: int = 25  # text
    table_oid: int = 0
    column: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0  # 0 text, 1 binary

    def encode(self) -> bytes:
        return _cstr(self.name) + struct.pack("!IhIhih", self.table_oid, self.column, self.type_oid,
                                              self.type_size, self.type_modifier, self.format)


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    type: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        return _msg(b"T", _U16.pack(len(self.fields)), b"".join(f.encode() for f in self.fields))


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    """Column values as views into the frame (no copy); None is SQL NULL."""

    type: ClassVar[bytes] = b"D"
    values: tuple[memoryview | bytes | None, ...]

    def encode(self) -> bytes:
        return _msg(b"D", _U16.pack(len(self.values)), b"".join(_value(v) for v in self.values))


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    type: ClassVar[bytes] = b"C"
    tag: str

    def encode(self) -> bytes:
        return _msg(b"C", _cstr(self.tag))


@dataclass(frozen=True, slots=True)
class _Fields(Message):
    """ErrorResponse/NoticeResponse body: single-letter field codes → text, in wire order."""

    fields: dict[str, str]

    def encode(self) -> bytes:
        body = b"".join(k.encode("ascii") + _cstr(v) for k, v in self.fields.items()) + b"\0"
        return _msg(self.type, body)

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def code(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    type: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    type: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    type: ClassVar[bytes] = b"A"
    pid: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return _msg(b"A", _U32.pack(self.pid), _cstr(self.channel), _cstr(self.payload))


@dataclass(frozen=True, slots=True)
class ParseComplete(Message):
    type: ClassVar[bytes] = b"1"

    def encode(self) -> bytes:
        return _msg(b"1")


@dataclass(frozen=True, slots=True)
class BindComplete(Message):
    type: ClassVar[bytes] = b"2"

    def encode(self) -> bytes:
        return _msg(b"2")


@dataclass(frozen=True, slots=True)
class CloseComplete(Message):
    type: ClassVar[bytes] = b"3"

    def encode(self) -> bytes:
        return _msg(b"3")


@dataclass(frozen=True, slots=True)
class NoData(Message):
    type: ClassVar[bytes] = b"n"

    def encode(self) -> bytes:
        return _msg(b"n")


@dataclass(frozen=True, slots=True)
class PortalSuspended(Message):
    type: ClassVar[bytes] = b"s"

    def encode(self) -> bytes:
        return _msg(b"s")


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(Message):
    type: ClassVar[bytes] = b"I"

    def encode(self) -> bytes:
        return _msg(b"I")


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    type: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return _msg(b"t", _U16.pack(len(self.type_oids)), b"".join(_U32.pack(t) for t in self.type_oids))


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    format: int  # overall: 0 text, 1 binary
    column_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _msg(self.type, bytes([self.format]), _int16s(self.column_formats))


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    type: ClassVar[bytes] = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    type: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    type: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    type: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return _msg(b"v", _I32.pack(self.newest_minor), _I32.pack(len(self.unrecognized)),
                    b"".join(_cstr(o) for o in self.unrecognized))


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    type: ClassVar[bytes] = b"V"
    value: memoryview | bytes | None

    def encode(self) -> bytes:
        return _msg(b"V", _value(self.value))


@dataclass(frozen=True, slots=True)
class EncryptionResponse(Message):
    """The server's one-byte answer to SSLRequest ('S'/'N') or GSSENCRequest ('G'/'N')."""

    answer: bytes

    @property
    def accepted(self) -> bool:
        return self.answer in (b"S", b"G")

    def encode(self) -> bytes:
        return self.answer


@dataclass(frozen=True, slots=True)
class UnknownMessage(Message):
    """A typed message this module has no class for (only with strict=False readers)."""

    msg_type: bytes
    payload: bytes = field(default=b"")

    def encode(self) -> bytes:
        return _msg(self.msg_type, self.payload)


# --------------------------------------------------------------------------------------------
# Parsing


def _formats(c: _Cursor) -> tuple[int, ...]:
    return tuple(c.int16() for _ in range(c.count16()))


def _p_startup(c: _Cursor) -> Message:
    code = c.uint32()
    if code == SSL_REQUEST_CODE:
        c.done()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        c.done()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid = c.uint32()
        key = bytes(c.rest())
        if not 4 <= len(key) <= 256:
            raise ProtocolError("CancelRequest key length is invalid")
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
    words = c.cstrs()
    c.done()
    if len(words) % 2:
        raise ProtocolError("StartupMessage: parameter without a value")
    params = dict(zip(words[::2], words[1::2], strict=True))
    if "user" not in params:
        raise ProtocolError("StartupMessage: no user")
    return StartupMessage(params, code)


def _p_query(c: _Cursor) -> Message:
    return Query(c.cstr())


def _p_parse(c: _Cursor) -> Message:
    name, sql = c.cstr(), c.cstr()
    return Parse(name, sql, tuple(c.uint32() for _ in range(c.count16())))


def _p_bind(c: _Cursor) -> Message:
    portal, stmt = c.cstr(), c.cstr()
    pf = _formats(c)
    params = tuple(c.value() for _ in range(c.count16()))
    return Bind(portal, stmt, pf, params, _formats(c))


def _kind(c: _Cursor) -> str:
    k = c.byte()
    if k not in b"SP":
        raise ProtocolError(f"{c.what}: kind must be 'S' or 'P', not {k!r}")
    return chr(k)


def _p_describe(c: _Cursor) -> Message:
    return Describe(_kind(c), c.cstr())


def _p_execute(c: _Cursor) -> Message:
    return Execute(c.cstr(), c.int32())


def _p_close(c: _Cursor) -> Message:
    return Close(_kind(c), c.cstr())


def _p_copydata(c: _Cursor) -> Message:
    return CopyData(c.rest())


def _p_copyfail(c: _Cursor) -> Message:
    return CopyFail(c.cstr())


def _p_password(c: _Cursor) -> Message:
    return PasswordMessage(bytes(c.rest()))


def _p_function_call(c: _Cursor) -> Message:
    oid = c.uint32()
    af = _formats(c)
    args = tuple(c.value() for _ in range(c.count16()))
    return FunctionCall(oid, af, args, c.int16())


def _empty(cls: type[Message]):
    def parse(c: _Cursor) -> Message:
        return cls()

    return parse


def _p_auth(c: _Cursor) -> Message:
    code = c.int32()
    if code == 0:
        return AuthenticationOk()
    if code == 3:
        return AuthenticationCleartextPassword()
    if code == 5:
        return AuthenticationMD5Password(bytes(c.take(4)))
    if code == 10:
        mechs = c.cstrs()
        return AuthenticationSASL(tuple(mechs))
    if code == 11:
        return AuthenticationSASLContinue(bytes(c.rest()))
    if code == 12:
        return AuthenticationSASLFinal(bytes(c.rest()))
    return AuthenticationOther(code, bytes(c.rest()))


def _p_parameter_status(c: _Cursor) -> Message:
    return ParameterStatus(c.cstr(), c.cstr())


def _p_backend_key(c: _Cursor) -> Message:
    pid = c.uint32()
    key = bytes(c.rest())
    if not 4 <= len(key) <= 256:
        raise ProtocolError("BackendKeyData key length is invalid")
    return BackendKeyData(pid, key)


def _p_ready(c: _Cursor) -> Message:
    s = c.byte()
    if s not in b"ITE":
        raise ProtocolError(f"ReadyForQuery: invalid status {s!r}")
    return ReadyForQuery(chr(s))


def _p_row_description(c: _Cursor) -> Message:
    fields = []
    for _ in range(c.count16()):
        name = c.cstr()
        fields.append(FieldDescription(name=name, table_oid=c.uint32(), column=c.int16(), type_oid=c.uint32(),
                                       type_size=c.int16(), type_modifier=c.int32(), format=c.int16()))
    return RowDescription(tuple(fields))


def _p_data_row(c: _Cursor) -> Message:
    return DataRow(tuple(c.value() for _ in range(c.count16())))


def _p_command_complete(c: _Cursor) -> Message:
    return CommandComplete(c.cstr())


def _fields(c: _Cursor) -> dict[str, str]:
    out: dict[str, str] = {}
    while True:
        code = c.byte()
        if code == 0:
            return out
        out[chr(code)] = c.cstr()


def _p_error(c: _Cursor) -> Message:
    return ErrorResponse(_fields(c))


def _p_notice(c: _Cursor) -> Message:
    return NoticeResponse(_fields(c))


def _p_notification(c: _Cursor) -> Message:
    return NotificationResponse(c.uint32(), c.cstr(), c.cstr())


def _p_parameter_description(c: _Cursor) -> Message:
    return ParameterDescription(tuple(c.uint32() for _ in range(c.count16())))


def _copy_response(cls: type[_CopyResponse]):
    def parse(c: _Cursor) -> Message:
        fmt = c.byte()
        return cls(fmt, _formats(c))

    return parse


def _p_negotiate(c: _Cursor) -> Message:
    minor = c.int32()
    n = c.int32()
    if n < 0:
        raise ProtocolError("NegotiateProtocolVersion: negative count")
    return NegotiateProtocolVersion(minor, tuple(c.cstr() for _ in range(n)))


def _p_function_call_response(c: _Cursor) -> Message:
    return FunctionCallResponse(c.value())


_FRONTEND_PARSERS = {
    b"Q": _p_query, b"P": _p_parse, b"B": _p_bind, b"D": _p_describe, b"E": _p_execute,
    b"C": _p_close, b"S": _empty(Sync), b"H": _empty(Flush), b"X": _empty(Terminate),
    b"d": _p_copydata, b"c": _empty(CopyDone), b"f": _p_copyfail, b"p": _p_password,
    b"F": _p_function_call,
}

_BACKEND_PARSERS = {
    b"R": _p_auth, b"S": _p_parameter_status, b"K": _p_backend_key, b"Z": _p_ready,
    b"T": _p_row_description, b"D": _p_data_row, b"C": _p_command_complete, b"E": _p_error,
    b"N": _p_notice, b"A": _p_notification, b"1": _empty(ParseComplete), b"2": _empty(BindComplete),
    b"3": _empty(CloseComplete), b"n": _empty(NoData), b"s": _empty(PortalSuspended),
    b"t": _p_parameter_description, b"G": _copy_response(CopyInResponse),
    b"H": _copy_response(CopyOutResponse), b"W": _copy_response(CopyBothResponse),
    b"d": _p_copydata, b"c": _empty(CopyDone), b"I": _empty(EmptyQueryResponse),
    b"v": _p_negotiate, b"V": _p_function_call_response,
}


def _parse(frame: Frame, table: dict, what: str) -> Message:
    if frame.type == b"":
        if frame.header == 0:
            if what != "backend":
                raise ProtocolError("one-byte messages only come from the backend")
            answer = bytes(frame.data)
            if answer not in (b"S", b"G", b"N"):
                raise ProtocolError(f"invalid encryption response {answer!r}")
            return EncryptionResponse(answer)
        if what != "frontend":
            raise ProtocolError("untyped packets only come from the frontend")
        return _finish(_p_startup, frame, "startup packet")
    parser = table.get(frame.type)
    if parser is None:
        return UnknownMessage(frame.type, bytes(frame.payload))
    return _finish(parser, frame, f"{what} {frame.type.decode('latin-1')!r}")


def _finish(parser, frame: Frame, what: str) -> Message:
    c = _Cursor(frame.payload, what)
    try:
        msg = parser(c)
    except ProtocolError:
        raise
    except (struct.error, ValueError, IndexError) as e:  # defensive: the cursor checks bounds
        raise ProtocolError(f"{what}: {e}") from e
    c.done()
    return msg


def parse_frontend(frame: Frame) -> Message:
    """Decode a frame sent by a client. Raises ProtocolError on malformed content."""
    return _parse(frame, _FRONTEND_PARSERS, "frontend")


def parse_backend(frame: Frame) -> Message:
    """Decode a frame sent by a server. Raises ProtocolError on malformed content."""
    return _parse(frame, _BACKEND_PARSERS, "backend")


def read_messages(sender: Sender, data: bytes, *, startup: bool | None = None) -> list[Message]:
    """Parse a complete byte string into messages (tests and one-shot decoding).
    Raises ProtocolError if bytes are left over."""
    reader = FrameReader(sender, startup=startup)
    reader.feed(data)
    out = list(reader.messages())
    if reader.buffered:
        raise ProtocolError(f"{reader.buffered} bytes of an incomplete message")
    return out


# --------------------------------------------------------------------------------------------
# Encoders for what the proxy synthesizes


def error_response(severity: str, code: str, message: str, *, detail: str | None = None,
                   hint: str | None = None, **more: str) -> bytes:
    """ErrorResponse with S and V (non-localized) severity, SQLSTATE `code` and message.
    `more` takes other single-letter field codes (e.g. P="12" position)."""
    return ErrorResponse(_error_fields(severity, code, message, detail, hint, more)).encode()


def notice_response(severity: str, code: str, message: str, *, detail: str | None = None,
                    hint: str | None = None, **more: str) -> bytes:
    return NoticeResponse(_error_fields(severity, code, message, detail, hint, more)).encode()


def _error_fields(severity, code, message, detail, hint, more) -> dict[str, str]:
    if len(code) != 5:
        raise ValueError(f"SQLSTATE must have 5 characters: {code!r}")
    fields = {"S": severity, "V": severity, "C": code, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    for k, v in more.items():
        if len(k) != 1:
            raise ValueError(f"field codes are single letters: {k!r}")
        fields[k] = v
    return fields


def ready_for_query(status: str = "I") -> bytes:
    if status not in ("I", "T", "E"):
        raise ValueError(f"transaction status must be I, T or E: {status!r}")
    return ReadyForQuery(status).encode()


def command_complete(tag: str) -> bytes:
    return CommandComplete(tag).encode()


def data_row(values: Iterable[bytes | bytearray | memoryview | str | None]) -> bytes:
    """DataRow; str values are UTF-8 encoded, None is NULL."""
    vals = list(values)
    return _msg(b"D", _U16.pack(len(vals)), b"".join(_value(v) for v in vals))


def row_description(fields: Iterable[FieldDescription | str | tuple[str, int]]) -> bytes:
    """RowDescription from FieldDescriptions, bare names (text) or (name, type_oid) pairs."""
    out = []
    for f in fields:
        if isinstance(f, str):
            f = FieldDescription(f)
        elif isinstance(f, tuple):
            f = FieldDescription(f[0], f[1])
        out.append(f)
    return RowDescription(tuple(out)).encode()


def authentication_ok() -> bytes:
    return AuthenticationOk().encode()


def parameter_status(name: str, value: str) -> bytes:
    return ParameterStatus(name, value).encode()


def backend_key_data(pid: int, key: bytes | int) -> bytes:
    if isinstance(key, int):
        key = _U32.pack(key & 0xFFFFFFFF)
    return BackendKeyData(pid, key).encode()


def startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    return StartupMessage(dict(params), protocol).encode()


def password_message(password: str | bytes) -> bytes:
    return PasswordMessage.from_password(password).encode()


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    return SASLInitialResponse(mechanism, data).encode()


def sasl_response(data: bytes) -> bytes:
    return SASLResponse(data).encode()


def ssl_request() -> bytes:
    return SSLRequest().encode()


def cancel_request(pid: int, key: bytes) -> bytes:
    return CancelRequest(pid, key).encode()


def query(sql: str) -> bytes:
    return Query(sql).encode()


def terminate() -> bytes:
    return Terminate().encode()


def sync() -> bytes:
    return Sync().encode()
