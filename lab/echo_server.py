"""A TCP echo and UDP sink for the server host: logs every connection and datagram it sees.

`python -m lab.echo_server LOG PORT` serves TCP and UDP on PORT, IPv4 and IPv6; each line of LOG
is JSON: {"proto", "peer", "bytes"}; every TCP read is a "tcp-data" line with the peer's port and
the bytes' start (`head`). Tests read LOG to prove what reached the server."""

from __future__ import annotations

import asyncio
import json
import socket
import sys


class Echo(asyncio.Protocol):
    def __init__(self, log):
        self.log = log

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.log({"proto": "tcp", "peer": peer[0], "port": peer[1]})

    def data_received(self, data):
        peer = self.transport.get_extra_info("peername")
        self.log({"proto": "tcp-data", "peer": peer[0], "port": peer[1], "bytes": len(data),
                  "head": data[:64].decode("latin-1")})
        self.transport.write(data)


class Sink(asyncio.DatagramProtocol):
    def __init__(self, log):
        self.log = log

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.log({"proto": "udp", "peer": addr[0], "bytes": len(data)})
        self.transport.sendto(data, addr)


async def main(path: str, port: int) -> None:
    out = open(path, "a", buffering=1)

    def log(rec):
        out.write(json.dumps(rec) + "\n")

    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Echo(log), "0.0.0.0", port, reuse_address=True)
    await loop.create_server(lambda: Echo(log), "::", port, reuse_address=True, family=socket.AF_INET6)
    await loop.create_datagram_endpoint(lambda: Sink(log), local_addr=("0.0.0.0", port))
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.bind(("::", port))
    await loop.create_datagram_endpoint(lambda: Sink(log), sock=s6)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
