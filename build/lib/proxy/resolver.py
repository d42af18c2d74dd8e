"""The agents' DNS resolver: forwards each query to the upstream nameserver and logs it.

Agent DNS reaches it through the sendmsg hooks; the recvmsg hooks make the replies look as if
they came from the server the agent asked."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import dpkt

from recorder.store import Recorder

if TYPE_CHECKING:
    from proxy.gate import NameCache


def system_nameserver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str | None:
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                return parts[1]
    except OSError:
        pass
    return None


def describe(query: bytes) -> dict:
    """Names and types asked, for the record; malformed queries are described as such."""
    try:
        msg = dpkt.dns.DNS(query)
        return {"id": msg.id, "questions": [{"name": q.name, "type": q.type} for q in msg.qd]}
    except (dpkt.UnpackError, IndexError, ValueError):
        return {"malformed": True, "length": len(query)}


def answers(reply: bytes) -> list[tuple[str, str]]:
    """(name asked, address) for each A/AAAA answer: which names an address is known by."""
    try:
        msg = dpkt.dns.DNS(reply)
    except (dpkt.UnpackError, IndexError, ValueError):
        return []
    asked = msg.qd[0].name if msg.qd else ""
    out = []
    for rr in msg.an:
        if rr.type == dpkt.dns.DNS_A and len(rr.rdata) == 4:
            out.append((asked, socket.inet_ntop(socket.AF_INET, rr.rdata)))
        elif rr.type == dpkt.dns.DNS_AAAA and len(rr.rdata) == 16:
            out.append((asked, socket.inet_ntop(socket.AF_INET6, rr.rdata)))
    return out


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, answer: asyncio.Future):
        self.answer = answer

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.answer.done():
            self.answer.set_result(data)


class Resolver(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: str | None, recorder: Recorder,
                 names: NameCache | None = None, timeout: float = 5.0):
        self.names = names
        self.loop = loop
        self.upstream = upstream
        self.recorder = recorder
        self.timeout = timeout
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        info = describe(data)
        info["upstream"] = self.upstream
        self.recorder.event("dns", info)
        if self.upstream and not info.get("malformed"):
            self.loop.create_task(self._forward(data, addr))

    async def _forward(self, data: bytes, addr) -> None:
        answer = self.loop.create_future()
        family = socket.AF_INET6 if ":" in self.upstream else socket.AF_INET
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Upstream(answer), remote_addr=(self.upstream, 53), family=family)
        except OSError:
            return
        try:
            transport.sendto(data)
            reply = await asyncio.wait_for(answer, self.timeout)
            self.transport.sendto(reply, addr)
            if self.names is not None:
                for name, address in answers(reply):
                    self.names.add(address, name)
        except TimeoutError:
            pass
        finally:
            transport.close()
