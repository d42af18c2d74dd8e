"""A first guess at the protocol from the opening bytes of either side, as a plain label.

Kept for the relay, which calls these on the first read of each side: they are the final-mode
classify functions reduced to a string, with "unknown" (not "tcp") when nothing fits, because the
relay asks from_server only while the client's label is "unknown". Pure, never raises."""

from __future__ import annotations

from .engine import classify_client, classify_server
from .verdict import TCP, Verdict


def _label(v: object) -> str:
    return v.protocol if isinstance(v, Verdict) and v.protocol != TCP else "unknown"


def from_client(data: bytes) -> str:
    """Guess from what the client sent first; 'unknown' when nothing fits."""
    return _label(classify_client(data or b"", final=True))


def from_server(data: bytes) -> str:
    """Guess from a server that spoke first (MySQL, SSH, SMTP greet before the client)."""
    return _label(classify_server(data or b"", final=True))
