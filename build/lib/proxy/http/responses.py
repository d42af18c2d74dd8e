"""Responses the proxy writes itself: refusals and gateway errors.

Each is a Canned value (status, headers, body) so that any producer — these generic ones, the
AWS-shaped errors of proxy.aws.errors — is sent the same way: AgentConnection.respond(*canned).
Bodies are JSON because agents are programs: a machine-readable rule name lets an agent explain
to its user why it was stopped instead of retrying blindly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

# Lets agents and humans tell a refusal by Interlock from one by the service itself.
MARK_HEADER = "X-Interlock"


@dataclass(frozen=True)
class Canned:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    reason: str = ""

    def __iter__(self) -> Iterator[object]:
        """Unpacks as (status, headers, body) for AgentConnection.respond(*canned)."""
        return iter((self.status, self.headers, self.body))


def _json(status: int, payload: dict[str, object], extra: tuple[tuple[str, str], ...] = ()) -> Canned:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return Canned(status, (("Content-Type", "application/json"), ("Cache-Control", "no-store"), *extra), body)


def blocked(rule: str, reason: str, *, request_id: str | None = None, status: int = 403) -> Canned:
    """403: the policy refused this request. Names the rule so the refusal can be explained."""
    payload: dict[str, object] = {"error": "blocked_by_policy", "rule": rule, "reason": reason}
    if request_id:
        payload["request_id"] = request_id
    return _json(status, payload, ((MARK_HEADER, f"blocked; rule={_token(rule)}"),))


def approval_timeout(rule: str, *, request_id: str | None = None) -> Canned:
    """403 after a hold for human approval expired unanswered."""
    return blocked(rule, "approval was not granted in time", request_id=request_id)


def bad_gateway(detail: str = "upstream connection failed") -> Canned:
    """502: the origin could not be reached or answered with something that is not HTTP."""
    return _json(502, {"error": "bad_gateway", "detail": detail}, ((MARK_HEADER, "bad-gateway"),))


def gateway_timeout(detail: str = "upstream did not answer in time") -> Canned:
    """504: the origin took too long."""
    return _json(504, {"error": "gateway_timeout", "detail": detail}, ((MARK_HEADER, "gateway-timeout"),))


def bad_request(detail: str = "malformed request", status: int = 400) -> Canned:
    return _json(status, {"error": "bad_request", "detail": detail}, ((MARK_HEADER, "bad-request"),))


def _token(s: str) -> str:
    """A rule name fit for a header value: printable ASCII, no line breaks."""
    return "".join(c if 0x20 < ord(c) < 0x7F and c not in ',;"' else "_" for c in s)[:128]
