"""The nftables backstop: agent sockets may only reach the proxy and the resolver.

The BPF hooks do the redirecting; this table is what refuses everything they miss (a detached
program, raw or packet paths, QUIC). It matches agents two ways: by the mark the sock_create hook
puts on every agent socket, and by cgroup path. Both are properties of the socket fixed when it
is created, so neither sees a socket opened before its process was enrolled: `interlock enroll`
marks and aborts those itself (interceptor/presockets.py), after which this table judges them."""

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

    def ruleset(self) -> str:
        t = self.table
        cgroup_rule = ""
        try:
            # nft resolves the path below /sys/fs/cgroup whatever the cgroup2 mount point is.
            rel = self.agents_cgroup.relative_to(NFT_CGROUP_BASE)
            cgroup_rule = f'socket cgroupv2 level {self.cgroup_level} "{rel}" jump agent'
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
        ct direction reply accept
        ip daddr 127.0.0.1 tcp dport {self.proxy_port} accept
        ip6 daddr ::1 tcp dport {self.proxy_port} accept
        ip daddr 127.0.0.1 udp dport {self.dns_port} accept
        ip6 daddr ::1 udp dport {self.dns_port} accept
        meta l4proto tcp counter reject with tcp reset
        counter reject with icmpx admin-prohibited
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
    return rc == 0 and out.count("reject") >= 2 and "jump agent" in out


def remove(table: str) -> bool:
    rc, _, _ = _nft().cmd(f"delete table inet {table}")
    return rc == 0
