"""The answer type shared by every detector: a Verdict, or NEED_MORE while the bytes are too few."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

TCP: Final = "tcp"
"""Label for a stream no detector recognised: the proxy relays it as opaque TCP."""

LABELS: Final = ("tcp", "http", "http2", "tls", "postgres", "redis", "mongodb", "dns", "ssh", "mysql", "smtp")
"""Every Verdict.protocol the classifier can give: policy that decides per protocol must cover them all."""

DECISIVE: Final = 0.9
"""A verdict at least this sure ends classification even while other detectors still wait."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a connection speaks, how sure we are (0..1), and protocol facts worth a policy decision.

    `details` carries e.g. sni/alpn for TLS, the startup parameters for PostgreSQL, the command for
    Redis; `side` says whose bytes decided ("client", "server", or "none" when both stayed silent)."""

    protocol: str
    confidence: float
    details: dict[str, Any] = field(default_factory=dict)
    side: str = "client"

    def __hash__(self) -> int:  # details is a dict: hash on the label only
        return hash((self.protocol, self.confidence, self.side))


class NeedMore:
    """Type of the NEED_MORE singleton: falsy, so `if result:` reads as "decided"."""

    __slots__ = ()
    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __reduce__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()

Result = Verdict | NeedMore
"""What every detector and the Classifier return."""


def tcp_verdict(side: str = "client", **details: Any) -> Verdict:
    """The fallback: nothing matched, relay as plain TCP."""
    return Verdict(TCP, 0.5, dict(details), side)
