"""Combining the detectors: the pure classify functions and the incremental Classifier.

The proxy owns the sockets and the clock; this module only decides. A connection is judged from
the client's first bytes; when the client stays silent (MySQL, SMTP, an SSH client waiting on the
server), the proxy calls timeout(), connects upstream and feeds the server's greeting instead."""

from __future__ import annotations

from collections.abc import Iterable

from .client import CLIENT_DETECTORS, CLIENT_LABELS, Detector
from .server import SERVER_DETECTORS
from .verdict import DECISIVE, LABELS, NEED_MORE, TCP, NeedMore, Result, Verdict, tcp_verdict

SERVER_FIRST: frozenset[str] = frozenset({"mysql", "smtp", "ssh", TCP})
"""Labels a server greeting can give: possible while the client has sent nothing."""

DEFAULT_MAX_BYTES = 16384
"""Enough for a post-quantum TLS ClientHello or an HTTP header block; beyond it, guess and stop."""


def _combine(data: bytes, final: bool, detectors: Iterable[Detector], side: str) -> tuple[Result, list[Detector]]:
    """Best verdict over `detectors`, and the detectors that did not rule themselves out."""
    best: Verdict | None = None
    pending = False
    alive: list[Detector] = []
    for detect in detectors:
        try:
            r = detect(data, final)
        except Exception:  # noqa: BLE001 - a detector bug must cost a label, never the relay
            r = None
        if r is None:
            continue
        alive.append(detect)
        if isinstance(r, NeedMore):
            pending = not final or pending
        elif best is None or r.confidence > best.confidence:
            best = r
    if best is not None and (best.confidence >= DECISIVE or not pending):
        return best, alive
    if pending:
        return NEED_MORE, alive
    return tcp_verdict(side), alive


def classify_client(data: bytes, final: bool = False) -> Result:
    """Judge the first bytes a client sent. NEED_MORE means "could still be several things".

    With final=True (no more bytes will come: limit reached, client silent or closed) the answer
    is always a Verdict, "tcp" when nothing fits."""
    data = bytes(data)
    if not data:
        return tcp_verdict("client") if final else NEED_MORE
    return _combine(data, final, CLIENT_DETECTORS, "client")[0]


def candidates(data: bytes) -> frozenset[str]:
    """Labels a client stream opening with `data` could still be given once more bytes arrive,
    besides "tcp" (always possible). Empty: no protocol the classifier knows starts this way.

    A prefix of nothing could be anything (every label, the server-first ones included)."""
    data = bytes(data)
    if not data:
        return frozenset(LABELS) - {TCP}
    return _labels(_combine(data, False, CLIENT_DETECTORS, "client")[1])


def could_become(data: bytes, labels: frozenset[str] | set[str]) -> bool:
    """True while a client stream opening with `data` may still turn out to be one of `labels`;
    False means no byte the client may add can make it one: it "can never be" any of them."""
    return not candidates(data).isdisjoint(labels)


def _labels(alive: Iterable[Detector]) -> frozenset[str]:
    return frozenset(CLIENT_LABELS[d] for d in alive)


def classify_server(data: bytes, final: bool = False) -> Result:
    """Judge a server greeting read while the client stayed silent; same contract as classify_client."""
    data = bytes(data)
    if not data:
        return tcp_verdict("server") if final else NEED_MORE
    v = _combine(data, final, SERVER_DETECTORS, "server")[0]
    if isinstance(v, Verdict) and v.side != "server":
        return Verdict(v.protocol, v.confidence, v.details, "server")
    return v


class Classifier:
    """Incremental, sans-IO classification of one connection.

    Feed client bytes with feed(); when nothing arrived within `wait` seconds call timeout(),
    read the server and feed_server() its greeting; when the server is also silent for `wait`
    seconds call timeout() again. Each call returns NEED_MORE or the final Verdict, which then
    sticks. An empty feed means that side closed. At most `max_bytes` per side are examined.

    `hold_for` names labels worth waiting for (the protocols the proxy can inspect): while the
    client's bytes could still become one of them, or both sides are silent, timeout() keeps
    answering NEED_MORE (and `wait` turns None once nothing is left to ask) instead of guessing:
    a client that stalls half-way is never labelled by its silence. The caller bounds the total
    wait. With an empty `hold_for` (the default) silence decides as before."""

    __slots__ = ("max_bytes", "client_silence", "server_wait", "hold_for", "_client", "_server", "_phase",
                 "_verdict", "_alive")

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, client_silence: float = 0.25,
                 server_wait: float = 2.0, hold_for: frozenset[str] = frozenset()) -> None:
        self.max_bytes = max(1, max_bytes)
        self.client_silence = client_silence
        self.server_wait = server_wait
        self.hold_for = frozenset(hold_for)
        self._client = bytearray()
        self._server = bytearray()
        # "client": waiting for the client; "server": waiting for a greeting; "quiet": both silent,
        # waiting for either (only with hold_for)
        self._phase = "client"
        self._verdict: Verdict | None = None
        # Client detectors not yet ruled out: a hostile client dribbling one byte per read then
        # costs one or two detector runs per byte, not all of them.
        self._alive: list[Detector] = list(CLIENT_DETECTORS)

    @property
    def verdict(self) -> Verdict | None:
        """The decision once made, else None."""
        return self._verdict

    @property
    def done(self) -> bool:
        return self._verdict is not None

    @property
    def wait(self) -> float | None:
        """Seconds the proxy should wait for bytes before calling timeout(); None once decided, or
        while nothing but more bytes can decide (see hold_for)."""
        if self._verdict is not None:
            return None
        if self._phase == "client":
            return None if self.stalled else self.client_silence
        return self.server_wait if self._phase == "server" else None

    @property
    def waiting_for_server(self) -> bool:
        """True after the client stayed silent: the proxy should connect and read the greeting."""
        return self._verdict is None and self._phase != "client"

    @property
    def candidates(self) -> frozenset[str]:
        """Labels this connection could still be given (besides "tcp"); see classifier.candidates."""
        if self._verdict is not None:
            return frozenset({self._verdict.protocol})
        labels = _labels(self._alive)
        if not self._client:
            labels |= SERVER_FIRST - {TCP}
        return labels

    @property
    def stalled(self) -> bool:
        """The client sent part of something that could still become a held-for label, then stopped."""
        return self._verdict is None and bool(self._client) and not self.candidates.isdisjoint(self.hold_for)

    def _decide(self, r: Result) -> Result:
        if isinstance(r, Verdict):
            self._verdict = r
            self._client.clear()
            self._server.clear()
        return r

    def feed(self, data: bytes) -> Result:
        """Client bytes (b"" = client closed)."""
        if self._verdict is not None:
            return self._verdict
        if not data:
            return self._decide(classify_client(self._client, final=True))
        room = self.max_bytes - len(self._client)
        self._client += data[:room]
        full = len(self._client) >= self.max_bytes
        if full:
            return self._decide(classify_client(self._client, final=True))
        r, self._alive = _combine(bytes(self._client), False, self._alive, "client")
        return self._decide(r)

    def feed_server(self, data: bytes) -> Result:
        """Server bytes (b"" = server closed). Bytes a client already sent take precedence."""
        if self._verdict is not None:
            return self._verdict
        if self._client:
            if self.stalled:
                return NEED_MORE  # a greeting must not label a client that is still half-way
            v = classify_client(self._client, final=True)
            if isinstance(v, Verdict) and v.protocol != TCP:
                return self._decide(v)
        if not data:
            return self._decide(classify_server(self._server, final=True))
        room = self.max_bytes - len(self._server)
        self._server += data[:room]
        full = len(self._server) >= self.max_bytes
        return self._decide(classify_server(self._server, final=full))

    def timeout(self) -> Result:
        """The side we waited for stayed silent for `wait` seconds."""
        if self._verdict is not None:
            return self._verdict
        if self._client:
            if self.stalled:
                return NEED_MORE
            return self._decide(classify_client(self._client, final=True))
        if self._phase == "client":
            self._phase = "server"
            return NEED_MORE
        if self._server:
            return self._decide(classify_server(self._server, final=True))
        if self.hold_for:
            self._phase = "quiet"  # a silent client may still send anything: wait for bytes
            return NEED_MORE
        return self._decide(tcp_verdict("none", silent=True))
