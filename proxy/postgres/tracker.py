"""Which server response belongs to which client request, sans-IO: the relay's memory of the pipeline.

PostgreSQL answers requests strictly in order, so every message the relay forwards (or makes
up) pushes an expectation, and every server message is matched against the oldest one. That is
what lets the relay
- mask the right columns: a DataRow belongs to the oldest unfinished Query or Execute, whose
  RowDescription came from that query, a Describe of its portal, or a Describe of its statement
  plus Bind's result formats;
- turn a refusal into a server-made error: a refused statement is replaced by a Parse that
  cannot succeed, so the server itself enters the error state (and marks an open transaction
  failed, as it would have for the refused statement); its error is swapped for the refusal;
- record each statement with its rows, command tag, error and duration;
- drop, after an error in the extended protocol, expectations for every message the server
  skips until Sync (a simple Query among them too: protocol docs, "Extended Query");
- follow COPY FROM STDIN: while the server is in COPY-in it ignores Sync and Flush (libpq sends a
  Sync right after an extended-protocol COPY), so Syncs the client sent between the COPY's
  Execute and its CopyDone/CopyFail expect nothing.

A response that matches no expectation means the relay has lost track of the conversation;
`ProtocolError` then ends the connection rather than risk masking the wrong columns. Rows and
COPY data only stream unseen while the oldest request is a query or Execute that may return
them: a DataRow the tracker cannot attribute to its own request ends the session before a byte
of it is forwarded.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from dataclasses import dataclass

from policy import detectors
from proxy.postgres import wire
from proxy.postgres.masking import MaskSpec, RowMasker, mask_copy_data
from proxy.postgres.startup import setting_safe
from proxy.postgres.stream import python_codec

# The Parse that stands in for a refused message: it fails in the parser, runs nothing, creates
# nothing (a failed Parse leaves no statement) and names itself in the server's log.
REFUSAL_STATEMENT = "interlock-refused"
REFUSAL_PARSE = wire.Parse(REFUSAL_STATEMENT, "INTERLOCK REFUSED THIS STATEMENT").encode()
SYNC = wire.sync()
PARAM_LIMIT = 200  # characters of one parameter kept in a recording


class UnsafeSetting(wire.ProtocolError):
    """The server reports a setting under which the proxy would read SQL differently than the server."""


class Statement:
    """One statement as recorded: what was asked (masked), what was decided, what came back.
    (A plain slotted class: one is made per statement, on the relay's hot path.)"""

    __slots__ = ("summary", "verdict", "rule", "params", "started", "ended", "tag", "rows", "error", "mask",
                 "masked")

    def __init__(self, summary: str, verdict: str, rule: str, params: list[str] | None = None, *,
                 mask: MaskSpec | None = None):
        self.summary, self.verdict, self.rule, self.params, self.mask = summary, verdict, rule, params, mask
        self.started = time.monotonic()
        self.ended: float | None = None
        self.tag = self.error = ""
        self.rows: int | None = None
        self.masked: dict[str, int] = {}

    def finish(self, tag: str = "", error: str = "") -> None:
        if self.ended is not None:
            return
        self.ended = time.monotonic()
        self.tag, self.error = tag, error
        self.rows = rows_of(tag)

    def event(self) -> dict:
        d: dict = {"protocol": "postgres", "summary": self.summary, "verdict": self.verdict, "rule": self.rule,
                   "duration_ms": round(1000 * ((self.ended or time.monotonic()) - self.started), 3)}
        if self.params is not None:
            d["params"] = self.params
        if self.tag:
            d["tag"] = self.tag
        if self.rows is not None:
            d["rows"] = self.rows
        if self.error:
            d["error"] = self.error
        if self.masked:
            d["masked"] = dict(self.masked)
        return d


def rows_of(tag: str) -> int | None:
    """Rows a command tag reports ("SELECT 5", "INSERT 0 3", "COPY 100"), None when it has none."""
    last = tag.rpartition(" ")[2]
    return int(last) if last.isdigit() and " " in tag else None


_BINARY_NUMBERS = {16: struct.Struct("!?"), 21: struct.Struct("!h"), 23: struct.Struct("!i"), 20: struct.Struct("!q"),
                   26: struct.Struct("!I"), 700: struct.Struct("!f"), 701: struct.Struct("!d")}
_BINARY_TEXT = frozenset({25, 1043, 1042, 19, 705, 114})


def masked_params(values: tuple, formats: tuple[int, ...], types: tuple[int, ...] = ()) -> list[str]:
    """Bind parameters as a recording may hold them: detectors applied, long values cut,
    binary values decoded when their declared type is a number or text, else by length only."""
    out = []
    for i, v in enumerate(values):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        oid = types[i] if i < len(types) else 0
        if v is None:
            out.append("NULL")
            continue
        if fmt == 1:
            num = _BINARY_NUMBERS.get(oid)
            if num is not None and len(v) == num.size:
                value = num.unpack(v)[0]
                out.append(str(value).lower() if oid == 16 else str(value))
                continue
            if oid == 3802 and len(v) and v[0] == 1:  # jsonb: version byte, then text
                v = v[1:]
            elif oid not in _BINARY_TEXT:
                out.append(f"<binary {len(v)} bytes>")
                continue
        text = bytes(v[:PARAM_LIMIT * 4]).decode("utf-8", "replace")
        text = detectors.mask_text(text)
        out.append(text if len(text) <= PARAM_LIMIT and len(v) <= PARAM_LIMIT * 4 else text[:PARAM_LIMIT] + "…")
    return out


@dataclass(eq=False)
class PreparedStatement:
    """A Parse the server has (or will have): its judgement and, once described, its columns."""

    summary: str
    verdict: str  # combined: deny > approve > mask > allow
    rule: str
    mask: MaskSpec | None
    ops: tuple = ()
    decisions: tuple = ()
    param_types: tuple[int, ...] = ()
    description: bytes | None = None  # the RowDescription message, parsed when rows are masked
    described: bool = False  # the client sent Describe(S): a description is on its way
    plain: bool = False  # known to create nothing and to change no parsing setting (the relay's shortcut)


@dataclass(eq=False)
class Portal:
    statement: PreparedStatement
    result_formats: tuple[int, ...]
    params: list[str]
    description: bytes | None = None
    described: bool = False


# expectation kinds; COPY_END marks where the client ended a COPY-in (it expects no response)
QUERY, PARSE, BIND, DESC_S, DESC_P, EXECUTE, CLOSE, SYNC_K, REFUSE, COPY_END = range(10)
# Expect.copy states: no COPY, COPY-out running (CopyData may come), COPY-out being swallowed
NO_COPY, COPY_OUT, COPY_DROP = range(3)
BINARY_COPY_MASKED = wire.error_response(
    "ERROR", "0A000", "interlock: binary COPY output cannot be masked; this statement's result was withheld",
    detail="a mask rule applies to this statement", hint="use COPY ... TO STDOUT in text or CSV format")


class Expect:
    __slots__ = ("kind", "stmts", "index", "masker", "portal", "prepared", "injected", "error", "copy_mask",
                 "want_mask", "rows", "copy")

    def __init__(self, kind: int, stmts: list[Statement] | None = None):
        self.kind = kind
        self.stmts = stmts or []
        self.index = 0
        self.masker: RowMasker | None = None
        self.portal: Portal | None = None
        self.prepared: PreparedStatement | None = None
        self.injected = False
        self.error = b""  # REFUSE: the ErrorResponse the client gets instead of the server's
        self.copy_mask: MaskSpec | None = None
        self.want_mask = False
        self.rows = kind == EXECUTE  # DataRows may come now (a query's after its RowDescription)
        self.copy = NO_COPY

    @property
    def current(self) -> Statement | None:
        return self.stmts[self.index] if self.index < len(self.stmts) else None


class Tracker:
    """Server-side half of the relay state; see the module docstring.

    The relay calls the push methods as it forwards client messages (in order), then
    `server(t, msg)` for every server message that is not streamed; `stream` says which types
    may pass unseen right now. Finished statements collect in `finished` for the recorder."""

    def __init__(self) -> None:
        self.queue: deque[Expect] = deque()
        self.finished: list[Statement] = []
        self.status = "I"
        self.params: dict[str, str] = {}
        self.stream = b""
        self.unsafe: str | None = None  # a setting the server reported that breaks SQL parsing
        # The server is in COPY-in and the client has not ended it yet: its Syncs expect nothing.
        self.copy_in = False
        self.codec = "utf-8"  # the Python codec of the client_encoding the server reports

    # ---- client side -------------------------------------------------------------------------

    def push(self, kind: int) -> Expect | None:
        """Expect the response to one client message; None for a Sync the server will ignore."""
        if self.copy_in:
            if kind == SYNC_K:
                return None
            raise wire.ProtocolError(f"client sent {_REQUESTS[kind]} during COPY from stdin")
        e = Expect(kind)
        self.queue.append(e)
        if len(self.queue) == 1:  # only a new oldest request changes what may stream
            self._restream()
        return e

    def copy_end(self) -> None:
        """The client sent CopyDone or CopyFail: Syncs after it count again."""
        if self.copy_in:
            self.copy_in = False
        elif self.queue:  # the server has not started the COPY yet (or never will)
            self.queue.append(Expect(COPY_END))

    def query(self, stmts: list[Statement]) -> Expect:
        if self.copy_in:
            raise wire.ProtocolError("client sent a Query during COPY from stdin")
        e = Expect(QUERY, stmts)
        self.queue.append(e)
        if len(self.queue) == 1:
            self._restream()
        return e

    def execute(self, portal: Portal, stmt: Statement) -> Expect:
        if self.copy_in:
            raise wire.ProtocolError("client sent an Execute during COPY from stdin")
        e = Expect(EXECUTE, [stmt])
        e.portal = portal
        e.want_mask = stmt.mask is not None
        self.queue.append(e)
        if len(self.queue) == 1:  # the oldest request already (an Execute continuing a portal)
            self._restream()
        return e

    def refusal(self, error: bytes, stmts: list[Statement], simple: bool) -> bytes:
        """Expect the stand-in's failure; returns what to send the server in place of the
        refused message (with a Sync of its own for a simple-protocol message)."""
        if self.copy_in:
            raise wire.ProtocolError("client sent a statement during COPY from stdin")
        e = Expect(REFUSE, stmts)
        e.error = error
        self.queue.append(e)
        if simple:
            self.queue.append(Expect(SYNC_K))
        self._restream()
        return REFUSAL_PARSE + SYNC if simple else REFUSAL_PARSE

    # ---- server side -------------------------------------------------------------------------

    def server(self, t: int, msg: memoryview) -> bytes | memoryview | None:
        """What to forward to the client for one server message (None: nothing)."""
        if t == 0x44:  # D DataRow: the hot path when rows are masked
            return self._row(self.queue[0] if self.queue else None, msg)
        try:
            return self._message(t, msg)
        finally:
            # After any change of the oldest request: may rows and COPY data pass unseen now?
            self._restream()

    def _message(self, t: int, msg: memoryview) -> bytes | memoryview | None:
        q = self.queue
        head = q[0] if q else None
        if t == 0x64:  # d CopyData
            if head is None or head.copy == NO_COPY:
                raise wire.ProtocolError("CopyData with no COPY out running")
            if head.copy == COPY_DROP:
                return None
            if head.copy_mask is not None:
                new = mask_copy_data(msg[5:], head.copy_mask)
                if new is not None:
                    st = head.current
                    if st is not None:
                        st.masked["copy"] = st.masked.get("copy", 0) + 1
                    return wire.CopyData(new).encode()
            return msg
        if t in (0x4E, 0x41):  # N notice, A notification
            return msg
        if t == 0x53:  # S ParameterStatus
            p = wire.parse_backend(wire.Frame(b"S", 0, msg, 5))
            self.params[p.name] = p.value
            if p.name == "client_encoding":
                self.codec = python_codec(p.value)
            # standard_conforming_strings=off is followed: the handler reads each text under it
            if p.name != "standard_conforming_strings" and not setting_safe(p.name, p.value):
                self.unsafe = f"{p.name}={p.value}"
                raise UnsafeSetting(f"interlock: the session now runs with {self.unsafe}, which the proxy "
                                    "cannot read SQL under; closing it")
            return msg
        if t == 0x5A:  # Z ReadyForQuery
            self.status = chr(msg[5])
            while q:
                e = q.popleft()
                self.finish_all(e, "no response before ReadyForQuery")
                if e.kind in (SYNC_K, QUERY):
                    break
            return msg
        if t == 0x45:  # E ErrorResponse
            self.copy_in = False  # an error ends a COPY-in; the client's later Syncs count
            return self._error(head, msg)
        if head is None:
            raise wire.ProtocolError(f"server sent {chr(t)!r} with no request pending")
        k = head.kind
        if t == 0x43 or t == 0x49:  # C CommandComplete, I EmptyQueryResponse
            tag = bytes(msg[5:-1]).decode("utf-8", "replace") if t == 0x43 else "EMPTY"
            out = msg
            if head.copy == COPY_DROP:  # the client gets the refusal instead of the result
                tag, out = "", BINARY_COPY_MASKED
            if k == QUERY:
                st = head.current
                if st is not None:
                    self._collect(head, st)
                    st.finish(tag, error="" if tag else "refused: binary COPY output cannot be masked")
                    self.finished.append(st)
                    head.index += 1
                    nxt = head.current
                    if nxt is not None:
                        nxt.started = time.monotonic()
                head.masker = None
                head.copy_mask = None
                head.rows, head.copy = False, NO_COPY
            elif k == EXECUTE:
                q.popleft()
                st = head.stmts[0]
                self._collect(head, st)
                st.finish(tag, error="" if tag else "refused: binary COPY output cannot be masked")
                self.finished.append(st)
            else:
                raise wire.ProtocolError(f"CommandComplete while expecting {_NAMES[k]}")
            return out
        if t == 0x54:  # T RowDescription (parsed only when its rows are masked)
            if k == QUERY:
                st = head.current
                head.masker = RowMasker(_description(msg), st.mask) if st is not None and st.mask is not None else None
                head.rows = True
                return msg
            if k == DESC_S:
                q.popleft()
                head.prepared.description = bytes(msg)
                return msg
            if k == DESC_P:
                q.popleft()
                head.portal.description = bytes(msg)
                return None if head.injected else msg
            raise wire.ProtocolError(f"RowDescription while expecting {_NAMES[k]}")
        if t == 0x6E:  # n NoData
            if k in (DESC_S, DESC_P):
                q.popleft()
                return None if head.injected else msg
            raise wire.ProtocolError(f"NoData while expecting {_NAMES[k]}")
        if t == 0x74:  # t ParameterDescription
            if k != DESC_S:
                raise wire.ProtocolError(f"ParameterDescription while expecting {_NAMES[k]}")
            return msg
        if t in (0x31, 0x32, 0x33):  # 1 ParseComplete, 2 BindComplete, 3 CloseComplete
            want = {0x31: PARSE, 0x32: BIND, 0x33: CLOSE}[t]
            if k != want:
                raise wire.ProtocolError(f"{chr(t)!r} while expecting {_NAMES[k]}")
            q.popleft()
            return msg
        if t == 0x73:  # s PortalSuspended
            if k != EXECUTE:
                raise wire.ProtocolError(f"PortalSuspended while expecting {_NAMES[k]}")
            q.popleft()
            st = head.stmts[0]
            self._collect(head, st)
            st.finish("suspended")
            self.finished.append(st)
            return msg
        if t in (0x47, 0x48):  # G CopyInResponse, H CopyOutResponse
            if k not in (QUERY, EXECUTE):
                raise wire.ProtocolError(f"COPY response while expecting {_NAMES[k]}")
            if t == 0x47:
                self._copy_in_started()
                return msg
            head.copy = COPY_OUT
            st = head.current
            if st is not None and st.mask is not None:
                if msg[5] != 0:
                    # Binary COPY cannot be masked: its result is swallowed and refused (the
                    # session goes on; the server ran a read the client never sees).
                    head.copy = COPY_DROP
                    return None
                head.copy_mask = st.mask
            return msg
        if t == 0x63:  # c CopyDone
            if head.copy == NO_COPY:
                raise wire.ProtocolError("CopyDone with no COPY out running")
            if head.copy == COPY_DROP:
                return None  # (kept until CommandComplete, which the refusal replaces)
            head.copy = NO_COPY  # no CopyData after CopyDone
            return msg
        raise wire.ProtocolError(f"unexpected server message {chr(t)!r}")

    def _copy_in_started(self) -> None:
        """CopyInResponse: the server now ignores Sync (and Flush) until the client's CopyDone or
        CopyFail, so Syncs queued behind the COPY up to that point expect nothing; any other
        request there would fail the COPY server-side, which the relay does not follow."""
        q = self.queue
        end = len(q)
        for i in range(1, len(q)):
            k = q[i].kind
            if k == COPY_END:
                end = i + 1
                break
            if k != SYNC_K:
                raise wire.ProtocolError(f"client sent {_REQUESTS[k]} during COPY from stdin")
        else:
            self.copy_in = True
        for _ in range(end - 1):
            del q[1]

    def _row(self, head: Expect | None, msg: memoryview) -> bytes | memoryview:
        if head is None or not head.rows:
            raise wire.ProtocolError("DataRow the relay cannot attribute to a query or Execute")
        m = head.masker
        if m is None and head.kind == EXECUTE and head.want_mask:
            m = head.masker = self._portal_masker(head)
            self._restream()  # a masker with nothing to mask lets the rest of the rows stream
        if m is None:
            return msg
        new = m.mask(msg)
        return msg if new is None else new

    def _portal_masker(self, head: Expect) -> RowMasker:
        p = head.portal
        spec = head.stmts[0].mask
        if p.description is not None:
            return RowMasker(_description(p.description), spec)
        if p.statement.description is not None:
            return RowMasker(_description(p.statement.description), spec, p.result_formats)
        # Fail closed: rows to mask and nothing says which columns they are.
        raise wire.ProtocolError("rows to mask arrived with no description of their columns")

    def _collect(self, head: Expect, st: Statement) -> None:
        if head.masker is not None and head.masker.counts:
            for k, v in head.masker.counts.items():
                st.masked[k] = st.masked.get(k, 0) + v
            head.masker.counts.clear()

    def _error(self, head: Expect | None, msg: memoryview) -> bytes | memoryview | None:
        q = self.queue
        err = wire.parse_backend(wire.Frame(b"E", 0, msg, 5))
        text = f"{err.code}: {detectors.mask_text(err.message)}"
        if head is None:
            return msg
        if head.kind == REFUSE:
            q.popleft()
            self._skip_to_sync()
            return head.error
        if head.kind == SYNC_K:
            return msg  # the Sync itself failed (a deferred constraint at commit): its Z follows
        out = msg
        st = head.current
        if st is not None and st.mask is not None:
            out = _masked_error(err, st.mask)
        if head.kind == QUERY:
            if st is not None:
                self._collect(head, st)
                st.finish(error=text)
                self.finished.append(st)
                for later in head.stmts[head.index + 1:]:
                    later.finish(error="not run: an earlier statement failed")
                    self.finished.append(later)
                head.index = len(head.stmts)
            head.masker = None
            head.copy_mask = None
            head.rows, head.copy = False, NO_COPY
        else:
            q.popleft()
            if head.kind == EXECUTE and st is not None:
                self._collect(head, st)
                st.finish(error=text)
                self.finished.append(st)
            self._skip_to_sync()
        return out

    def _skip_to_sync(self) -> None:
        """After an error in the extended protocol the server discards every message until Sync,
        a simple Query included; none of them gets a response."""
        q = self.queue
        while q and q[0].kind != SYNC_K:
            self.finish_all(q.popleft(), "not run: skipped after an error")

    def finish_all(self, e: Expect, why: str) -> None:
        for st in e.stmts[e.index:]:
            if st.ended is None:
                st.finish(error=why)
                self.finished.append(st)
        e.index = len(e.stmts)

    def _restream(self) -> None:
        """DataRows may pass unseen only while the oldest request is a query (after its
        RowDescription) or an Execute whose rows need no masking; CopyData only during its
        unmasked COPY out. Anything else is looked at, and refused if it belongs nowhere."""
        q = self.queue
        while q and q[0].kind == COPY_END:  # a CopyDone for a COPY the server never started
            q.popleft()
        head = q[0] if q else None
        if head is None:
            self.stream = b""
            return
        rows = head.rows and (head.masker is None or not head.masker.active)
        if head.kind == EXECUTE and head.want_mask and head.masker is None:
            rows = False
        copy = head.copy == COPY_OUT and head.copy_mask is None
        self.stream = (b"D" if rows else b"") + (b"d" if copy else b"")


def _description(msg: bytes | memoryview) -> wire.RowDescription:
    return wire.parse_backend(wire.Frame(b"T", 0, memoryview(msg), 5))


def _masked_error(err: wire.ErrorResponse, spec: MaskSpec) -> bytes:
    """An error from a masked statement with the same masking applied to its text fields
    (unique-violation details quote the offending value)."""
    fields = {k: (detectors.mask_text(v, spec.detectors) if k in "MDHW" else v) for k, v in err.fields.items()}
    return wire.ErrorResponse(fields).encode()


_NAMES = {QUERY: "a query result", PARSE: "ParseComplete", BIND: "BindComplete", DESC_S: "a statement description",
          DESC_P: "a portal description", EXECUTE: "an Execute result", CLOSE: "CloseComplete",
          SYNC_K: "ReadyForQuery", REFUSE: "the refusal's error", COPY_END: "nothing (CopyDone)"}
_REQUESTS = {QUERY: "a Query", PARSE: "a Parse", BIND: "a Bind", DESC_S: "a Describe", DESC_P: "a Describe",
             EXECUTE: "an Execute", CLOSE: "a Close", SYNC_K: "a Sync", REFUSE: "a refused statement",
             COPY_END: "CopyDone"}
