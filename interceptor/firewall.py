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


def _nft():
    import nftables  # Debian's python3-nftables, a binding over libnftables

    nft = nftables.Nftables()
    nft.set_json_output(False)
    return nft


def _run(cmd: str) -> str:
    rc, out, err = _nft().cmd(cmd)
    if rc != 0:
        raise FirewallError(err.strip() or f"nft failed: {cmd[:80]}")
    return out


def install(backstop: Backstop) -> None:
    """Replace the table in one transaction: there is no moment without rules."""
    _run(backstop.ruleset())


def present(table: str) -> bool:
    rc, out, _ = _nft().cmd(f"list table inet {table}")
    return rc == 0 and "chain agent" in out and "chain output" in out


def intact(backstop: Backstop) -> bool:
    """The table exists with both chains and the agent chain still ends in reject."""
    rc, out, _ = _nft().cmd(f"list table inet {backstop.table}")
    return rc == 0 and out.count("reject") >= 3 and "jump agent" in out and "jump agent_in" in out \
        and f":{backstop.inbound_port} accept" in out


INBOUND_COUNTERS = ("inbound-tcp-refused", "inbound-other-dropped")


def inbound_refusals(table: str) -> dict[str, int]:
    """Packets the inbound chain refused so far, by rule comment (what the daemon records as
    `inbound-refused` events: segments reset while no proxy listened, datagrams dropped)."""
    import json

    nft = _nft()
    nft.set_json_output(True)
    rc, out, _ = nft.cmd(f"list chain inet {table} agent_in")
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
    rc, _, _ = _nft().cmd(f"delete table inet {table}")
    return rc == 0
