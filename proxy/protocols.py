"""Importing this module registers every protocol handler (proxy/handler.py's HANDLERS).

One line per protocol; a label without a handler is relayed as opaque bytes."""

import proxy.dnstcp  # noqa: F401  (dns over tcp)
import proxy.http.handler  # noqa: F401  (http)
import proxy.postgres.handler  # noqa: F401  (postgres)
import proxy.tls.handler  # noqa: F401  (tls)
from proxy.handler import HANDLERS

__all__ = ["HANDLERS"]
