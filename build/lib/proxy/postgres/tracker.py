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
- drop, after an error in the extended protocol, expectations for messages the server skips
  until Sync.

A response that matches no expectation means the relay has lost track of the conversation;
`ProtocolError` then ends the connection rather than risk masking the wrong columns.
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


@dataclass(eq=False)
class Portal:
    statement: PreparedStatement
    result_formats: tuple[int, ...]
    params: list[str]
    description: bytes | None = None
    described: bool = False


# expectation kinds
QUERY, PARSE, BIND, DESC_S, DESC_P, EXECUTE, CLOSE, SYNC_K, REFUSE = range(9)


class Expect:
    __slots__ = ("kind", "stmts", "index", "masker", "portal", "prepared", "injected", "error", "copy_mask",
                 "want_mask")

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
        self.stream = b"Dd"
        self.unsafe: str | None = None  # a setting the server reported that breaks SQL parsing

    # ---- client side -------------------------------------------------------------------------

    def push(self, kind: int) -> Expect:
        e = Expect(kind)
        self.queue.append(e)
        if len(self.queue) == 1:  # only a new oldest request changes what may stream
            self._restream()
        return e

    def query(self, stmts: list[Statement]) -> Expect:
        e = Expect(QUERY, stmts)
        self.queue.append(e)
        if len(self.queue) == 1:
            self._restream()
        return e

    def execute(self, portal: Portal, stmt: Statement) -> Expect:
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
            if head is not None and head.copy_mask is not None:
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
            if not setting_safe(p.name, p.value):
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
            return self._error(head, msg)
        if head is None:
            raise wire.ProtocolError(f"server sent {chr(t)!r} with no request pending")
        k = head.kind
        if t == 0x43 or t == 0x49:  # C CommandComplete, I EmptyQueryResponse
            tag = bytes(msg[5:-1]).decode("utf-8", "replace") if t == 0x43 else "EMPTY"
            if k == QUERY:
                st = head.current
                if st is not None:
                    self._collect(head, st)
                    st.finish(tag)
                    self.finished.append(st)
                    head.index += 1
                    nxt = head.current
                    if nxt is not None:
                        nxt.started = time.monotonic()
                head.masker = None
                head.copy_mask = None
            elif k == EXECUTE:
                q.popleft()
                st = head.stmts[0]
                self._collect(head, st)
                st.finish(tag)
                self.finished.append(st)
            else:
                raise wire.ProtocolError(f"CommandComplete while expecting {_NAMES[k]}")
            return msg
        if t == 0x54:  # T RowDescription (parsed only when its rows are masked)
            if k == QUERY:
                st = head.current
                head.masker = RowMasker(_description(msg), st.mask) if st is not None and st.mask is not None else None
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
            st = head.current
            if t == 0x48 and st is not None and st.mask is not None:
                if msg[5] != 0:
                    raise wire.ProtocolError("binary COPY output cannot be masked")
                head.copy_mask = st.mask
            return msg
        if t == 0x63:  # c CopyDone
            return msg
        raise wire.ProtocolError(f"unexpected server message {chr(t)!r}")

    def _row(self, head: Expect | None, msg: memoryview) -> bytes | memoryview:
        if head is None or head.kind not in (QUERY, EXECUTE):
            raise wire.ProtocolError("DataRow with no query pending")
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
        else:
            q.popleft()
            if head.kind == EXECUTE and st is not None:
                self._collect(head, st)
                st.finish(error=text)
                self.finished.append(st)
            self._skip_to_sync()
        return out

    def _skip_to_sync(self) -> None:
        """After an error the server skips every extended-protocol message until Sync."""
        q = self.queue
        while q and q[0].kind not in (SYNC_K, QUERY):
            self.finish_all(q.popleft(), "not run: skipped after an error")

    def finish_all(self, e: Expect, why: str) -> None:
        for st in e.stmts[e.index:]:
            if st.ended is None:
                st.finish(error=why)
                self.finished.append(st)
        e.index = len(e.stmts)

    def _restream(self) -> None:
        """DataRows and CopyData may pass unseen unless the oldest request masks them."""
        head = self.queue[0] if self.queue else None
        if head is None:
            self.stream = b"Dd"
            return
        rows = head.masker is None or not head.masker.active
        if head.kind == EXECUTE and head.want_mask and head.masker is None:
            rows = False
        if head.kind == QUERY and head.masker is None:
            st = head.current
            rows = True if st is None or st.mask is None else rows
        copy = head.copy_mask is None
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
          SYNC_K: "ReadyForQuery", REFUSE: "the refusal's error"}
