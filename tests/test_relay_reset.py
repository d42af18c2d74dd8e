"""A reset of an agent connection that is already gone is a no-op, never a traceback in the log."""

from __future__ import annotations

import asyncio

import uvloop

from proxy.relay import _reset


def test_resetting_a_connection_the_agent_already_closed_raises_nothing():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transport.get_extra_info("socket")  # asked for once (the relay does, at accept)
        transport.abort()  # gone: the pseudo-socket uvloop handed out now has fd -1
        await asyncio.sleep(0)
        assert transport.get_extra_info("socket").fileno() == -1
        _reset(transport)  # raised ValueError("negative file descriptor") before
        server.close()

    uvloop.run(main())


def test_a_reset_of_a_live_connection_is_a_tcp_rst():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ends: list[asyncio.Transport] = []

        class Keep(asyncio.Protocol):
            def connection_made(self, transport):  # type: ignore[override]
                ends.append(transport)

        server = await loop.create_server(Keep, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            reader, _ = await asyncio.open_connection("127.0.0.1", port)
            while not ends:
                await asyncio.sleep(0.01)
            _reset(ends[0])
            try:
                await reader.read(1)
                reset = False
            except ConnectionResetError:
                reset = True
        server.close()
        assert reset, "the peer saw a clean end, not a reset"

    uvloop.run(main())
