"""Enrolment tokens: `il1.<id>.<secret>.<ca_sha256>`, single use, expiring.

The store keeps sha256(secret) only, so a database dump cannot join a host. Redeeming is one
atomic UPDATE … WHERE used_at IS NULL AND expires_at > now(): two joins racing with one token
cannot both win. The CA hash lets the joiner pin the recorder's CA before it trusts anything."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

PREFIX = "il1"
_TOKEN = re.compile(r"il1\.([0-9a-f]{12})\.([A-Za-z0-9_-]{32,64})\.([0-9a-f]{64})")


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    id: str
    secret: str
    ca_sha256: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.id}.{self.secret}.{self.ca_sha256}"

    @property
    def secret_sha256(self) -> bytes:
        return hashlib.sha256(self.secret.encode()).digest()


def new(ca_sha256: str) -> Token:
    return Token(secrets.token_hex(6), secrets.token_urlsafe(32), ca_sha256)


def parse(text: str) -> Token:
    m = _TOKEN.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise TokenError("not an enrolment token (il1.<id>.<secret>.<ca sha256>, from 'interlock recorder token')")
    return Token(*m.groups())


def parse_duration(text: str) -> int:
    """'90s', '15m', '1h', '7d' → seconds; TokenError otherwise."""
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not m or int(m.group(1)) == 0:
        raise TokenError(f"--expires {text!r}: give a duration like 30m, 1h or 7d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
