"""Which names count for a connection: a hostname is evidence only when it is bound to the
dialled address.

An agent chooses its SNI and its Host header freely; alone they say nothing about where the
connection goes. A name counts for a connection when
  - this agent resolved it through Interlock's resolver to the dialled address, within the
    answer's TTL (proxy/gate.py NameBindings), or
  - in intercept mode, the proxy's own verified TLS handshake with the dialled address, made with
    that name as SNI, succeeded: the service's certificate proves the name. An HTTP Host then
    counts when that certificate covers it too.
Otherwise the connection or request is judged by its address alone: hostname targets do not
match it. A connection that claims no name (plain TCP, PostgreSQL) is judged under each name the
agent bound to the address, the most restrictive answer winning (policy.engine.Policy.decide)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from typing import TYPE_CHECKING

from policy.engine import Destination
from policy.model import Decision

if TYPE_CHECKING:
    from proxy.relay import AgentSide


def host_only(value: str) -> str:
    """A Host header or SNI as a bare name: lower case, no port, no brackets, no trailing dot."""
    # Asked once or twice per request: remembered, for values short enough that a cache full of
    # agent-chosen ones stays small (4096 × 256 characters).
    return _host_only(value) if len(value) <= _CACHED_LEN else _bare(value)


_CACHED_LEN = 256


@functools.lru_cache(maxsize=4096)
def _host_only(value: str) -> str:
    return _bare(value)


def _bare(value: str) -> str:
    v = value.strip().lower()
    if v.startswith("["):
        v = v[1:v.find("]")] if "]" in v else v[1:]
    elif v.count(":") == 1:
        v = v.split(":", 1)[0]
    return v.rstrip(".")


def claimed(conn: AgentSide) -> str | None:
    """The name the connection's first bytes give: the SNI, else the first request's Host (an
    address there is no name: the connection is judged by its address, as it is anyway)."""
    for key in ("sni", "host"):
        value = conn.details.get(key)
        if value:
            name = host_only(str(value))
            return name if name and not is_address(name) else None
    return None


def counts(conn: AgentSide, name: str) -> bool:
    """Whether name is bound to the dialled address for this agent, or proven by certificate."""
    rec = conn.rec
    return name in conn.proven or conn.proxy.names.bound(rec.agent, name, rec.dst_addr)


def connection_names(conn: AgentSide) -> tuple[str, ...]:
    name = claimed(conn)
    if name is None:
        return conn.proxy.names.names(conn.rec.agent, conn.rec.dst_addr)
    if name == conn.unproven_sni or counts(conn, name):
        return (name,)
    return ()


def judge_connection(conn: AgentSide) -> tuple[Decision, asyncio.Future]:
    """The connection's own decision (recorded; act once the future resolves).

    A TLS connection whose SNI is not bound is still judged under that SNI when every target the
    name matches is intercepted and one of them lists the name itself: the TLS handler then checks
    the service's certificate for that name before any request byte goes upstream
    (proxy/tls/handler.py), so the name is proven or nothing passes. A name only a glob matches
    must be resolved: otherwise the proxy's own ClientHello would carry whatever labels the agent
    chose under the glob to whatever address it chose. For passthrough (nothing is decrypted,
    nothing proven) an unbound SNI counts for nothing."""
    rec, proxy = conn.rec, conn.proxy
    name = claimed(conn)
    if name is not None and not counts(conn, name):
        policy = proxy.policy.current
        if rec.protocol == "tls" and conn.details.get("sni"):
            targets = policy.targets_for(Destination(rec.dst_addr, rec.dst_port, (name,), rec.protocol))
            if (targets and not any(t.tls == "passthrough" for t in targets)
                    and any(name in t.hostnames for t in targets)):
                conn.unproven_sni = name
        conn.event("name-unbound", {"name": name[:255], "address": rec.dst_addr,
                                    "judged": "pending the certificate's proof" if conn.unproven_sni else "by address"})
    return proxy.judge(rec, names=conn.names())


def request_names(conn: AgentSide, host: str, sni: str, counts_here) -> tuple[str, ...]:
    """The names one HTTP request is judged under: its Host, when it counts (counts_here: the
    handler's test, which knows about certificates), with the connection's SNI if that counts
    too; a Host that does not count leaves the request to its address alone (the SNI may not
    lend it a name); with no Host, or an address for one, the connection's names."""
    if not host or is_address(host):
        return conn.names()
    if not counts_here(host):
        return ()
    return tuple(dict.fromkeys(n for n in (host, sni) if n and counts_here(n)))


def is_address(name: str) -> bool:
    return _is_address(name) if len(name) <= _CACHED_LEN else _parses_as_address(name)


@functools.lru_cache(maxsize=4096)
def _is_address(name: str) -> bool:
    return _parses_as_address(name)


def _parses_as_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def certificate_covers(cert: dict | None, name: str) -> bool:
    """Whether a verified peer certificate (ssl.SSLObject.getpeercert()) names host `name`:
    its DNS subjectAltNames, a wildcard standing for exactly one left-most label (RFC 6125 §6.4.3)."""
    if not cert or not name:
        return False
    name = name.lower().rstrip(".")
    for kind, value in cert.get("subjectAltName", ()):
        if kind != "DNS":
            continue
        pattern = value.lower().rstrip(".")
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name:
            first, rest = name.split(".", 1)
            if first and rest == pattern[2:]:
                return True
    return False

