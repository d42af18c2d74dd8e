"""A lean TCP echo server for the connection-rate benchmark: uvloop, no logging.

`python -m bench.echo PORT` serves IPv4 and IPv6 and prints "ready" once listening. It is kept
cheaper than lab.echo_server (which logs every connection) so the server is not what limits the
rate and the proxies' own cost shows in the ratios."""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def listener(family: socket.AddressFamily, addr: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # share the port with 0.0.0.0
    s.bind((addr, port))
    return s


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        await loop.create_server(Echo, sock=listener(family, addr, port), backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
