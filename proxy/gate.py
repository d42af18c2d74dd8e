"""What the proxy consults before it lets an operation through: the policy in force, the names
each agent has bound to an address through the resolver, and the approvals being waited on."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from policy.document import read_text
from policy.engine import Policy, PolicyError, load, load_default
from policy.model import Decision, Operation, Verdict
from proxy.workers import SharedGeneration, SharedNames
from recorder import approvals
from recorder.store import Recorder, SessionRecord

if TYPE_CHECKING:
    from proxy.server import Proxy

APPROVAL_POLL = 0.1


class PolicyHolder:
    """The policy in force. A reload that fails validation keeps the old one and says why.

    With several proxy workers, a worker that loads a new policy bumps the shared generation
    (proxy/workers.py), publishing the text it validated, before it records `policy-loaded`; every
    other worker loads that text (not the file, which may have changed since) before its next
    decision, so no worker judges by a policy a sibling has replaced."""

    def __init__(self, path: str | None, recorder: Recorder, on_load: Callable[[int], None] | None = None,
                 identity_of: Callable[[str], object | None] | None = None,
                 generation: SharedGeneration | None = None):
        self.path = path
        self.recorder = recorder
        self.on_load = on_load
        self.identity_of = identity_of  # agent -> its bound identity (identity/agents.py), for every policy loaded
        self.generation = generation
        self._seen = generation.value if generation is not None else 0
        self._current: Policy = load(path) if path else load_default()
        self._mtime = self._stat()
        self._loaded()

    @property
    def current(self) -> Policy:
        g = self.generation
        if g is not None and g.value != self._seen:
            self._follow()
        return self._current

    def _follow(self) -> None:
        """A sibling worker loaded a new policy: load the text it validated and published."""
        self._seen = self.generation.value
        self._mtime = self._stat()
        try:
            self._current = load(self.path, self.generation.published())
        except PolicyError as e:  # only a file read without a published text can fail here
            self.recorder.event("policy-rejected", {"file": self.path, "problems": e.problems})
            return
        self._loaded()

    def _loaded(self) -> None:
        if self.identity_of is not None:
            self._current.identity_of = self.identity_of
        if self.on_load is not None:
            self.on_load(len(self._current.rules))

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime if self.path else None
        except OSError:
            return None

    def reload(self) -> bool:
        if not self.path:
            return False
        try:
            text = read_text(self.path)  # the exact text validated is what siblings follow
            new = load(self.path, text)
        except PolicyError as e:
            self.recorder.event("policy-rejected", {"file": self.path, "problems": e.problems})
            return False
        self._current = new
        if self.generation is not None:
            self._seen = self.generation.publish(text)
        self._loaded()
        self.recorder.event("policy-loaded", {"file": self.path, "rules": len(new.rules)})
        return True

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            m = self._stat()
            if m is not None and m != self._mtime:
                self._mtime = m
                self.reload()


class DecisionCache:
    """One connection's (one session's) allowed decisions by operation shape, for the policy in force.

    A protocol handler asks the policy the same question for every request or statement of a
    kept-alive connection. `shape` is whatever the protocol computes from an operation that
    determines both the Operation it builds and every input of Policy.decide (HTTP: method,
    target, Host, the headers rules name, the names the request counts under); the entry holds
    the Operation, the Decision and the decision's record, encoded once. Only allow and mask are
    kept: a refusal or a hold is judged and recorded durably, and awaited, every time. A policy
    reload makes a new Policy object; a lookup under another object than the entries were made
    under empties the cache first, so nothing decided under an old policy is ever served."""

    __slots__ = ("policy", "entries", "size")

    def __init__(self, size: int = 256):
        self.policy: Policy | None = None
        self.entries: dict[tuple, tuple[Operation, Decision, str]] = {}
        self.size = size

    def get(self, policy: Policy, shape: tuple) -> tuple[Operation, Decision, str] | None:
        if policy is not self.policy:
            self.policy = policy
            self.entries.clear()
            return None
        return self.entries.get(shape)

    def put(self, policy: Policy, shape: tuple, op: Operation, decision: Decision, record: str) -> None:
        if decision.verdict not in (Verdict.ALLOW, Verdict.MASK):
            return
        if policy is not self.policy:
            self.policy = policy
            self.entries.clear()
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[shape] = (op, decision, record)


class NameBindings:
    """Per agent, the names it resolved through Interlock's resolver and the addresses they
    resolved to, each until its answer's TTL runs out (within [MIN_TTL, MAX_TTL]).

    A hostname target matches a connection only by a name bound to the dialled address for
    that agent (or one the upstream certificate proves, in intercept mode): an SNI or Host
    header alone is the agent's word, not evidence of where the connection goes."""

    MIN_TTL = 30.0  # stubs and libraries keep an answer a little past a short TTL
    MAX_TTL = 86400.0

    def __init__(self, size: int = 65536, clock=time.monotonic, shared: SharedNames | None = None):
        self._by: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self.size = size
        self.clock = clock
        self.shared = shared  # with several proxy workers: what every worker's resolver bound

    def bind(self, agent: str, name: str, address: str, ttl: float) -> None:
        ttl = min(max(float(ttl), self.MIN_TTL), self.MAX_TTL)
        name, address, until = name.lower().rstrip("."), _norm_addr(address), self.clock() + ttl
        if self.shared is not None:
            try:
                self.shared.push(agent, address, name, until)  # committed before the agent has the answer
            except sqlite3.Error:
                pass  # bound in this worker only: on another, the connection is judged by its address
        self._merge(agent, address, name, until)

    def _merge(self, agent: str, address: str, name: str, until: float) -> None:
        key = (agent, address)
        names = self._by.pop(key, {})
        names[name] = max(until, names.get(name, 0.0))
        self._by[key] = names
        while len(self._by) > self.size:
            self._by.popitem(last=False)

    def names(self, agent: str, address: str) -> tuple[str, ...]:
        """The names bound to address for agent, now (by any worker's resolver)."""
        if self.shared is not None:
            try:
                rows = self.shared.pull()
            except sqlite3.Error:
                rows = []  # what this worker has: a name it lacks counts for nothing (judged by address)
            for row in rows:
                self._merge(*row)
        names = self._by.get((agent, _norm_addr(address)))
        if not names:
            return ()
        now = self.clock()
        live = tuple(sorted(n for n, until in names.items() if until > now))
        if len(live) != len(names):
            for n in [n for n, until in names.items() if until <= now]:
                del names[n]
        return live

    def bound(self, agent: str, name: str, address: str) -> bool:
        return name.lower().rstrip(".") in self.names(agent, address)


def _norm_addr(address: str) -> str:
    """One spelling per address: the v4-mapped form an IPv6 socket dials is the IPv4 address."""
    a = address.lower().split("%")[0]
    return a[7:] if a.startswith("::ffff:") and "." in a else a


class Holds:
    """Operations waiting for a human. One poller reads the answers for all of them."""

    def __init__(self, proxy: Proxy, loop: asyncio.AbstractEventLoop):
        self.proxy = proxy
        self.loop = loop
        self.waiting: dict[str, tuple[asyncio.Future, float]] = {}
        self.since: dict[str, float] = {}  # approval id -> when it was held (monotonic)
        self._poller: asyncio.Task | None = None
        # session id -> the rule whose hold a human approved for the connection itself
        self._connection_approved: OrderedDict[str, str] = OrderedDict()

    def _covered_by_connection_approval(self, rec: SessionRecord, decision: Decision, op: Operation) -> bool:
        """One operation, one hold: a rule that names no operation detail (`Rule.whole_connection`)
        holds the connection once; the requests or statements on that connection that the same
        rule matches again were part of what the human approved."""
        if op.action == "connect" or self._connection_approved.get(rec.id) != decision.rule:
            return False
        rule = self.proxy.policy.current.rule(decision.rule)
        return rule is not None and rule.whole_connection

    async def wait(self, rec: SessionRecord, decision: Decision, op: Operation) -> str:
        """'approved', 'denied' or 'expired' (an approvals.Outcome carrying a denial's reason)."""
        conn = self.proxy.recorder.conn
        if self._covered_by_connection_approval(rec, decision, op):
            self.proxy.recorder.event("approval-granted", {"rule": decision.rule, "by": "the connection's approval",
                                                            "summary": op.summary}, rec.id)
            return approvals.APPROVED
        dest = f"{rec.dst_addr}:{rec.dst_port}"
        grant = approvals.granted(conn, rec.agent, dest, op.protocol, op.action, op.objects)
        if grant:
            self.proxy.recorder.event("approval-granted", {"approval": grant, "by": "standing grant"}, rec.id)
            self._remember(rec, decision, op, approvals.APPROVED)
            return approvals.APPROVED
        timeout = decision.approval_timeout or 300.0
        try:
            approval_id = approvals.request(conn, approvals.HeldOperation(
                rec.id, rec.agent, dest, op.protocol, op.action, op.objects, op.summary, decision.rule,
                decision.reason, timeout, json.dumps(decision.approvers) if decision.approvers else ""))
        except sqlite3.Error as e:  # no pending approval on record: nobody could answer it
            self.proxy.recorder.fail(e, [])
            return "recorder-error"
        self.proxy.recorder.event("approval-requested", {"approval": approval_id, "rule": decision.rule,
                                                          "summary": op.summary, "timeout": timeout}, rec.id)
        fut = self.loop.create_future()
        self.waiting[approval_id] = (fut, time.monotonic() + timeout)
        self.since[approval_id] = time.monotonic()
        if self._poller is None or self._poller.done():
            self._poller = self.loop.create_task(self._poll())
        outcome, by, note = await fut
        data = {"approval": approval_id, "by": by} | ({"reason": note} if note else {})
        self.proxy.recorder.event("approval-" + outcome, data, rec.id)
        self._remember(rec, decision, op, outcome)
        return approvals.Outcome(outcome, note)

    def _remember(self, rec: SessionRecord, decision: Decision, op: Operation, outcome: str) -> None:
        if outcome == approvals.APPROVED and op.action == "connect":
            self._connection_approved[rec.id] = decision.rule
            while len(self._connection_approved) > 4096:
                self._connection_approved.popitem(last=False)

    def oldest_age(self) -> float:
        """Seconds the longest-waiting hold has waited (0 with none); read by the metrics thread."""
        since = list(self.since.values())
        return time.monotonic() - min(since) if since else 0.0

    async def _poll(self) -> None:
        conn = self.proxy.recorder.conn
        while self.waiting:
            await asyncio.sleep(APPROVAL_POLL)
            now = time.monotonic()
            for approval_id, (status, by, note) in approvals.statuses(conn, list(self.waiting)).items():
                fut, deadline = self.waiting[approval_id]
                if status == approvals.PENDING and now >= deadline:
                    try:
                        expired = approvals.expire(conn, approval_id)
                    except sqlite3.Error as e:  # cannot mark it expired: refuse it all the same
                        self.proxy.recorder.fail(e, [])
                        expired = True
                    if expired:
                        status, by = approvals.EXPIRED, "timeout"
                if status != approvals.PENDING:
                    del self.waiting[approval_id]
                    self.since.pop(approval_id, None)
                    if not fut.done():
                        fut.set_result((status, by, note))
