"""Protocol recognition from the first bytes of a connection: sans-IO, bytes in, verdict out.

The proxy calls `Classifier` per connection (or the pure `classify_client`/`classify_server`);
`classifier.sniff` keeps the older string-returning helpers the relay uses."""

from .engine import DEFAULT_MAX_BYTES, Classifier, classify_client, classify_server
from .verdict import NEED_MORE, TCP, NeedMore, Result, Verdict

__all__ = ["Classifier", "classify_client", "classify_server", "Verdict", "NeedMore", "NEED_MORE", "Result",
           "TCP", "DEFAULT_MAX_BYTES"]
