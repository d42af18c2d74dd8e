"""The vocabulary every protocol handler shares with the policy engine and the recorder.

A handler turns what it parsed into Operations; the engine answers each with a Decision; the
recorder stores both. Nothing here knows a wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVE = "approve"  # hold until a human decides
    MASK = "mask"  # allow, with response fields masked


@dataclass(frozen=True)
class Operation:
    """One thing an agent asks a service to do, as the policy speaks of it.

    protocol: "tcp", "postgres", "http", "aws", "redis", …
    action:   the verb in that protocol's policy words ("connect", "delete", "s3:DeleteBucket", "GET")
    objects:  what it touches (tables, buckets/keys, URL paths)
    risks:    built-in risk flags found by the parser ("delete-without-where", "drop", …)
    summary:  text for the recorder and the approver, already masked
    attributes: anything else a rule may match (host, method, path, function names, …)
    """

    protocol: str
    action: str
    objects: tuple[str, ...] = ()
    risks: tuple[str, ...] = ()
    summary: str = ""
    attributes: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str  # the rule's name, or "default"
    reason: str
    mask: tuple[str, ...] = ()  # field names or detector names to mask, for Verdict.MASK
    approval_timeout: float | None = None
    # Who may answer a hold (Verdict.APPROVE), from the rule's `approvers:`:
    # {"groups": [..], "four_eyes": bool}; None: anyone who may approve at all.
    approvers: dict | None = field(default=None, hash=False, compare=False)
