"""The proxy process: listeners on loopback for redirected TCP and DNS, one uvloop loop.

Started and supervised by the daemon; it dies with the daemon (PR_SET_PDEATHSIG), so a killed
daemon leaves agents pointed at a closed port rather than at an unsupervised proxy."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import sys
from pathlib import Path

import uvloop

import proxy.protocols  # noqa: F401  (registers the protocol handlers)
from classifier import LABELS
from credentials.store import CredentialStore
from interceptor import logs
from interceptor.config import Config, load
from interceptor.layout import Layout
from policy.engine import Destination
from policy.model import Decision, Operation, Verdict
from proxy import inbound
from proxy.gate import Holds, NameBindings, PolicyHolder
from proxy.limits import Limits
from proxy.metrics import ProxyMetrics
from proxy.origins import Origins
from proxy.relay import AgentSide
from proxy.resolver import Resolver, system_nameserver
from proxy.tls.ca import CertificateAuthority, LeafMinter, write_bundle
from recorder import approvals
from recorder.store import Recorder, SessionRecord, new_session_id

PR_SET_PDEATHSIG = 1
LOOPBACKS = ("127.0.0.1", "::1")


class Proxy:
    def __init__(self, config: Config, layout: Layout, loop: asyncio.AbstractEventLoop):
        self.config = config
        self.layout = layout
        self.loop = loop
        self.origins = Origins(layout.pin_dir)
        self.recorder = Recorder(layout.db, loop)
        approvals.ensure_schema(self.recorder.db)
        self.metrics = ProxyMetrics()
        self.recorder.writer.on_commit = self.metrics.committed
        self.recorder.on_session_close = lambda r: self.metrics.session_closed(r.agent, r.protocol, r.outcome,
                                                                               r.bytes_up, r.bytes_down)
        self.policy = PolicyHolder(config.policy, self.recorder, on_load=self.metrics.policy_loaded)
        self.names = NameBindings()
        self.credentials = CredentialStore(layout.state_dir)
        # Our interception CA (state_dir/ca, key 0600) and the leaf certificates it mints per
        # name: what the TLS-terminating handlers (PostgreSQL sslmode, HTTPS) present to agents.
        self.ca = CertificateAuthority.load_or_create(layout.state_dir / "ca")
        self.leaves = LeafMinter(self.ca)
        # What `interlock run` points agents' trust stores at (system CAs + ours).
        write_bundle(self.ca, layout.ca_bundle)
        write_bundle(self.ca, layout.ca_cert, system_bundle=None)  # ours alone: NODE_EXTRA_CA_CERTS
        self.holds = Holds(self, loop)
        self.metrics.watch(holds_pending=lambda: len(self.holds.waiting), hold_oldest=self.holds.oldest_age,
                           recorder_queue=lambda: len(self.recorder.writer.batch),
                           lockdown_file=layout.state_dir / "lockdown")
        if config.metrics_address:
            self.metrics.serve(config.metrics_address)
        self.limits = Limits(config, loop)  # per-agent connection caps, idle sweep
        self._agent_names: dict[int, str] = {}
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
        key = (id(policy), rec.agent, rec.dst_addr, rec.dst_port, names)
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
        early = self.early_decision(rec)
        if early is not None:
            rec.verdict, rec.rule = early.verdict.value, early.rule
            self.metrics.operation(rec.agent, "tcp", early.verdict.value)
        self.recorder.session_open(rec)
        return rec

    def session_for(self, dest, ident) -> SessionRecord:
        """A new session row (not yet written) for what the hooks filed about an agent socket."""
        return self._record(dest, ident)

    def _record(self, dest, ident) -> SessionRecord:
        return SessionRecord(
            id=new_session_id(), agent=self.agent_name(ident.agent_id), pid=ident.pid,
            tgid=ident.tgid, uid=ident.uid, gid=ident.gid, comm=ident.comm, exe=ident.exe,
            cmdline=ident.cmdline, cgroup_id=ident.cgroup_id, dst_addr=dest.host,
            dst_port=dest.port, family=dest.family)

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
        for host in LOOPBACKS:
            try:
                servers.append(await self.loop.create_server(
                    lambda: AgentSide(self), host, self.config.proxy_port, reuse_address=True,
                    backlog=4096))
                _, resolver = await self.loop.create_datagram_endpoint(
                    lambda h=host: Resolver(self, h, upstream, self.config.dns_timeout),
                    local_addr=(host, self.config.dns_port))
                resolvers.append(resolver)
            except OSError as e:
                if host == "127.0.0.1":
                    raise
                print(f"interlock proxy: no IPv6 listener: {e}", file=sys.stderr)
        servers += await inbound.serve(self)
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        stop = self.loop.create_future()
        self.loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        self.loop.add_signal_handler(signal.SIGHUP, self.policy.reload)
        tasks = [self.loop.create_task(self.policy.watch()), self.loop.create_task(self.sweep())]
        await stop
        for task in tasks:
            task.cancel()
        for resolver in resolvers:
            resolver.close()
        self.recorder.close()
        for s in servers:
            s.close()


_MISS = object()
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
    proxy = Proxy(config, layout, loop)
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
