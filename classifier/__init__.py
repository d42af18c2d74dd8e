"""Protocol recognition from the first bytes of a connection: sans-IO, bytes in, verdict out.

Per connection the proxy keeps one `Classifier` and owns the sockets and the clock::

    c = Classifier()
    r = NEED_MORE
    while not r:                       # NEED_MORE is falsy, a Verdict truthy
        data = read_client(timeout=c.wait)            # None on timeout, b"" on EOF
        if data is None:
            r = c.timeout()            # client silent: NEED_MORE and c.waiting_for_server
            while not r and c.waiting_for_server:
                greeting = read_server(timeout=c.wait)  # after connecting upstream
                r = c.timeout() if greeting is None else c.feed_server(greeting)
        else:
            r = c.feed(data)
    # r.protocol in LABELS; r.details e.g. {"sni", "alpn"} for tls, {"message", "params"} for postgres

`classify_client` / `classify_server` are the same decisions as pure functions of a byte prefix."""

from .engine import DEFAULT_MAX_BYTES, Classifier, candidates, classify_client, classify_server, could_become
from .verdict import LABELS, NEED_MORE, TCP, NeedMore, Result, Verdict

__all__ = ["Classifier", "classify_client", "classify_server", "Verdict", "NeedMore", "NEED_MORE", "Result",
           "TCP", "LABELS", "DEFAULT_MAX_BYTES", "candidates", "could_become"]
