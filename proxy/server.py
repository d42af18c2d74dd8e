"""The proxy process: listeners on loopback for redirected TCP and DNS, one uvloop loop.

Started and supervised by the daemon; it dies with the daemon (PR_SET_PDEATHSIG), so a killed
daemon leaves agents pointed at a closed port rather than at an unsupervised proxy.

Recording is a precondition of the data path: a connection is admitted only while the recorder
can write, its first byte goes upstream only after its session row is committed, and when the
recorder fails every open agent connection is cut. The recorder's state goes to the daemon as
JSON lines on the pipe that said "ready" (for `interlock status`)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import uvloop

import proxy.protocols  # noqa: F401  (registers the protocol handlers)
from classifier import LABELS
from credentials.store import CredentialStore
from identity.agents import IdentityBook
from interceptor import logs
from interceptor.config import Config, load
from interceptor.layout import Layout
from policy.engine import IDENTITY_RULE, Destination, set_identity_source
from policy.model import Decision, Operation, Verdict
from proxy import inbound
from proxy import workers as workers_mod
from proxy.gate import Holds, NameBindings, PolicyHolder
from proxy.limits import Limits
from proxy.metrics import ProxyMetrics
from proxy.origins import Origins
from proxy.postgres import cancels as pg_cancels
from proxy.relay import AgentSide
from proxy.resolver import Resolver, system_nameserver
from proxy.tls.ca import CertificateAuthority, LeafMinter, write_bundle
from proxy.workers import SharedCounts, SharedGeneration, SharedHold, SharedNames, SharedStamp
from recorder import approvals
from recorder.store import Health, Recorder, RecorderDown, SessionRecord, new_session_id

PR_SET_PDEATHSIG = 1
LOOPBACKS = ("127.0.0.1", "::1")
COUNT_FLUSH_INTERVAL = 1.0  # seconds: how stale an open session's byte counts may be on disk


class Proxy:
    def __init__(self, config: Config, layout: Layout, loop: asyncio.AbstractEventLoop, worker: int = 0,
                 workers: int = 1):
        self.config = config
        self.layout = layout
        self.loop = loop
        self.worker, self.workers = worker, workers  # this process's index among the proxy workers
        self.origins = Origins(layout.pin_dir)
        shared = workers > 1  # state every worker must see the same (proxy/workers.py)
        # one checkpointer for the database the workers share; every worker holds its commits for it
        self.recorder = Recorder(layout.db, loop, who="proxy", on_health=self._recorder_health,
                                 hold=SharedHold(workers_mod.commit_hold_file(layout.run_dir)) if shared else None,
                                 checkpoint=worker == 0)
        approvals.ensure_schema(self.recorder.db)
        self.metrics = ProxyMetrics()
        self.recorder.writer.on_commit = self.metrics.committed
        self.recorder.on_session_close = lambda r: self.metrics.session_closed(r.agent, r.protocol, r.outcome,
                                                                               r.bytes_up, r.bytes_down)
        # Sessions this worker's predecessor left open were cut when it died: say so, with the
        # byte counts it last flushed (COUNT_FLUSH_INTERVAL). The daemon closes out every open
        # session before it starts a new group of workers.
        self.recorder.close_out("proxy-died", "the proxy relaying it stopped without closing it (killed or crashed);"
                                " byte counts as last flushed", worker=worker)
        # Open agent connections by session id: the transport (cut if the recorder fails) and the
        # future of the session row's commit (awaited before the first byte goes upstream).
        self.live: dict[str, tuple[asyncio.BaseTransport, asyncio.Future]] = {}
        self.status_fd: int | None = None
        self._reported: dict | None = None
        self.policy = PolicyHolder(config.policy, self.recorder, on_load=self.metrics.policy_loaded,
                                   generation=SharedGeneration(workers_mod.generation_file(layout.run_dir))
                                   if shared else None)
        self.names = NameBindings(shared=SharedNames(workers_mod.names_db(layout.run_dir),
                                                                workers_mod.names_version_file(layout.run_dir)) if shared else None)
        self.credentials = CredentialStore(layout.state_dir)
        # Agents' verified OIDC identities, as the daemon bound them at enrolment (identity/agents.py):
        # every policy this process loads asks them.
        self.identities = IdentityBook(layout.identities_file)
        set_identity_source(self.identities.get)
        # Our interception CA (state_dir/ca, key 0600) and the leaf certificates it mints per
        # name: what the TLS-terminating handlers (PostgreSQL sslmode, HTTPS) present to agents.
        self.ca = CertificateAuthority.load_or_create(layout.state_dir / "ca")
        self.leaves = LeafMinter(self.ca)
        if worker == 0:  # the daemon starts worker 0 first, alone: one writer for the CA and bundles
            # What `interlock run` points agents' trust stores at (system CAs + ours).
            write_bundle(self.ca, layout.ca_bundle)
            write_bundle(self.ca, layout.ca_cert, system_bundle=None)  # ours alone: NODE_EXTRA_CA_CERTS
        self.holds = Holds(self, loop)
        self.metrics.watch(holds_pending=lambda: len(self.holds.waiting), hold_oldest=self.holds.oldest_age,
                           recorder_queue=lambda: len(self.recorder.writer.batch),
                           lockdown_file=layout.state_dir / "lockdown", recorder_health=self.recorder.health)
        self.spool = None  # the shipping spool's bound (fail closed when the central recorder lags)
        if config.recorder is not None:
            from recorder.shipper import SpoolBound

            self.spool = SpoolBound(self.recorder, config.recorder.server, config.recorder.spool_max,
                                    SharedStamp(workers_mod.spool_trip_file(layout.run_dir)) if shared else None)
            self.metrics.watch_spool(lambda: self.spool.last)
        self.metrics_dump: Path | None = None  # where a worker other than 0 leaves its metrics
        if config.metrics_address and worker == 0:
            self.metrics.serve(config.metrics_address, self._sibling_metrics if shared else None)
        elif config.metrics_address:
            self.metrics_dump = workers_mod.metrics_file(layout.run_dir, worker)
        self._agent_names: dict[int, str] = {}
        self._identity_json: dict[str, tuple] = {}  # agent -> (its binding, record_json())
        self._agent_ids: dict[str, int] = {}
        # per-agent connection caps (over every worker), idle sweep
        self.limits = Limits(config, loop, SharedCounts(workers_mod.counts_file(layout.run_dir), worker, workers)
                             if shared else None, self._agent_ids.__getitem__)
        self._early: dict[tuple, Decision | None] = {}
        self._own = {self.config.proxy_port, self.config.dns_port, self.config.inbound_port}
        self.inbound_owners = inbound.Owners(layout.pin_dir, layout.agents_cgroup, config.mark)

    def judge(self, rec: SessionRecord, op: Operation | None = None,
              names: tuple[str, ...] = ()) -> tuple[Decision, asyncio.Future]:
        """Ask the policy about an operation (the connection itself when none is given). The
        future resolves once the decision is on record: act only after it."""
        op = op or _connect_op(rec)
        dest = Destination(rec.dst_addr, rec.dst_port, names, rec.protocol)
        decision = self.policy.current.decide(rec.agent, dest, op)
        self.metrics.operation(rec.agent, op.protocol, decision.verdict.value)
        return decision, self.recorder.decision(rec.id, op, decision)

    def early_decision(self, rec: SessionRecord) -> Decision | None:
        """The connect decision when it is the same whatever the protocol turns out to be, and lets
        the connection through; None when the proxy must see the first bytes first. Such a
        decision is recorded on the session row itself (verdict, rule), not as an event."""
        policy = self.policy.current
        names = self.names.names(rec.agent, rec.dst_addr)
        ident = self.identities.get(rec.agent)
        key = (id(policy), rec.agent, rec.dst_addr, rec.dst_port, names, ident.key if ident is not None else None)
        hit = self._early.get(key, _MISS)
        if hit is not _MISS:
            return hit
        early = None
        # Hostname targets can match on the SNI or Host the first bytes carry: no early answer then.
        hostnames = any(t.hostnames for t in policy.targets.values())
        decisions = set() if hostnames else {
            policy.decide(rec.agent, Destination(rec.dst_addr, rec.dst_port, names, p),
                          Operation(p, "connect", (f"{rec.dst_addr}:{rec.dst_port}",))) for p in PROTOCOLS}
        if len(decisions) == 1:
            d = decisions.pop()
            early = d if d.verdict in (Verdict.ALLOW, Verdict.MASK) else None
        if len(self._early) > 4096:
            self._early.clear()
        self._early[key] = early
        return early

    async def hold(self, rec: SessionRecord, decision: Decision, op: Operation | None = None) -> str:
        return await self.holds.wait(rec, decision, op or _connect_op(rec))

    def agent_name(self, agent_id: int) -> str:
        name = self._agent_names.get(agent_id)
        if name is None:
            row = self.recorder.db.execute("SELECT name FROM agents WHERE id = ?", [agent_id]).fetchone() \
                if "agents" in self.recorder.db.table_names() else None
            name = row[0] if row else f"agent-{agent_id}"
            self._agent_names[agent_id] = name
            self._agent_ids[name] = agent_id
        return name

    def admit(self, transport: asyncio.BaseTransport) -> SessionRecord | None:
        """The session row for an accepted connection, or None when it must be refused."""
        peer = transport.get_extra_info("peername")
        if peer is None:
            return None  # reset before we got here; the sweep records it from the kernel's record
        found = self.origins.take(peer[0], peer[1])
        if found is None:
            # Not redirected by our hooks: someone dialled the proxy port directly.
            self.recorder.event("refused", {"reason": "no-origin", "peer": f"{peer[0]}:{peer[1]}"})
            return None
        rec = self._record(*found)
        if rec.dst_port in self._own and _is_loopback(rec.dst_addr):
            rec.outcome, rec.detail, rec.ended = "refused", "loop: destination is the proxy itself", rec.started
            self.recorder.session_open(rec)
            return None
        if self.spool is not None:
            self.spool.look()  # a sibling found the spool full: see for ourselves before admitting
        if self.recorder.failed:
            # No record, no connection: refused now, on record once the recorder writes again.
            rec.outcome, rec.detail, rec.ended = "recorder-error", f"the recorder cannot write: {self.recorder.failed}", rec.started
            self.recorder.session_open(rec)
            self.recorder.health.refused += 1
            return None
        ident = self.identities.get(rec.agent)
        refused = ident.refusal() if ident is not None else None
        if refused is not None:
            # An invalid or expired identity token: the agent's new connections end here, on record.
            rec.outcome, rec.detail, rec.ended = "refused", refused, rec.started
            rec.verdict, rec.rule = Verdict.DENY.value, IDENTITY_RULE
            self.recorder.session_open(rec)
            return None
        early = self.early_decision(rec)
        if early is not None:
            rec.verdict, rec.rule = early.verdict.value, early.rule
            self.metrics.operation(rec.agent, "tcp", early.verdict.value)
        written = self.recorder.session_open(rec, wait=True)
        written.add_done_callback(_retrieved)
        self.live[rec.id] = (transport, written)
        return rec

    def session_for(self, dest, ident) -> SessionRecord:
        """A new session row (not yet written) for what the hooks filed about an agent socket."""
        return self._record(dest, ident)

    def recorded(self, rec: SessionRecord) -> asyncio.Future:
        """Resolves once rec's session row (with a decision made at accept) is committed; raises
        RecorderDown if it cannot be. Nothing of the agent's goes upstream before."""
        entry = self.live.get(rec.id)
        if entry is not None:
            return entry[1]
        fut = self.loop.create_future()
        fut.set_exception(RecorderDown(self.recorder.failed or "the session is not on record"))
        return fut

    def _recorder_health(self, health: Health) -> None:
        """The recorder failed or recovered. Failed: cut every open agent connection (nothing of
        theirs could be recorded); either way, tell the daemon."""
        if health.failed:
            for sid, (transport, _) in list(self.live.items()):
                rec = self.recorder.open.get(sid)
                if rec is None:
                    continue
                if rec.outcome == "open":
                    rec.outcome, rec.detail = "recorder-error", f"the recorder cannot write: {health.failed}"
                _cut(transport)
        self._report()

    def _sibling_metrics(self) -> list[Path]:
        return [workers_mod.metrics_file(self.layout.run_dir, k) for k in range(1, self.workers)]

    def _report(self) -> None:
        """The recorder's state as one JSON line on the daemon's pipe, when it changed."""
        state = self.recorder.health.as_dict()
        if self.status_fd is None or state == self._reported:
            return
        try:
            os.write(self.status_fd, (json.dumps({"recorder": state}) + "\n").encode())
            self._reported = state
        except BlockingIOError:
            pass  # the daemon is behind; the next tick tries again
        except OSError:
            self.status_fd = None

    async def tick(self, interval: float = COUNT_FLUSH_INTERVAL) -> None:
        """Every interval: flush open sessions' byte counts, forget closed ones, report the state."""
        while True:
            await asyncio.sleep(interval)
            self.recorder.flush_counts()
            if self.spool is not None:
                self.spool.check()
            for sid in [s for s in self.live if s not in self.recorder.open]:
                del self.live[sid]
            self._report()
            if self.metrics_dump is not None:
                try:
                    self.metrics.dump(self.metrics_dump)
                except OSError:
                    pass  # the run dir is gone: the instance is coming down

    def identity_json(self, agent: str) -> str | None:
        """The agent's bound identity as its session rows carry it (JSON), None without one."""
        self.identities.refresh()  # a stat: bindings the daemon made before this agent's process ran
        bound = self.identities.get(agent)
        if bound is None:
            return None
        # Encoded once per binding, not per connection: a reload of the file builds new bindings.
        hit = self._identity_json.get(agent)
        if hit is None or hit[0] is not bound:
            hit = self._identity_json[agent] = (bound, bound.record_json())
        return hit[1]

    def _record(self, dest, ident) -> SessionRecord:
        return SessionRecord(
            id=new_session_id(self.worker), agent=self.agent_name(ident.agent_id), pid=ident.pid,
            tgid=ident.tgid, uid=ident.uid, gid=ident.gid, comm=ident.comm, exe=ident.exe,
            cmdline=ident.cmdline, cgroup_id=ident.cgroup_id, dst_addr=dest.host,
            dst_port=dest.port, family=dest.family, identity=self.identity_json(self.agent_name(ident.agent_id)))

    async def sweep(self, interval: float = 2.0, max_age: float = 5.0) -> None:
        """Record connections the agent abandoned before accept: no connection goes unrecorded."""
        while True:
            await asyncio.sleep(interval)
            for dest, ident in self.origins.stale(max_age):
                rec = self._record(dest, ident)
                rec.outcome, rec.detail, rec.ended = "aborted", "the agent reset the connection before the proxy accepted it", rec.started
                self.recorder.session_open(rec)

    async def serve(self, ready_fd: int | None) -> None:
        servers = []
        resolvers: list[Resolver] = []
        upstream = self.config.dns_upstream or system_nameserver()
        # Several workers share each listener (the kernel spreads connections and datagrams over
        # them); one alone keeps EADDRINUSE, so a port taken by something else is not shared.
        reuse_port = self.workers > 1
        for host in LOOPBACKS:
            try:
                servers.append(await self.loop.create_server(
                    lambda: AgentSide(self), host, self.config.proxy_port, reuse_address=True,
                    reuse_port=reuse_port, backlog=4096))
                _, resolver = await self.loop.create_datagram_endpoint(
                    lambda h=host: Resolver(self, h, upstream, self.config.dns_timeout),
                    local_addr=(host, self.config.dns_port), reuse_port=reuse_port)
                resolvers.append(resolver)
            except OSError as e:
                if host == "127.0.0.1":
                    raise
                print(f"interlock proxy: no IPv6 listener: {e}", file=sys.stderr)
        servers += await inbound.serve(self)
        if self.workers > 1:  # where siblings hand over PostgreSQL cancels for this worker's sessions
            servers.append(await pg_cancels.serve(workers_mod.shared_dir(self.layout.run_dir), self.worker))
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.set_blocking(ready_fd, False)
            self.status_fd = ready_fd  # from now on: the recorder's state, for the daemon
            self._report()
        stop = self.loop.create_future()
        self.loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        self.loop.add_signal_handler(signal.SIGHUP, self.policy.reload)
        tasks = [self.loop.create_task(self.policy.watch()), self.loop.create_task(self.sweep()),
                 self.loop.create_task(self.tick())]
        await stop
        for task in tasks:
            task.cancel()
        for resolver in resolvers:
            resolver.close()
        for rec in list(self.recorder.open.values()):
            rec.outcome, rec.detail, rec.ended = "proxy-stopped", "the proxy was stopped", rec.ended or time.time()
            self.recorder.session_close(rec)
        self.recorder.close()
        for s in servers:
            s.close()


_MISS = object()


def _retrieved(fut: asyncio.Future) -> None:
    """Mark a failure as seen: the connection it refused needs no traceback in the log."""
    if not fut.cancelled():
        fut.exception()


def _cut(transport: asyncio.BaseTransport) -> None:
    """Reset an agent connection, also one whose bytes splice threads move (shutdown wakes them)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            s = socket.socket(fileno=os.dup(sock.fileno()))
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.close()
        except OSError:
            pass
    transport.abort()
# Every protocol name the classifier can give a connection: a connect decision that is the same
# for all of them does not need the first bytes.
PROTOCOLS = LABELS


def _connect_op(rec: SessionRecord) -> Operation:
    return Operation(rec.protocol, "connect", (f"{rec.dst_addr}:{rec.dst_port}",),
                     summary=f"connect {rec.protocol} {rec.dst_addr}:{rec.dst_port}")


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="interlock-proxy")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--state-dir", type=Path)
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--worker", type=int, default=0, help="this worker's index (0..workers-1)")
    ap.add_argument("--workers", type=int, default=1, help="proxy workers sharing the listeners")
    args = ap.parse_args(argv)
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return 1  # the daemon is already gone: do not serve unsupervised
    config = load(args.config)
    logs.setup(os.environ.get(logs.ENV, config.log_format), "proxy")
    layout = Layout.build(args.state_dir, config.instance, config.cgroup_root)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    proxy = Proxy(config, layout, loop, args.worker, args.workers)
    try:
        loop.run_until_complete(proxy.serve(args.ready_fd))
    except OSError as e:
        print(f"interlock proxy: cannot listen on port {config.proxy_port}, {config.dns_port} or {config.inbound_port}: "
              f"{e.strerror or e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
