"""The nftables backstop: agent sockets may only reach the proxy and the resolver, and nothing from
outside the host reaches an agent socket except through the proxy's inbound listener.

The BPF hooks do the redirecting; this table is what refuses everything they miss (a detached
program, raw or packet paths, QUIC). It matches agents two ways: by the mark the sock_create hook
puts on every agent socket, and by cgroup path. Both are properties of the socket fixed when it
is created, so neither sees a socket opened before its process was enrolled: `interlock enroll`
marks and aborts those itself (interceptor/presockets.py), after which this table judges them.

Inbound (prerouting): a packet arriving from another host is looked up to the local socket it
would reach (`socket cgroupv2`, `socket mark`). If that is an agent socket, TCP goes to the
proxy's transparent inbound listener (`tproxy`), which asks the policy and relays to the agent's
listener over loopback (`iif lo` is never diverted, so the relay does not loop); when no
transparent listener is there (proxy down) the segment is answered with a reset. UDP to an agent
socket from outside is dropped. The `counter`s of those refusals are what the daemon records."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

NFT_CGROUP_BASE = Path("/sys/fs/cgroup")


class FirewallError(RuntimeError):
    pass


@dataclass(frozen=True)
class Backstop:
    table: str
    agents_cgroup: Path  # absolute path of the agents cgroup
    cgroup_level: int  # its depth below the cgroup2 mount
    mark: int
    proxy_port: int
    dns_port: int
    inbound_port: int  # the proxy's transparent listener for connections into agents

    def ruleset(self) -> str:
        t = self.table
        cgroup_rule = cgroup_in = ""
        try:
            # nft resolves the path below /sys/fs/cgroup whatever the cgroup2 mount point is.
            rel = self.agents_cgroup.relative_to(NFT_CGROUP_BASE)
            cgroup_rule = f'socket cgroupv2 level {self.cgroup_level} "{rel}" jump agent'
            cgroup_in = f'meta l4proto {{ tcp, udp }} socket cgroupv2 level {self.cgroup_level} "{rel}" jump agent_in'
        except ValueError:
            pass
        return f"""
add table inet {t}
delete table inet {t}
table inet {t} {{
    chain output {{
        type filter hook output priority filter - 10; policy accept;
        meta mark {self.mark:#x} jump agent
        {cgroup_rule}
    }}
    chain agent {{
        oif "lo" ct direction reply accept
        ip daddr 127.0.0.1 tcp dport {self.proxy_port} accept
        ip6 daddr ::1 tcp dport {self.proxy_port} accept
        ip daddr 127.0.0.1 udp dport {self.dns_port} accept
        ip6 daddr ::1 udp dport {self.dns_port} accept
        meta l4proto tcp counter reject with tcp reset
        counter reject with icmpx admin-prohibited
    }}
    chain inbound {{
        type filter hook prerouting priority mangle - 10; policy accept;
        iif "lo" accept
        meta l4proto {{ tcp, udp }} socket mark {self.mark:#x} jump agent_in
        {cgroup_in}
    }}
    chain agent_in {{
        meta l4proto tcp meta nfproto ipv4 tproxy ip to 127.0.0.1:{self.inbound_port} accept
        meta l4proto tcp meta nfproto ipv6 tproxy ip6 to [::1]:{self.inbound_port} accept
        meta l4proto tcp counter reject with tcp reset comment "inbound-tcp-refused"
        counter drop comment "inbound-other-dropped"
    }}
}}
"""


# libnftables is not safe to call from two threads of one process at once, and the daemon's
# watch thread and its status thread both list the table. Measured with four threads: a listing
# came back altered within a few hundred (`meta l4proto { tcp, tcp }`, `oif "1"` for "lo": names
# printed through static buffers such as getprotobynumber()'s), or the process segfaulted. An
# altered listing is tampering to the watch, which then locked every agent out.
_LOCK = threading.Lock()


def _nft(cmd: str, json_output: bool = False) -> tuple[int, str, str]:
    """One libnftables command (nft syntax; `json_output` for listings): (rc, stdout, stderr),
    one at a time in this process."""
    import nftables  # Debian's python3-nftables, a binding over libnftables

    with _LOCK:
        nft = nftables.Nftables()
        nft.set_json_output(json_output)
        return nft.cmd(cmd)


def _run(cmd: str) -> str:
    rc, out, err = _nft(cmd)
    if rc != 0:
        raise FirewallError(err.strip() or f"nft failed: {cmd[:80]}")
    return out


# What the kernel changes by itself between two listings: object handles, counter and quota
# values, set-element timers. Everything else in the table is what the daemon generated.
_VOLATILE = frozenset({"handle", "packets", "bytes", "used", "expires"})
_CHAIN = re.compile(r"^\s*chain\s+(\S+)\s*\{")

Snapshot = list  # the table as nft JSON objects (table, chains, rules, sets, ...), normalised


def _normalise(obj):
    if isinstance(obj, dict):
        return {k: _normalise(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_normalise(v) for v in obj]
    return obj


def snapshot(table: str) -> Snapshot | None:
    """Every object of the table (its flags, chains with hook/priority/policy, rules in order,
    sets with their elements, maps, named objects) as nft lists it in JSON, with what the
    kernel changes by itself stripped; None when there is no such table."""
    rc, out, _ = _nft(f"list table inet {table}", json_output=True)
    if rc != 0 or not out.strip():
        return None
    return [_normalise(item) for item in json.loads(out).get("nftables", []) if "metainfo" not in item]


def _declared_rules(ruleset: str) -> dict[str, int]:
    """Rules per chain in a generated ruleset text (a chain's `type …` line is not a rule)."""
    counts: dict[str, int] = {}
    chain = None
    for line in ruleset.splitlines():
        text = line.strip()
        if m := _CHAIN.match(line):
            chain = m.group(1)
            counts[chain] = 0
        elif text == "}":
            chain = None
        elif chain and text and not text.startswith(("type ", "policy ", "#")):
            counts[chain] += 1
    return counts


def install(backstop: Backstop) -> Snapshot:
    """Replace the table in one transaction (there is no moment without rules); returns the
    installed table, the reference every later check compares with as a whole."""
    ruleset = backstop.ruleset()
    _run(ruleset)
    snap = snapshot(backstop.table)
    if snap is None:
        raise FirewallError(f"table inet {backstop.table} is missing right after it was installed")
    listed: dict[str, int] = {}
    for item in snap:
        if "chain" in item:
            listed.setdefault(item["chain"]["name"], 0)
        elif "rule" in item:
            listed[item["rule"]["chain"]] = listed.get(item["rule"]["chain"], 0) + 1
    if listed != _declared_rules(ruleset):
        raise FirewallError(f"table inet {backstop.table} changed while it was installed "
                            f"(rules per chain {listed}, generated {_declared_rules(ruleset)})")
    return snap


def differences(expected: Snapshot, actual: Snapshot | None, limit: int = 5) -> list[str]:
    """What is in one and not the other (for the tamper record), at most `limit` lines."""
    if actual is None:
        return ["table removed"]
    exp = [json.dumps(x, sort_keys=True) for x in expected]
    act = [json.dumps(x, sort_keys=True) for x in actual]
    out = [f"+ {x}" for x in act if x not in exp] + [f"- {x}" for x in exp if x not in act]
    if not out:
        out = ["objects reordered"]
    return [line[:300] for line in out[:limit]]


def intact(backstop: Backstop, expected: Snapshot | None) -> bool:
    """The installed table is exactly the generated one: any added, removed or changed object —
    an `accept` rule, a new chain, a set element, table flags — counts as tampering."""
    return expected is not None and snapshot(backstop.table) == expected


INBOUND_COUNTERS = ("inbound-tcp-refused", "inbound-other-dropped")


def inbound_refusals(table: str) -> dict[str, int]:
    """Packets the inbound chain refused so far, by rule comment (what the daemon records as
    `inbound-refused` events: segments reset while no proxy listened, datagrams dropped)."""
    import json

    rc, out, _ = _nft(f"list chain inet {table} agent_in", json_output=True)
    if rc != 0:
        return {}
    counts: dict[str, int] = {}
    for item in json.loads(out).get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("comment") not in INBOUND_COUNTERS:
            continue
        for stmt in rule.get("expr", []):
            if "counter" in stmt:
                counts[rule["comment"]] = int(stmt["counter"].get("packets", 0))
    return counts


def remove(table: str) -> bool:
    rc, _, _ = _nft(f"delete table inet {table}")
    return rc == 0
