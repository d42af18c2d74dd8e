"""The PostgreSQL handler: the glue between the relay (proxy/relay.py AgentSide) and the sans-IO
pieces of this package.

A connection goes through three phases:

1. startup — SSLRequest is answered 'S' and TLS is terminated toward the agent with a leaf from
   the proxy's CA (GSSENCRequest is declined); a CancelRequest is judged, mapped from the key this
   proxy issued to the server's own (by whichever worker issued it: cancels.py) and forwarded; the
   StartupMessage's settings are judged.
2. login — upstream, the proxy asks for TLS first (like libpq's default) and then either logs in
   itself with the credential the policy names for this agent and target (SCRAM-SHA-256, with
   channel binding over TLS; md5/cleartext only if the credential allows), answering the agent
   AuthenticationOk without ever asking it for a password; or, when no credential applies,
   relays the agent's own authentication unchanged. BackendKeyData is re-keyed.
3. statements — every Query/Parse is analyzed (proxy/postgres/analysis.py) and each Operation
   judged; nothing goes upstream before the decisions are on record. Deny and unapproved holds
   become a server-made error (tracker.Tracker.refusal) so both ends agree on the transaction
   state; approve holds the agent (reading paused, nothing sent) until a human answers; mask
   rewrites DataRows and COPY data. Every statement is recorded when its result completes.

Bytes move through stream.Splitter: runs of DataRows/CopyData that need no masking are forwarded
as they arrive, without a per-message object and without copying; each read becomes one write.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from policy.engine import Destination
from policy.model import Decision, Operation, Verdict
from proxy import workers as workers_mod
from proxy.handler import Handler, register
from proxy.postgres import cancels, catalog, reading, startup, wire
from proxy.postgres.analysis import Analyzer
from proxy.postgres.masking import MaskSpec
from proxy.postgres.scram import AuthenticationError, UpstreamAuthenticator
from proxy.postgres.statements import WRITE_CAPABLE_ACTIONS
from proxy.postgres.stream import (
    BYTE,
    RAW,
    STARTUP,
    TYPED,
    Splitter,
    bind_fields,
    execute_portal,
    kind_and_name,
    parse_fields,
)
from proxy.postgres.tlsbio import TlsPipe, client_context, server_end_point_hash
from proxy.postgres.tracker import (
    BIND,
    CLOSE,
    DESC_P,
    DESC_S,
    PARSE,
    SYNC_K,
    Portal,
    PreparedStatement,
    Statement,
    Tracker,
    UnsafeSetting,
    masked_params,
)
from recorder.approvals import Outcome

# phases
CLIENT_STARTUP, UP_SSL, UP_TLS, UP_AUTH, UP_PARAMS, READY, DONE, UP_CATALOG = range(8)
PAUSE_BUFFERED = 1 << 20  # client bytes buffered while a statement waits: stop reading beyond this
MAX_PREPARED = 10_000  # statements/portals remembered per session
_Q, _P, _B, _E, _D, _C, _S, _F, _X, _p, _c, _f = b"QPBEDCSFXpcf"
_RANK = {Verdict.ALLOW: 0, Verdict.MASK: 1, Verdict.APPROVE: 2, Verdict.DENY: 3}
BUILTIN_UNPARSEABLE = Decision(Verdict.DENY, "builtin:unparseable", "SQL the proxy cannot parse is never forwarded")
READ_ONLY_RULE = "builtin:read-only-session"
BUILTIN_FUNCTION_CALL = Decision(Verdict.DENY, "builtin:function-call",
                                 "a fast-path FunctionCall runs a function with no SQL to judge")

# Settings that change how the server reads SQL text. The server reports a change only with its
# next ReadyForQuery; until then (the "window") SQL is only forwarded if it reads the same under
# any value they may take: ASCII without backslashes (see `ambiguous`).
PARSING_SETTINGS = frozenset({"client_encoding", "standard_conforming_strings", "reset_all"})
BUILTIN_MISREAD = Decision(Verdict.DENY, "builtin:nonstandard-strings",
                           "with standard_conforming_strings off the server reads this text's backslashes "
                           "differently from the proxy's analysis; write such strings as E'...'")
BUILTIN_AMBIGUOUS = Decision(Verdict.DENY, "builtin:ambiguous-sql",
                             "a client_encoding or standard_conforming_strings change is pending; until the server "
                             "confirms it, SQL with backslashes or non-ASCII characters could read differently to it")
_DDL_ACTIONS = frozenset({"create", "alter", "do", "other"})
# What leaves the session's own relations where they are, and what may swap names under them.
_KEEPS_OWNED = frozenset({"read", "insert", "update", "delete", "truncate", "lock", "transaction", "explain", "create",
                          "set"})
_FORGETS_OWNED = frozenset({"call", "do", "function-call"})
_mask_specs: dict[tuple[str, ...], MaskSpec] = {}
_tls_contexts: dict[int, ssl.SSLContext] = {}
_upstream_context: list[ssl.SSLContext] = []


class _StatementLog:
    """Statement records wait a few milliseconds and go to the recorder together: they are not
    decisions (those are on record before anything runs), and one commit for many statements
    is what lets the recorder keep up with a busy agent."""

    DELAY = 0.01

    def __init__(self, proxy: Any):
        self.recorder, self.loop = proxy.recorder, proxy.loop
        self.pending: list[tuple[dict, str]] = []  # (event data, session id)
        self.timer: asyncio.TimerHandle | None = None

    def add(self, session: str, data: dict) -> None:
        self.pending.append((data, session))
        if self.timer is None:
            self.timer = self.loop.call_later(self.DELAY, self.flush)

    def flush(self) -> None:
        self.timer = None
        pending, self.pending = self.pending, []
        self.recorder.events("statement", pending)


# One per proxy, keyed by the proxy itself (weakly): an id() key outlives its object, and a new
# proxy given the same id got the old one's log, with its closed loop and recorder.
_statement_logs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # proxy -> _StatementLog


def _statement_log(proxy: Any) -> _StatementLog:
    log = _statement_logs.get(proxy)
    if log is None:
        log = _statement_logs[proxy] = _StatementLog(proxy)
    return log


class _LeafObject(ssl.SSLObject):
    default_host = ""


def _agent_context(leaves: Any) -> ssl.SSLContext:
    """Server-side TLS toward agents: the certificate is chosen per connection, from the agent's
    SNI or else the address it dialled, by switching context in the SNI callback."""
    ctx = _tls_contexts.get(id(leaves))
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.sslobject_class = _LeafObject

        def pick(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            try:
                obj.context = leaves.server_context(name or obj.default_host, alpn=("postgresql",))
            except (ValueError, ssl.SSLError):
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        ctx.sni_callback = pick
        _tls_contexts[id(leaves)] = ctx
    return ctx


def _upstream_tls() -> ssl.SSLContext:
    if not _upstream_context:
        _upstream_context.append(client_context())
    return _upstream_context[0]


def mask_spec(decisions: list[Decision]) -> MaskSpec | None:
    """The masking a set of decisions asks for: the union of every MASK decision's list (an
    empty list means everything)."""
    masks = [d for d in decisions if d.verdict is Verdict.MASK]
    if not masks:
        return None
    key = () if any(not d.mask for d in masks) else tuple(sorted({n for d in masks for n in d.mask}))
    spec = _mask_specs.get(key)
    if spec is None:
        spec = _mask_specs[key] = MaskSpec.from_names(key)
    return spec


def changes_parsing(ops: list[Operation] | tuple[Operation, ...]) -> bool:
    """Whether a statement may change client_encoding or standard_conforming_strings (a SET,
    set_config(), RESET ALL, or code the analyzer cannot see into)."""
    for op in ops:
        if op.attributes.get("setting") in PARSING_SETTINGS or "opaque-code" in op.risks:
            return True
        if any(f.rsplit(".", 1)[-1] == "set_config" for f in op.attributes.get("functions", "").split(",")):
            return True
    return False


def ambiguous(sql: str) -> bool:
    """Text whose meaning could depend on client_encoding or standard_conforming_strings: ASCII
    is the same in every encoding the proxy allows, and only backslashes can read differently
    with standard_conforming_strings off (reading.same_reading tells whether they do)."""
    return not sql.isascii() or not reading.same_reading(sql)


def combine(decisions: list[Decision]) -> Decision:
    """The decision that governs a statement: deny over approve over mask over allow."""
    return max(decisions, key=lambda d: _RANK[d.verdict])


def syntax_error(ops: list[Operation], sql: str) -> bytes | None:
    """The server's own answer to text it cannot parse (SQLSTATE 42601, the parser's message and
    position), when that is why the statement is refused."""
    if not sql or not all(op.action == "unparseable" and "via" not in op.attributes for op in ops):
        return None
    err = reading.syntax_error(sql)
    if err is None:
        return None
    message, pos = err
    return wire.error_response("ERROR", "42601", message, **({"P": str(pos)} if pos > 0 else {}))


def refusal_error(decision: Decision, outcome: str = "") -> bytes:
    if outcome == "canceled":  # the agent cancelled while the statement waited for a human
        return wire.error_response("ERROR", "57014", "canceling statement due to user request",
                                   detail=f"interlock: it was held for approval under rule '{decision.rule}'")
    if outcome:
        msg = f"interlock: statement not approved ({outcome}) under rule '{decision.rule}'"
        note = getattr(outcome, "note", "")
        return wire.error_response("ERROR", "42501", msg, detail=(f"the approver said: {note}" if note else None)
                                   or decision.reason or None)
    msg = f"interlock: statement refused by rule '{decision.rule}'"
    return wire.error_response("ERROR", "42501", msg, detail=decision.reason or None)


class _Plan:
    """What a session made of a statement text it already ran: one operation, allowed or masked
    under the policy in force, its decision already on record (see PostgresHandler._plan)."""

    __slots__ = ("decisions", "verdict", "rule", "mask")

    def __init__(self, decisions: tuple[Decision, ...], verdict: str, rule: str, mask: MaskSpec | None):
        self.decisions, self.verdict, self.rule, self.mask = decisions, verdict, rule, mask


class _Pending:
    """A message waiting for a human (or for its refusal): what to do once the answer is in."""

    __slots__ = ("kind", "data", "stmts", "ops", "decisions", "portal", "record")

    def __init__(self, kind: int, data: bytes, stmts: list[Statement], ops: list[Operation],
                 decisions: list[Decision]):
        self.kind, self.data, self.stmts, self.ops, self.decisions = kind, data, stmts, ops, decisions
        self.portal: Portal | None = None
        self.record: asyncio.Future | None = None


@register
class PostgresHandler(Handler):
    protocol = "postgres"

    def start(self) -> None:
        self.phase = CLIENT_STARTUP
        self.cs = Splitter("frontend", mode=STARTUP, stream=b"d")
        self.ss = Splitter("backend")
        self.tracker = Tracker()
        self.ctls: TlsPipe | None = None
        self.utls: TlsPipe | None = None
        self.analyzer: Analyzer | None = None
        self.auth: UpstreamAuthenticator | None = None
        self.upstream_startup = b""
        self.sout: list = []  # to the server, in order; held back while `gate` is unresolved
        self.cout: list = []
        self.gate: asyncio.Future | None = None
        self.blocked = False  # a message waits for a human: nothing after it is looked at
        self.dropping = False  # after a refusal in the extended protocol: skip until Sync
        self.statements: dict[str, PreparedStatement] = {}
        self.portals: dict[str, Portal] = {}
        self.key: tuple[int, bytes] | None = None
        self.hold_task: asyncio.Task | None = None
        self.hold_canceled = False
        self.window: object | None = None  # the Query/Sync whose ReadyForQuery ends a settings window
        self.window_next_sync = False  # an Execute opened a window: the next Sync's ReadyForQuery ends it
        self.eof_pending = False
        self._simple_refusal = True
        self.dest: Destination | None = None
        self.known: set[tuple] = set()  # allows/masks on record this session (see _known)
        self.plans: dict[object, _Plan] = {}  # by Analyzer.key, under plans_policy (see _plan)
        self.plans_policy: object = None
        self.plans_bound: tuple | None = None  # the agent identity's key when the plans were made
        # The policy grants this agent no write on this target: the upstream session is opened
        # read-only, and nothing may make it read-write (see _read_only_refusal).
        self.read_only = False
        self.read_only_decision: Decision | None = None
        self.catalog: catalog.FunctionCatalog | None = None
        self.catalog_key: tuple[str, int, str] = ("", 0, "")
        self.catalog_rows: list[str] | None = None
        # Relations this session created (see _own): committed, and in the open transaction.
        self.owned: set[str] = set()
        self.tx_owned: set[str] = set()
        self.tx_failed = False
        self.creating: dict[Statement, str] = {}
        self.plus_withheld = False  # pass-through SCRAM: the server offered -PLUS, the agent was not

    # ---- bytes in --------------------------------------------------------------------------

    def on_client(self, data: bytes) -> None:
        if self.phase != DONE:
            self._safely(self._client_bytes, data, "client")

    def on_server(self, data: bytes) -> None:
        if self.phase != DONE:
            self._safely(self._server_bytes, data, "server")

    def _safely(self, step: Callable[[bytes], None], data: bytes, side: str) -> None:
        """One step of the relay; whatever goes wrong ends the connection, telling the agent why."""
        try:
            step(data)
        except UnsafeSetting as e:
            self._fatal("0A000", str(e))
        except wire.MessageTooLarge as e:
            self._fatal("54000", f"interlock: {e}")
        except wire.ProtocolError as e:
            self._fatal("08P01", f"interlock: invalid message from the {side}: {e}")
        except AuthenticationError as e:
            self._fatal(e.code, f"interlock: upstream login failed: {e}")
        except ssl.SSLError as e:
            if side == "client":  # no TLS to tell the agent anything with
                self._abort("tls-error", f"agent TLS: {e}")
                return
            self._fatal("08006", f"interlock: TLS to the server failed: {e}")
        except Exception as e:  # a bug must not leave a half-relayed session: end it
            self._internal(e)
        self._flush()

    @staticmethod
    def _decrypt(tls: TlsPipe, data: bytes, reply: Callable[[bytes], None]) -> bytes:
        plain = tls.receive(data)
        records = tls.outgoing()  # handshake, alerts, key updates: for the same peer
        if records:
            reply(records)
        return plain

    def _client_bytes(self, data: bytes) -> None:
        if self.ctls is not None:
            data = self._decrypt(self.ctls, data, self.conn.to_client)
        self.cs.feed(data)
        self._pump_client()

    def _server_bytes(self, data: bytes) -> None:
        if self.utls is not None:
            data = self._decrypt(self.utls, data, self.conn.to_server)
            if self.phase == UP_TLS and self.utls.handshaken:
                self._send_startup()
        self.ss.feed(data)
        if self.phase == READY:
            self._pump_server()
        else:
            self._login_server()

    def on_client_eof(self) -> bool:
        """Pass the half-close on only after what came before it: statements may still wait for
        their records or for a human."""
        self.eof_pending = True
        self._flush()
        return True

    def on_close(self) -> None:
        self.phase = DONE
        if self.key is not None:
            cancels.forget(*self.key)
        if self.hold_task is not None:
            self.hold_task.cancel()
        for e in self.tracker.queue:
            self.tracker.finish_all(e, "connection closed")
        self._record()
        log = _statement_logs.get(self.conn.proxy)
        if log is not None and log.pending:
            log.flush()  # the session row closes now: its statements go with it

    # ---- bytes out -------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.phase == DONE and not self.cout:
            return
        if self.sout and self.gate is None and self.conn.upstream is not None:
            data = _join(self.sout)
            self.sout = []
            if self.utls is not None:
                data = self.utls.encrypt(data)
            self.conn.to_server(data)
        if self.cout:
            data = _join(self.cout)
            self.cout = []
            if self.ctls is not None:
                data = self.ctls.encrypt(data)
            self.conn.to_client(data)
        if self.eof_pending and not (self.sout or self.gate or self.blocked or self.cs.buffered):
            self.eof_pending = False
            self.conn.server_eof()

    def _gate(self, fut: asyncio.Future | None) -> None:
        """Hold back everything for the server until this record (and every earlier one) is on disk."""
        if fut is None:
            return
        self.gate = fut
        fut.add_done_callback(self._gate_done)

    def _gate_done(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self._abort("recorder-error", f"a decision could not be recorded: {fut.exception() if not fut.cancelled() else 'cancelled'}")
            return
        if fut is self.gate:
            self.gate = None
            self._flush()

    def _fatal(self, code: str, message: str) -> None:
        """Tell the agent why (a FATAL error it can show) and close both sides cleanly."""
        if self.phase == DONE:
            return
        self.cout.append(wire.error_response("FATAL", code, message))
        self.sout = []
        self.gate = None
        self._flush()
        self._end_tls()  # close_notify: the agent reads the error, not a TLS failure
        self.phase = DONE
        self.conn.close("protocol-error" if code == "08P01" else "refused", message, abort=False)

    def _internal(self, e: Exception) -> None:
        traceback.print_exc(file=sys.stderr)
        self._fatal("XX000", f"interlock: internal error ({type(e).__name__}); the connection is closed")

    def _abort(self, outcome: str, detail: str) -> None:
        self.phase = DONE
        self.cout = []
        self.conn.close(outcome, detail)

    def _record(self) -> None:
        done = self.tracker.finished
        if done:
            self.tracker.finished = []
            log = _statement_log(self.conn.proxy)
            sid = self.conn.rec.id
            for st in done:
                log.add(sid, st.event())

    # ---- startup -----------------------------------------------------------------------------

    def _pump_client(self) -> None:
        cs = self.cs
        while not self.blocked:
            if self.phase == READY:
                seg = cs.next()
                if seg is None:
                    break
                kind, mv = seg
                if kind == RAW:
                    if not self.dropping:
                        self.sout.append(mv)
                elif self._message(kind, mv):
                    break
            elif self.phase == CLIENT_STARTUP:
                seg = cs.next()
                if seg is None:
                    break
                self._startup_packet(seg[1])
            elif self.phase == UP_AUTH and self.auth is None:
                # the agent's own authentication, relayed as is
                seg = cs.next()
                if seg is None:
                    break
                kind, mv = seg
                if kind not in (_p, _X):
                    raise wire.ProtocolError(f"{chr(kind)!r} before authentication completed")
                if self.plus_withheld and kind == _p:
                    self.plus_withheld = False
                    if _binds_tls(mv):
                        self._fatal("08P01", CHANNEL_BINDING_ADVICE)
                        return
                self.sout.append(mv)
            else:
                break  # the login is in progress: client bytes wait in the splitter
        if self.blocked and self.cs.buffered > PAUSE_BUFFERED:
            self.conn.pause_client()

    def _startup_packet(self, mv: memoryview) -> None:
        msg = wire.parse_frontend(wire.Frame(b"", 0, mv, 4))
        if isinstance(msg, wire.SSLRequest):
            if self.ctls is not None:
                raise wire.ProtocolError("SSLRequest inside TLS")
            if self.cs.buffered:
                raise wire.ProtocolError(f"{self.cs.buffered} unencrypted bytes arrived before the TLS handshake")
            self.conn.to_client(b"S")
            obj = TlsPipe.server(_agent_context(self.conn.proxy.leaves))
            names = self.conn.names()
            obj.obj.default_host = names[0] if names else self.conn.rec.dst_addr
            self.ctls = obj
        elif isinstance(msg, wire.GSSENCRequest):
            if self.ctls is not None:
                raise wire.ProtocolError("GSSENCRequest inside TLS")
            self.conn.to_client(b"N")
        elif isinstance(msg, wire.CancelRequest):
            self.phase = DONE
            self._cancel(msg)
        else:
            self.cs.mode = TYPED
            self.phase = UP_SSL
            self.blocked = True  # until the startup settings are judged
            self.hold_task = self.conn.spawn(self._login(msg, bytes(mv)))

    def _cancel(self, msg: wire.CancelRequest) -> None:
        rec = self.conn.rec
        op = Operation("postgres", "cancel", (f"backend {msg.pid}",),
                       summary=f"cancel the statement running in backend {msg.pid}")
        decision, fut = self.conn.judge(op)

        async def act() -> None:
            try:
                await fut
            except Exception as e:  # no record, no cancel
                self.conn.close("recorder-error", str(e))
                return
            if decision.verdict is Verdict.DENY:
                self._end_tls()
                self.conn.close("denied", f"{decision.rule}: {decision.reason}", abort=False)
                return
            if decision.verdict is Verdict.APPROVE:  # a human first, as for any operation
                outcome = await self.conn.hold(op, decision)
                if self.conn.transport.is_closing():
                    return
                if outcome != "approved":
                    self._end_tls()
                    why = outcome.explained(decision.rule) if isinstance(outcome, Outcome) else f"approval {outcome}"
                    self.conn.close(str(outcome), why, abort=False)
                    return
            proxy = self.conn.proxy
            workers = getattr(proxy, "workers", 1)
            shared = workers_mod.shared_dir(proxy.layout.run_dir) if workers > 1 else None
            try:  # the worker that issued the key answers (this one, or a sibling: cancels.py)
                found = await cancels.claim_anywhere(msg.pid, msg.key, getattr(proxy, "worker", 0), workers, shared,
                                                     proxy.config.connect_timeout, (rec.dst_addr, rec.dst_port))
            except (cancels.OwnerGone, cancels.Elsewhere) as e:
                self._end_tls()
                self.conn.close("refused", str(e), abort=False)
                return
            if found is None:
                self._end_tls()
                self.conn.close("refused", "CancelRequest with a key this proxy did not issue", abort=False)
                return
            addr, port, key, hold_canceled = found
            if shared is not None and (owner := cancels.owner_of(msg.key, workers)) != getattr(proxy, "worker", 0):
                self.conn.event("cancel-routed", {"backend": msg.pid, "worker": owner})
            if hold_canceled:
                self.conn.event("hold-canceled", {"backend": msg.pid})
            real = wire.cancel_request(msg.pid, key)
            if (addr, port) == (rec.dst_addr, rec.dst_port) and self.conn.upstream is not None:
                self.conn.to_server(real)
                self._end_tls()
                self.conn.server_eof()
                return
            try:
                async with asyncio.timeout(self.conn.proxy.config.connect_timeout):
                    _, writer = await asyncio.open_connection(addr, port)
                writer.write(real)
                await writer.drain()
                writer.close()
            except (OSError, TimeoutError) as e:
                self.conn.event("cancel-failed", {"error": str(e)})
            self._end_tls()
            self.conn.close("closed", "cancel forwarded", abort=False)

        self.conn.spawn(act())

    def _end_tls(self) -> None:
        """close_notify toward the agent, as the server ends an encrypted cancel connection
        (libpq >= 17's PQcancelCreate otherwise reports "SSL error: unexpected eof")."""
        if self.ctls is not None and self.ctls.handshaken:
            self.conn.to_client(self.ctls.shutdown())

    async def _login(self, msg: wire.StartupMessage, raw: bytes) -> None:
        """Judge the startup settings, then start the upstream login."""
        try:
            await self._login_steps(msg, raw)
        except Exception as e:
            self._internal(e)
            self._flush()

    async def _login_steps(self, msg: wire.StartupMessage, raw: bytes) -> None:
        try:
            settings = startup.judged(msg.params)
        except startup.StartupRefused as e:
            self._fatal("0A000", f"interlock: {e}")
            return
        self.analyzer = Analyzer()
        ops = [op for name, value in settings for op in self.analyzer.analyze(startup.as_sql(name, value))]
        rec = self.conn.rec
        self.dest = Destination(rec.dst_addr, rec.dst_port, self.conn.names(), rec.protocol)
        if not self.conn.proxy.policy.current.may_permit(rec.agent, self.dest, "postgres", WRITE_CAPABLE_ACTIONS):
            self.read_only = True
            self.read_only_decision = Decision(
                Verdict.DENY, READ_ONLY_RULE,
                f"the policy grants agent '{rec.agent}' no write on this server, so its session is read-only "
                "and nothing may make it read-write")
        self.catalog_key = (rec.dst_addr, rec.dst_port, msg.database or "")
        refused = [op for op in ops if self.read_only and "read-write" in op.risks]
        if refused:
            d = self.read_only_decision
            try:
                await self._record_builtin(refused[0], d)
            except Exception as e:
                self._abort("recorder-error", str(e))
                return
            self._fatal("42501", f"interlock: startup setting refused by rule '{d.rule}': {d.reason}")
            self._flush()
            return
        if ops and not await self._startup_allowed(ops):
            return
        if self.phase == DONE:
            return
        self.blocked = False
        conn = self.conn
        policy = conn.proxy.policy.current
        cred_name = user = None
        for t in conn.targets():
            cred_name = policy.for_agent(t.credentials, conn.rec.agent)
            user = policy.for_agent(t.upstream_user, conn.rec.agent)
            if cred_name:
                break
        if cred_name:
            cred = conn.proxy.credentials.get(cred_name)
            if cred is None or cred.get("kind") != "postgres" or not cred.get("password"):
                self._fatal("28000", f"interlock: credential '{cred_name}' is missing or not a postgres credential")
                self._flush()
                return
            allow = [m.strip() for m in (cred.get("methods") or "scram-sha-256").split(",") if m.strip()]
            user = user or cred["user"]
            try:
                self.auth = UpstreamAuthenticator(user, cred["password"], allow=allow)
            except ValueError as e:
                self._fatal("28000", f"interlock: credential '{cred_name}': {e}")
                self._flush()
                return
            params = {"user": user, "database": msg.database or ""}
            params.update((k, v) for k, v in msg.params.items()
                          if k not in ("user", "database", "replication") and not k.startswith("_pq_."))
            if self.read_only:
                params["default_transaction_read_only"] = "on"
            self.upstream_startup = wire.startup_message(params)
            unrecognized = tuple(k for k in msg.params if k.startswith("_pq_."))
            if msg.protocol != wire.PROTOCOL_3_0 or unrecognized:
                self.cout.append(wire.NegotiateProtocolVersion(0, unrecognized).encode())
            conn.event("postgres-login", {"mode": "credential", "credential": cred_name, "agent_user": msg.user,
                                          "upstream_user": user, "database": params["database"],
                                          "read_only": self.read_only})
        else:
            # The server reads startup parameters after `options`: this one has the last word.
            self.upstream_startup = wire.StartupMessage(
                {**msg.params, "default_transaction_read_only": "on"}, msg.protocol).encode() if self.read_only else raw
            conn.event("postgres-login", {"mode": "pass-through", "agent_user": msg.user,
                                          "database": msg.database, "read_only": self.read_only})
        self.ss.mode = BYTE
        self.conn.to_server(wire.ssl_request())
        self._flush()

    async def _startup_allowed(self, ops: list[Operation]) -> bool:
        decisions, futs = [], []
        for op in ops:
            d, f = self.conn.judge(op)
            decisions.append(d)
            futs.append(f)
        try:
            await asyncio.gather(*futs)
        except Exception as e:
            self._abort("recorder-error", str(e))
            return False
        d = combine(decisions)
        if d.verdict is Verdict.APPROVE:
            for op, dd in zip(ops, decisions, strict=True):
                if dd.verdict is Verdict.APPROVE and (outcome := await self.conn.hold(op, dd)) != "approved":
                    self._fatal("42501", f"interlock: startup setting not approved ({outcome}) under rule '{dd.rule}'")
                    self._flush()
                    return False
        elif d.verdict is Verdict.DENY:
            self._fatal("42501", f"interlock: startup setting refused by rule '{d.rule}': {d.reason}")
            self._flush()
            return False
        return True

    def _send_startup(self) -> None:
        self.phase = UP_AUTH
        self.conn.to_server(self.utls.encrypt(self.upstream_startup) if self.utls else self.upstream_startup)

    def _login_server(self) -> None:
        ss = self.ss
        while self.phase in (UP_SSL, UP_AUTH, UP_PARAMS, UP_CATALOG):
            seg = ss.next()
            if seg is None:
                return
            kind, mv = seg
            if self.phase == UP_CATALOG:
                self._catalog_message(kind, mv)
                continue
            if self.phase == UP_SSL:
                answer = bytes(mv)
                if answer == b"S":
                    if ss.buffered:
                        raise wire.ProtocolError("the server sent data before the TLS handshake")
                    name = next((n for n in self.conn.names() if not _is_address(n)), None)
                    self.utls = TlsPipe.client(_upstream_tls(), server_hostname=name)
                    self.phase = UP_TLS
                    self.conn.to_server(self.utls.outgoing())
                    return
                if answer != b"N":
                    raise wire.ProtocolError(f"invalid answer to SSLRequest: {answer!r}")
                self._send_startup()
                continue
            msg = wire.parse_backend(wire.Frame(bytes([kind]), 0, mv, 5))
            if self.phase == UP_AUTH:
                self._auth_message(msg, mv)
            else:
                self._params_message(msg, mv)
        if self.phase == READY:
            self._pump_server()
            self._pump_client()

    def _auth_message(self, msg: wire.Message, mv: memoryview) -> None:
        if self.auth is not None:  # the proxy logs in itself
            if isinstance(msg, wire.AuthenticationSASL) and self.utls is not None and self.auth.channel_binding is None:
                der = self.utls.peer_certificate()
                if der:
                    self.auth.channel_binding = ("tls-server-end-point", server_end_point_hash(der))
            reply = self.auth.handle(msg)
            if reply:
                self.sout.append(reply)
            if self.auth.done:
                self.cout.append(wire.authentication_ok())
                self.conn.event("postgres-upstream-auth", {"method": self.auth.method,
                                                           "channel_binding": self.auth.channel_binding is not None})
                self.phase = UP_PARAMS
            return
        if isinstance(msg, wire.ErrorResponse):
            self._server_refused(msg, mv)
            return
        if isinstance(msg, wire.AuthenticationSASL):
            # The agent cannot bind to the server's certificate through this proxy.
            mechs = tuple(m for m in msg.mechanisms if not m.endswith("-PLUS"))
            self.plus_withheld = len(mechs) < len(msg.mechanisms)
            self.cout.append(wire.AuthenticationSASL(mechs).encode())
            return
        if isinstance(msg, wire.AuthenticationOk):
            self.phase = UP_PARAMS
        self.cout.append(mv)

    def _server_refused(self, msg: wire.ErrorResponse, mv: memoryview) -> None:
        """The server's own error during login: the agent gets it as is, then both sides close."""
        self.cout.append(mv)
        self._flush()
        self.phase = DONE
        self.conn.close("refused", f"server: {msg.message}", abort=False)

    def _params_message(self, msg: wire.Message, mv: memoryview) -> None:
        if isinstance(msg, wire.BackendKeyData):
            proxy = self.conn.proxy  # the key names this worker: a cancel may land on another (cancels.py)
            key = cancels.issue_key(len(msg.key), getattr(proxy, "worker", 0), getattr(proxy, "workers", 1))
            self.key = (msg.pid, key)
            cancels.remember(msg.pid, key, self.conn.rec.dst_addr, self.conn.rec.dst_port, msg.key, self)
            self.cout.append(wire.backend_key_data(msg.pid, key))
            return
        if isinstance(msg, wire.ErrorResponse):
            self._server_refused(msg, mv)
            return
        if isinstance(msg, wire.ParameterStatus):
            self.tracker.server(0x53, mv)  # raises UnsafeSetting
        elif isinstance(msg, wire.ReadyForQuery):
            self.tracker.status = msg.status
            self.catalog = catalog.cached(self.catalog_key)
            if self.catalog is None:
                # Read the server's functions first (the agent's messages wait in the splitter).
                self.phase = UP_CATALOG
                self.catalog_rows = []
                self.sout.append(wire.query(catalog.CATALOG_QUERY))
            else:
                self.phase = READY
        elif not isinstance(msg, wire.NoticeResponse | wire.NegotiateProtocolVersion):
            raise wire.ProtocolError(f"unexpected {type(msg).__name__} after authentication")
        self.cout.append(mv)

    def _catalog_message(self, kind: int, mv: memoryview) -> None:
        """The answer to catalog.CATALOG_QUERY, kept from the agent; a failure leaves a catalog
        that knows no function (every call is judged as a `call`)."""
        if kind == 0x44:  # DataRow: one function name
            msg = wire.parse_backend(wire.Frame(b"D", 0, mv, 5))
            if self.catalog_rows is not None and msg.values and msg.values[0] is not None:
                self.catalog_rows.append(bytes(msg.values[0]).decode("utf-8", "replace"))
        elif kind == 0x45:  # ErrorResponse
            msg = wire.parse_backend(wire.Frame(b"E", 0, mv, 5))
            self.conn.event("postgres-catalog-failed", {"error": msg.message})
            self.catalog_rows = None
        elif kind == 0x53:  # ParameterStatus
            self.tracker.server(0x53, mv)
            self.cout.append(mv)
        elif kind == 0x5A:  # ReadyForQuery
            msg = wire.parse_backend(wire.Frame(b"Z", 0, mv, 5))
            self.tracker.status = msg.status
            rows, self.catalog_rows = self.catalog_rows, None
            self.catalog = (catalog.store(self.catalog_key, rows) if rows is not None
                            else catalog.FunctionCatalog())
            self.phase = READY
        elif kind not in (0x54, 0x43, 0x4E):  # RowDescription, CommandComplete, NoticeResponse
            raise wire.ProtocolError(f"unexpected {chr(kind)!r} in the answer to the catalog query")

    def _calls(self, ops: list[Operation]) -> list[Operation]:
        """ops and a `call` for every function they call that may have side effects; a statement
        that may define functions makes every catalog forget (and this one forget the names)."""
        if len(ops) == 1 and ops[0].action not in _DDL_ACTIONS and "functions" not in ops[0].attributes:
            return ops  # the common case: one statement calling nothing
        if self.catalog is None:
            self.catalog = catalog.FunctionCatalog()
        defined = catalog.defines_functions(ops)
        if defined is not None:
            catalog.forget()
            self.catalog.drop(defined)
        return catalog.with_calls(ops, self.catalog)

    # ---- objects the agent created itself -------------------------------------------------------

    def _own(self, ops: list[Operation]) -> list[Operation]:
        """Mark drops and truncates of relations this session created (committed, or in the open
        transaction) with created_in_session=1, for rules with `created_in_session`; forget what
        a statement may rename, drop or hide behind another name (search_path, DISCARD, code the
        proxy cannot see into)."""
        if not (self.owned or self.tx_owned):
            return ops
        mine = self.owned | self.tx_owned
        out = []
        for op in ops:
            a = op.attributes
            if (op.action in _FORGETS_OWNED or "opaque-code" in op.risks or "set_config" in a.get("functions", "")
                    or a.get("setting") in ("search_path", "reset_all") or "discard" in a):
                self.owned.clear()
                self.tx_owned.clear()
                return ops
            if op.objects and ("drop" in op.risks or "truncate" in op.risks) and "cascade" not in a \
                    and all(o in mine for o in op.objects):
                op = Operation(op.protocol, op.action, op.objects, op.risks, op.summary, {**a, "created_in_session": "1"})
            if op.action not in _KEEPS_OWNED:  # dropped, renamed, moved: the name may mean something else next
                self.owned.difference_update(op.objects)
                self.tx_owned.difference_update(op.objects)
            out.append(op)
        return out

    def _note_creations(self, ops: list[Operation], stmts: list[Statement]) -> None:
        index = list(dict.fromkeys(op.attributes.get("statement", "0") for op in ops))
        if len(index) != len(stmts):
            return
        for op in ops:
            made = op.attributes.get("creates")
            if made:
                self.creating[stmts[index.index(op.attributes.get("statement", "0"))]] = made

    def _track_creations(self, finished: list[Statement], status: str) -> None:
        """A creation counts once it succeeded, and stays once its transaction committed: any
        error or ROLLBACK (to a savepoint too) in the transaction forgets what it created."""
        for st in finished:
            made = self.creating.pop(st, None)
            if st.error or st.tag.startswith("ROLLBACK"):
                self.tx_failed = True
            elif made:
                self.tx_owned.add(made)
        if status == "I":
            if not self.tx_failed:
                self.owned |= self.tx_owned
            self.tx_owned.clear()
            self.tx_failed = False
        elif status == "E":
            self.tx_failed = True

    # ---- statements: client side -------------------------------------------------------------

    def _message(self, t: int, mv: memoryview) -> bool:
        """One client message in the statement phase; True when processing must stop here."""
        if self.dropping:
            if t == _S:
                self.dropping = False
                self._sync()
                self.sout.append(mv)
            return False
        if t == _Q:
            return self._query(mv)
        if t == _P:
            return self._parse(mv)
        if t == _B:
            return self._bind(mv)
        if t == _E:
            return self._execute(mv)
        if t == _D:
            kind, name = kind_and_name(mv, "Describe")
            if kind == "S":
                e = self.tracker.push(DESC_S)
                e.prepared = self.statements.get(name) or PreparedStatement("", "", "", None)
                e.prepared.described = True
            else:
                e = self.tracker.push(DESC_P)
                e.portal = self.portals.get(name) or Portal(PreparedStatement("", "", "", None), (), [])
                e.portal.described = True
        elif t == _C:
            kind, name = kind_and_name(mv, "Close")
            (self.statements if kind == "S" else self.portals).pop(name, None)
            self.tracker.push(CLOSE)
        elif t == _S:
            self._sync()
        elif t == _c or t == _f:  # CopyDone, CopyFail: the server heeds Syncs again after it
            self.tracker.copy_end()
        elif t == _F:
            f = wire.parse_frontend(wire.Frame(b"F", 0, mv, 5))
            op = Operation("postgres", "function-call", (f"oid {f.function_oid}",), ("opaque-code",),
                           f"FunctionCall oid {f.function_oid}")
            self._refuse([op], [BUILTIN_FUNCTION_CALL], [self._record_builtin(op, BUILTIN_FUNCTION_CALL)],
                         simple=True)
            return False
        self.sout.append(mv)
        return False

    def _sync(self) -> None:
        e = self.tracker.push(SYNC_K)
        if e is not None and self.window_next_sync:  # (None: a Sync the server ignores in COPY-in)
            self.window, self.window_next_sync = e, False

    def _judge(self, ops: list[Operation]) -> tuple[list[Decision], asyncio.Future | None]:
        """Decisions for a statement's operations, and the future of the last one recorded (None
        when nothing new had to be: see `_known`)."""
        decisions: list[Decision] = []
        last = None
        for op in ops:
            if self.read_only and "read-write" in op.risks:
                d = self.read_only_decision
                last = self._record_builtin(op, d)
                decisions.append(d)
                continue
            d = self._known(op)
            if d is None:
                d, last = self.conn.judge(op)
                if op.action == "unparseable" and d.verdict is not Verdict.DENY:
                    d = BUILTIN_UNPARSEABLE
                    last = self._record_builtin(op, d)
                elif d.verdict in (Verdict.ALLOW, Verdict.MASK):
                    self._remember(op, d)
            decisions.append(d)
        return decisions, last

    def _known(self, op: Operation) -> Decision | None:
        """An allow or mask this session already has on record for the same operation (action,
        objects, risks) under the same rule of the same policy: it is not written again before
        the statement runs. Each statement's own record, with its verdict and rule, follows when
        its result is in. Refusals and holds are always judged and recorded first."""
        policy = self.conn.proxy.policy.current
        if self.dest is None:
            rec = self.conn.rec
            self.dest = Destination(rec.dst_addr, rec.dst_port, self.conn.names(), rec.protocol)
        d = policy.decide(self.conn.rec.agent, self.dest, op)
        if (id(policy), op.protocol, op.action, op.objects, op.risks, d.verdict, d.rule) in self.known:
            return d
        return None

    def _remember(self, op: Operation, d: Decision) -> None:
        if len(self.known) >= MAX_PREPARED:
            self.known.clear()
            self.plans.clear()
        self.known.add((id(self.conn.proxy.policy.current), op.protocol, op.action, op.objects, op.risks, d.verdict,
                        d.rule))

    def _plan(self, key: object) -> _Plan | None:
        """The judgement this session made of a statement text with the same Analyzer.key, when
        nothing since can change it: the same policy object (a reload makes a new one), the same
        valid identity binding of the agent, and no relation of the session's own that a rule with
        created_in_session could care about."""
        if key is None or self.owned or self.tx_owned:
            return None
        policy = self.conn.proxy.policy.current
        # The agent's bound identity is the other input decide() has: a token that expired or was
        # refused refuses everything from now on, and another binding may match other rules.
        ident = policy.identity(self.conn.rec.agent)
        bound = None
        if ident is not None:
            if ident.refusal() is not None:
                return None
            bound = ident.key
        if policy is not self.plans_policy or bound != self.plans_bound:
            self.plans.clear()
            self.plans_policy, self.plans_bound = policy, bound
            return None
        return self.plans.get(key)

    def _keep_plan(self, key: object, analyzed: list[Operation], ops: list[Operation], decisions: list[Decision],
                   fut: asyncio.Future | None, d: Decision) -> None:
        """Remember a judgement for _plan: only the common case of one operation the analyzer
        gave as is (no function calls, nothing the session owns), allowed or masked, whose
        decision was already on record (no write was needed for it: see _known). Refusals and
        holds are never remembered: each is judged and recorded again."""
        if (key is None or fut is not None or ops is not analyzed or len(ops) != 1
                or d.verdict not in (Verdict.ALLOW, Verdict.MASK) or self.read_only and "read-write" in ops[0].risks
                or "creates" in ops[0].attributes or changes_parsing(ops)
                or self.conn.proxy.policy.current is not self.plans_policy):
            return
        if len(self.plans) >= MAX_PREPARED:
            self.plans.clear()
        self.plans[key] = _Plan(tuple(decisions), d.verdict.value, d.rule, mask_spec(decisions))

    def _record_builtin(self, op: Operation, d: Decision) -> asyncio.Future:
        return self.conn.proxy.recorder.decision(self.conn.rec.id, op, d)

    def _statements(self, ops: list[Operation], decisions: list[Decision]) -> list[Statement]:
        """One record per top-level statement of a query string, with its own verdict."""
        if len(ops) == 1:  # the common case
            d = decisions[0]
            return [Statement(ops[0].summary, d.verdict.value, d.rule, mask=mask_spec(decisions))]
        groups: dict[str, list[int]] = {}
        for i, op in enumerate(ops):
            groups.setdefault(op.attributes.get("statement", "0"), []).append(i)
        out = []
        for idx in groups.values():
            ds = [decisions[i] for i in idx]
            d = combine(ds)
            out.append(Statement(ops[idx[0]].summary, d.verdict.value, d.rule, mask=mask_spec(ds)))
        return out

    def _query(self, mv: memoryview) -> bool:
        sql = _query_text(mv, self.tracker.codec)
        self._simple_refusal = True
        if self._in_window(sql, "query text during a settings change"):
            return False
        analyzed = self.analyzer.analyze(sql)
        if not analyzed:
            self.tracker.query([])
            self.sout.append(mv)
            return False
        key = self.analyzer.key
        plan = self._plan(key)
        if plan is not None:
            self.tracker.query([Statement(analyzed[0].summary, plan.verdict, plan.rule, mask=plan.mask)])
            self.sout.append(mv)
            return False
        ops = self._own(self._calls(analyzed))
        decisions, fut = self._judge(ops)
        stmts = self._statements(ops, decisions)
        if any("creates" in op.attributes for op in ops):
            self._note_creations(ops, stmts)
        d = combine(decisions)
        self._keep_plan(key, analyzed, ops, decisions, fut, d)
        if d.verdict is Verdict.DENY:
            self._refuse(ops, decisions, [fut], simple=True, stmts=stmts, sql=sql)
            return False
        if d.verdict is Verdict.APPROVE:
            self._hold(_Pending(_Q, bytes(mv), stmts, ops, decisions), fut)
            return True
        self._gate(fut)
        self._send_query(mv, stmts, ops)
        return False

    def _send_query(self, data: bytes | memoryview, stmts: list[Statement], ops: list[Operation]) -> None:
        e = self.tracker.query(stmts)
        self.sout.append(data)
        if changes_parsing(ops):
            self.window = e

    def _in_window(self, sql: str, ops_or_summary: str) -> bool:
        """Refuse text that could read differently while a parsing-settings change is pending,
        or that does read differently under standard_conforming_strings=off now in effect."""
        if self.window is None and not self.window_next_sync:
            if "\\" not in sql or self.tracker.params.get("standard_conforming_strings", "on").lower() != "off":
                return False
            if reading.same_reading(sql):
                return False
            decision, ops_or_summary = BUILTIN_MISREAD, "text whose backslashes read differently under " \
                "standard_conforming_strings=off"
        elif not ambiguous(sql):
            return False
        else:
            decision = BUILTIN_AMBIGUOUS
        op = Operation("postgres", "unparseable", (), ("unparseable",), ops_or_summary)
        self._refuse([op], [decision], [self._record_builtin(op, decision)], simple=self._simple_refusal)
        return True

    def _refuse(self, ops: list[Operation], decisions: list[Decision], futs: list, *, simple: bool,
                stmts: list[Statement] | None = None, outcome: str = "", sql: str = "") -> None:
        """Send the stand-in that fails server-side, and record the refusal. Text that does not
        parse gets the server's own syntax error; anything else Interlock's refusal."""
        d = combine(decisions)
        for fut in futs:
            if fut is not None:
                self._gate(fut)
        err = (None if outcome else syntax_error(ops, sql)) or refusal_error(d, outcome)
        why = f"refused: {outcome}" if outcome else f"refused by rule {d.rule}"
        for st in stmts or [Statement(ops[0].summary if ops else "", d.verdict.value, d.rule)]:
            st.finish(error=why if st.verdict in ("deny", "approve") else "not run: the query string was refused")
            self.tracker.finished.append(st)
        self.sout.append(self.tracker.refusal(err, [], simple))
        if not simple:
            self.dropping = True

    def _parse(self, mv: memoryview) -> bool:
        name, sql, param_types = parse_fields(mv, self.tracker.codec)
        self._simple_refusal = False
        if self._in_window(sql, "statement text during a settings change"):
            return False
        analyzed = self.analyzer.register_prepared(name, sql)
        key = self.analyzer.key
        if analyzed and (plan := self._plan(key)) is not None:
            if len(self.statements) >= MAX_PREPARED and name not in self.statements:
                raise wire.ProtocolError(f"more than {MAX_PREPARED} prepared statements")
            self.statements[name] = PreparedStatement(analyzed[0].summary, plan.verdict, plan.rule, plan.mask,
                                                      tuple(analyzed), plan.decisions, param_types, plain=True)
            self.tracker.push(PARSE)
            self.sout.append(mv)
            return False
        if not analyzed:  # an empty statement: nothing runs
            analyzed = [Operation("postgres", "other", (), (), "", {"statement": "0"})]
            key = None
        ops = self._own(self._calls(analyzed))
        decisions, fut = self._judge(ops)
        d = combine(decisions)
        self._keep_plan(key, analyzed, ops, decisions, fut, d)
        summary = ops[0].summary
        if d.verdict is Verdict.DENY:
            self._refuse(ops, decisions, [fut], simple=False,
                         stmts=[Statement(summary, d.verdict.value, d.rule)], sql=sql)
            return False
        if len(self.statements) >= MAX_PREPARED and name not in self.statements:
            raise wire.ProtocolError(f"more than {MAX_PREPARED} prepared statements")
        self.statements[name] = PreparedStatement(summary, d.verdict.value, d.rule, mask_spec(decisions),
                                                  tuple(ops), tuple(decisions), param_types)
        self._gate(fut)
        self.tracker.push(PARSE)
        self.sout.append(mv)
        return False

    def _bind(self, mv: memoryview) -> bool:
        portal, statement, pformats, params, rformats = bind_fields(mv)
        ps = self.statements.get(statement)
        if ps is None:
            ps = self._sql_prepared(statement)
            if ps is None:
                return False  # refused
        if len(self.portals) >= MAX_PREPARED and portal not in self.portals:
            raise wire.ProtocolError(f"more than {MAX_PREPARED} portals")
        self.portals[portal] = Portal(ps, rformats, masked_params(params, pformats, ps.param_types))
        self.tracker.push(BIND)
        self.sout.append(mv)
        return False

    def _sql_prepared(self, name: str) -> PreparedStatement | None:
        """A statement made with SQL PREPARE, bound through the protocol: judged again now (what
        EXECUTE would run); one the proxy never saw is refused."""
        candidates = self.analyzer.sql.prepared.get(name)
        if not candidates:
            op = Operation("postgres", "unparseable", (), ("unparseable",), f"Bind to unknown statement {name!r}")
            self._refuse([op], [BUILTIN_UNPARSEABLE], [self._record_builtin(op, BUILTIN_UNPARSEABLE)], simple=False)
            return None
        ops = self._own(self._calls([op for group in candidates for op in group]))
        decisions, fut = self._judge(ops)
        d = combine(decisions)
        if d.verdict is Verdict.DENY:
            self._refuse(ops, decisions, [fut], simple=False)
            return None
        self._gate(fut)
        ps = PreparedStatement(ops[0].summary, d.verdict.value, d.rule, mask_spec(decisions), tuple(ops),
                               tuple(decisions))
        self.statements[name] = ps
        return ps

    def _execute(self, mv: memoryview) -> bool:
        name = execute_portal(mv)
        portal = self.portals.get(name)
        if portal is None:
            # A portal this proxy did not see bound (a cursor from SQL DECLARE): refuse rather than
            # run something whose rows it cannot describe.
            op = Operation("postgres", "unparseable", (), ("unparseable",), f"Execute of unknown portal {name!r}")
            self._refuse([op], [BUILTIN_UNPARSEABLE], [self._record_builtin(op, BUILTIN_UNPARSEABLE)], simple=False)
            return False
        ps = portal.statement
        st = Statement(ps.summary, ps.verdict, ps.rule, portal.params, mask=ps.mask)
        made = None if ps.plain else next((op.attributes["creates"] for op in ps.ops if "creates" in op.attributes),
                                          None)
        if made:
            self.creating[st] = made
        if ps.verdict == "approve":
            pending = _Pending(_E, bytes(mv), [st], list(ps.ops), list(ps.decisions))
            pending.portal = portal
            self._hold(pending, None)
            return True
        self._run_execute(mv, portal, st)
        return False

    def _run_execute(self, mv: bytes | memoryview, portal: Portal, st: Statement) -> None:
        if st.mask is not None and not portal.described and not portal.statement.described:
            # Rows to mask need their columns: ask for them, and keep the answer from the agent.
            name = bytes(mv[5:-5])
            e = self.tracker.push(DESC_P)
            e.portal, e.injected = portal, True
            self.sout.append(b"D" + (len(name) + 6).to_bytes(4, "big") + b"P" + name + b"\0")
        self.tracker.execute(portal, st)
        self.sout.append(mv)
        if not portal.statement.plain and changes_parsing(portal.statement.ops):
            self.window_next_sync = True

    # ---- holds ---------------------------------------------------------------------------------

    def _hold(self, pending: _Pending, fut: asyncio.Future | None) -> None:
        self.blocked = True
        self.conn.pause_client()
        pending.record = fut
        self.hold_task = self.conn.spawn(self._wait_for_human(pending))

    def cancel_hold(self) -> bool:
        """The agent sent a CancelRequest: a statement waiting for a human is given up."""
        if self.blocked and self.hold_task is not None and not self.hold_task.done() and self.phase == READY:
            self.hold_canceled = True
            self.hold_task.cancel()
            return True
        return False

    async def _wait_for_human(self, p: _Pending) -> None:
        try:
            outcome = await self._ask_humans(p)
        except asyncio.CancelledError:
            if self.phase == DONE or not self.hold_canceled:
                raise
            outcome = "canceled"
        except Exception as e:
            self._abort("recorder-error", str(e))
            return
        if self.phase == DONE:
            return
        self.blocked = self.hold_canceled = False
        self.hold_task = None
        if outcome == "approved":
            for st in p.stmts:
                st.started = time.monotonic()
                st.rule = st.rule + " (approved)" if st.verdict == "approve" else st.rule
            if p.kind == _Q:
                self._send_query(p.data, p.stmts, p.ops)
            else:
                self._run_execute(p.data, p.portal, p.stmts[0])
        else:
            d = next(d for d in p.decisions if d.verdict is Verdict.APPROVE)
            self._refuse(p.ops, [d], [], simple=p.kind == _Q, stmts=p.stmts, outcome=outcome)
        self.conn.resume_client()
        self._safely(lambda _: self._pump_client(), b"", "client")

    async def _ask_humans(self, p: _Pending) -> str:
        if p.record is not None:
            await p.record
        for op, d in zip(p.ops, p.decisions, strict=True):
            if d.verdict is Verdict.APPROVE:
                outcome = await self.conn.hold(op, d)
                if outcome != "approved":
                    return outcome
        return "approved"

    # ---- statements: server side --------------------------------------------------------------

    def _pump_server(self) -> None:
        ss, tr, out = self.ss, self.tracker, self.cout
        while True:
            ss.stream = tr.stream
            seg = ss.next()
            if seg is None:
                break
            kind, mv = seg
            if kind == RAW:
                out.append(mv)
                continue
            r = tr.server(kind, mv)
            if r is not None:
                out.append(r)
        if tr.finished and (self.creating or self.tx_owned):
            self._track_creations(tr.finished, tr.status)
        if tr.finished:
            self._record()
        if self.window is not None and self.window not in tr.queue:
            self.window = None  # its ReadyForQuery (and any ParameterStatus before it) is in


CHANNEL_BINDING_ADVICE = (
    "interlock: SCRAM channel binding cannot pass through Interlock, which ends the agent's TLS itself; the "
    "client announced it can bind (libpq's channel_binding=prefer over TLS) and the server would refuse the "
    "login as a downgrade. Fix: store a credential for this target (`interlock credentials set NAME --kind "
    "postgres`, named in the target's `credentials`) so Interlock logs in with channel binding itself, or "
    "connect with channel_binding=disable")


def _binds_tls(mv: memoryview) -> bool:
    """Whether a SASLInitialResponse is SCRAM with the gs2 flag 'y' ("I can bind, the server
    cannot"), which a server that offered SCRAM-SHA-256-PLUS rejects (RFC 5802 section 6)."""
    body = bytes(mv[5:])
    end = body.find(b"\0")
    if end < 0 or not body[:end].startswith(b"SCRAM-SHA-256") or len(body) < end + 6:
        return False
    return body[end + 5:end + 6] == b"y"


def _query_text(mv: memoryview, encoding: str = "utf-8") -> str:
    """A Query message's SQL, read in the client's encoding."""
    body = mv[5:].tobytes()
    if not body.endswith(b"\0") or b"\0" in body[:-1]:
        raise wire.ProtocolError("Query: the SQL text is not one NUL-terminated string")
    return body[:-1].decode(encoding, "surrogateescape")


def _join(parts: list) -> bytes:
    if len(parts) == 1:
        p = parts[0]
        if isinstance(p, bytes):
            return p
        if isinstance(p, memoryview) and isinstance(p.obj, bytes) and len(p) == len(p.obj):
            return p.obj
    return b"".join(parts)


def _is_address(name: str) -> bool:
    return name.replace(".", "").isdigit() or ":" in name
