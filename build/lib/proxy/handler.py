"""The seam between the relay and a protocol: what a handler is given and what it may do.

A handler exists for a connection once it is allowed, connected upstream and classified as its
protocol. It sees every byte in both directions, before anything is forwarded, and decides what
goes on: it may forward, rewrite, answer by itself, judge an operation, hold it for a human, or
close. Parsing stays sans-IO in the protocol's own package (proxy/postgres, proxy/http); the
handler is the thin glue between those parsers and this interface.

    class EchoHandler(Handler):
        protocol = "echo"
        def on_client(self, data):          # bytes from the agent
            self.conn.to_server(data)
        def on_server(self, data):          # bytes from the service
            self.conn.to_client(data)

`HANDLERS` maps a classifier label to the handler class; labels without one are relayed as
opaque bytes on the fast path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.relay import AgentSide


class Handler:
    """Pass-through by default; protocols override what they need."""

    protocol = ""

    def __init__(self, conn: AgentSide, details: dict[str, Any]):
        self.conn = conn  # see AgentSide's "for handlers" section for what it offers
        self.details = details  # what the classifier learned (sni, alpn, startup params, …)

    def start(self) -> None:
        """Called once, before the first bytes are handed over."""

    def on_client(self, data: bytes) -> None:
        self.conn.to_server(data)

    def on_server(self, data: bytes) -> None:
        self.conn.to_client(data)

    def on_client_eof(self) -> bool:
        """The agent half-closed. Return True to keep the connection open."""
        self.conn.server_eof()
        return True

    def on_server_eof(self) -> bool:
        self.conn.client_eof()
        return True

    def on_server_lost(self) -> bool:
        """The service's connection is gone. Return True to keep the agent's open, to answer it
        (an HTTP 502 naming why) before closing it yourself."""
        return False

    def on_close(self) -> None:
        """Both sides are gone: last chance to record what is pending."""


HANDLERS: dict[str, type[Handler]] = {}


def register(cls: type[Handler]) -> type[Handler]:
    HANDLERS[cls.protocol] = cls
    return cls
