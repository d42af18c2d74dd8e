"""A connection-level refusal in the agent's own protocol, before any protocol handler runs:
HTTP gets a 403 with the JSON body every HTTP refusal has (proxy/http/responses.py), PostgreSQL a
FATAL ErrorResponse (SQLSTATE 42501, protocol doc "Message Formats"), TLS a fatal
`access_denied` alert (RFC 8446 §6.2). Each names the rule and the reason, so an agent can tell
its user why it was stopped. Other protocols have no safe way to say it: they get a reset.

Sans-IO: bytes out, no socket."""

from __future__ import annotations

from http import HTTPStatus

from proxy.http import responses
from proxy.postgres import wire

# TLS alert record: content type 21 (alert), legacy version TLS 1.2, length 2, fatal (2),
# access_denied (49). A ClientHello is all the agent sent, so no cipher protects it.
TLS_ACCESS_DENIED = bytes((21, 3, 3, 0, 2, 2, 49))


def http_response(canned: responses.Canned) -> bytes:
    """A whole HTTP/1.1 response that ends the connection (Connection: close)."""
    reason = canned.reason or HTTPStatus(canned.status).phrase
    head = [f"HTTP/1.1 {canned.status} {reason}", *(f"{k}: {v}" for k, v in canned.headers),
            f"Content-Length: {len(canned.body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + canned.body


def refusal(protocol: str, rule: str, reason: str) -> bytes | None:
    """What to write before closing a refused connection of `protocol` (a classifier label),
    or None where a reset is the only honest answer."""
    if protocol == "http":
        return http_response(responses.blocked(rule, reason))
    if protocol == "postgres":
        return wire.error_response("FATAL", "42501", f"interlock: connection refused by rule '{rule}'",
                                   detail=reason or None)
    if protocol == "tls":
        return TLS_ACCESS_DENIED
    return None
