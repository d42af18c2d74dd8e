"""Importing this module registers every protocol handler (proxy/handler.py's HANDLERS).

One line per protocol; a label without a handler is relayed as opaque bytes."""

from proxy.handler import HANDLERS

__all__ = ["HANDLERS"]
