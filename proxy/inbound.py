"""Connections from other hosts into agents: judged, recorded, then relayed to the agent's listener.

nftables (interceptor/firewall.py) diverts every TCP segment from another host that would reach
an agent's socket to the proxy's transparent listener on loopback (`tproxy`; IP_TRANSPARENT), so
the accepted socket's local address is the one the peer dialled. The proxy finds the agent
listening there (proxy/listeners.py), opens the session row (the listening agent's identity, the
remote peer), asks the policy about the operation `inbound` (target = the remote peer's address,
port = the agent's port; only rules naming `inbound` match, the default is deny) and acts once
the decision is on record: deny resets the peer, approve holds it until a human answers, allow
connects to the agent's listener over loopback and relays bytes both ways, unread. Bytes are
counted from the agent's side: `bytes_up` is what the agent sent to the peer.

Nothing reaches the agent before the decision is recorded; if the proxy is down, nftables
answers the peer with a reset (fail closed)."""

from __future__ import annotations

import asyncio
import ctypes
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from interceptor.bpf_loader import PinnedMap
from policy.engine import INBOUND, Destination
from policy.model import Operation, Verdict
from proxy import listeners
from proxy.origins import Identity, _read_proc
from recorder.store import SessionRecord, new_session_id

if TYPE_CHECKING:
    from proxy.server import Proxy

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
PROTOCOL = "inbound"  # the session row's protocol and the policy's: relayed unread


def transparent_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket tproxy may hand connections to (needs CAP_NET_ADMIN)."""
    six = ":" in host
    s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # several proxy workers share it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if six:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((host, port))
        s.listen(1024)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class Owners:
    """Who listens where: the agent behind the socket a diverted connection was meant for."""

    def __init__(self, pin_dir: Path, agents_cgroup: Path, mark: int):
        self.cgroups = PinnedMap(pin_dir / "agent_cgroups")
        self.tgids = PinnedMap(pin_dir / "agent_tgids")
        self.agents_cgroup = agents_cgroup
        self.mark = mark

    def agent_of_cgroup(self, cgroup_id: int) -> int | None:
        v = ctypes.c_uint32()
        return v.value if cgroup_id and self.cgroups.lookup(ctypes.c_uint64(cgroup_id), v) else None

    def agent_of_tgid(self, tgid: int) -> int | None:
        v = ctypes.c_uint32()
        return v.value if self.tgids.lookup(ctypes.c_uint32(tgid), v) else None

    def is_agent(self, x: listeners.Listener) -> bool:
        return x.mark == self.mark or self.agent_of_cgroup(x.cgroup_id) is not None

    def find(self, local_addr: str, local_port: int) -> Identity | None:
        """The identity of the agent listening on local_addr:local_port, None if no agent does."""
        x = listeners.chosen(listeners.listeners(local_port), local_addr, self.is_agent)
        if x is None:
            return None
        pids = self._pids(x.cgroup_id)
        tgid = listeners.holder(x.inode, pids) or 0
        agent_id = self.agent_of_cgroup(x.cgroup_id) or (self.agent_of_tgid(tgid) if tgid else None) or 0
        exe, cmdline = _read_proc(tgid) if tgid else ("", "")
        comm, gid = _comm_gid(tgid)
        return Identity(agent_id, tgid, tgid, x.uid, gid, comm, x.cgroup_id, exe, cmdline)

    def _pids(self, cgroup_id: int) -> list[int]:
        """Processes that may hold the socket: its cgroup's, else every selector-enrolled one."""
        for cgid, path in listeners.cgroup_dirs(self.agents_cgroup):
            if cgid == cgroup_id:
                try:
                    return [int(p) for p in (path / "cgroup.procs").read_text().split()]
                except OSError:
                    break
        return [k.value for k in self.tgids.keys(ctypes.c_uint32)]


def _comm_gid(tgid: int) -> tuple[str, int]:
    if not tgid:
        return "", 0
    try:
        status = Path(f"/proc/{tgid}/status").read_text()
    except OSError:
        return "", 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    gid = fields.get("Gid", "0").split()
    return fields.get("Name", "").strip(), int(gid[0]) if gid else 0


def _plain(addr: str) -> str:
    return addr.split("%")[0]


class InboundSide(asyncio.Protocol):
    """The remote peer's connection, accepted on the transparent inbound listener."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.agent: AgentListenerSide | None = None
        self.rec: SessionRecord | None = None
        self.eof_in = False
        self.closed_sides = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # nothing is read from the peer before the decision
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if peer is None or local is None:
            transport.abort()
            return
        peer_addr, local_addr = _plain(peer[0]), _plain(local[0])
        recorder = self.proxy.recorder
        if local[1] == self.proxy.config.inbound_port:
            # Dialled directly (from this host): nftables diverts only connections bound elsewhere.
            recorder.event("refused", {"reason": "inbound-direct", "peer": f"{peer_addr}:{peer[1]}"})
            transport.abort()
            return
        try:
            ident = self.proxy.inbound_owners.find(local_addr, local[1])
        except OSError as e:
            ident, why = None, f"socket lookup failed: {e}"
        else:
            why = "no agent listens there any more"
        if ident is None:
            recorder.event("inbound-refused", {"peer": f"{peer_addr}:{peer[1]}", "local": f"{local_addr}:{local[1]}",
                                               "reason": why}, durable=True)
            transport.abort()
            return
        self.rec = rec = SessionRecord(
            id=new_session_id(self.proxy.worker), agent=self.proxy.agent_name(ident.agent_id), pid=ident.pid, tgid=ident.tgid,
            uid=ident.uid, gid=ident.gid, comm=ident.comm, exe=ident.exe, cmdline=ident.cmdline,
            cgroup_id=ident.cgroup_id, dst_addr=peer_addr, dst_port=local[1],
            family="ipv6" if ":" in peer_addr else "ipv4", protocol=PROTOCOL)
        rec.identity = self.proxy.identity_json(rec.agent)
        op = Operation(PROTOCOL, INBOUND, (f"{peer_addr}:{peer[1]}",),
                       summary=f"inbound from {peer_addr}:{peer[1]} to {local_addr}:{local[1]}")
        decision = self.proxy.policy.current.decide(rec.agent, Destination(peer_addr, local[1], (), PROTOCOL), op)
        rec.verdict, rec.rule = decision.verdict.value, decision.rule
        self.proxy.metrics.operation(rec.agent, PROTOCOL, decision.verdict.value)
        recorder.session_open(rec)
        recorder.event("inbound", {"peer": f"{peer_addr}:{peer[1]}", "local": f"{local_addr}:{local[1]}"}, rec.id)
        written = recorder.decision(rec.id, op, decision)
        self.proxy.live[rec.id] = (transport, written)  # cut with the agents' own if the recorder fails
        self.proxy.loop.create_task(self._act(decision, written, op, (local_addr, local[1])))

    async def _act(self, decision, written, op: Operation, listener: tuple[str, int]) -> None:
        try:
            await written
        except Exception as e:  # no record, no connection
            self.close("recorder-error", str(e))
            return
        if self.transport.is_closing():
            return
        if decision.verdict is Verdict.DENY:
            self.close("denied", f"{decision.rule}: {decision.reason}")
            return
        if decision.verdict is Verdict.APPROVE:
            outcome = await self.proxy.hold(self.rec, decision, op)
            if self.transport.is_closing():
                return
            if outcome != "approved":
                self.close(outcome, f"{decision.rule}: approval {outcome}")
                return
        try:
            async with asyncio.timeout(self.proxy.config.connect_timeout):
                _, agent = await self.proxy.loop.create_connection(lambda: AgentListenerSide(self), *listener)
        except (TimeoutError, OSError) as e:
            self.close("agent-unreachable", str(e) or type(e).__name__)
            return
        if self.transport.is_closing():
            agent.transport.close()
            return
        self.agent = agent
        self.transport.resume_reading()

    # ---- bytes, peer -> agent -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.rec.bytes_down += len(data)
        self.agent.transport.write(data)

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.agent is not None and self.agent.transport.can_write_eof():
            self.agent.transport.write_eof()
        return self.agent is not None and not self.agent.eof_in

    def pause_writing(self) -> None:
        if self.agent is not None:
            self.agent.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.agent is not None:
            self.agent.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rec is None:
            return
        if self.agent is not None:
            self.agent.transport.close()
        self.side_done(exc)

    def side_done(self, exc: Exception | None) -> None:
        self.closed_sides += 1
        if exc is not None and self.rec.outcome == "open":
            self.rec.detail = str(exc)
        if self.closed_sides == 2 or self.agent is None:
            self.finish()

    def finish(self) -> None:
        rec = self.rec
        if rec.ended is not None:
            return
        rec.ended = time.time()
        if rec.outcome == "open":
            rec.outcome = "closed"
        self.proxy.recorder.session_close(rec)

    def close(self, outcome: str, detail: str) -> None:
        """End with an outcome for the record; the peer gets a reset."""
        if self.rec.outcome == "open":
            self.rec.outcome, self.rec.detail = outcome, detail
        self.transport.abort()
        if self.agent is not None:
            self.agent.transport.close()


class AgentListenerSide(asyncio.Protocol):
    """The proxy's own connection to the agent's listener, over loopback (never diverted)."""

    __slots__ = ("peer", "transport", "eof_in")

    def __init__(self, peer: InboundSide):
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.eof_in = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.peer.rec.bytes_up += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
        return not self.peer.eof_in

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.transport.close()
        self.peer.side_done(exc)


async def serve(proxy: Proxy) -> list[asyncio.AbstractServer]:
    """The transparent listeners on 127.0.0.1 and ::1 (a host without IPv6 gets the first only)."""
    servers = []
    for host in ("127.0.0.1", "::1"):
        try:
            sock = transparent_listener(host, proxy.config.inbound_port, reuse_port=proxy.workers > 1)
        except OSError:
            if host == "127.0.0.1":
                raise
            continue
        servers.append(await proxy.loop.create_server(lambda: InboundSide(proxy), sock=sock))
    return servers
