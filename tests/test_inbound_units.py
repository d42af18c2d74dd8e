"""Inbound connections without a kernel: the `inbound` operation in the policy, the sock_diag
parser and listener choice, the nft rules the backstop generates, the config default."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from interceptor.config import Config, ConfigError, finish
from interceptor.firewall import Backstop
from policy.engine import INBOUND, Destination, PolicyError, load, load_default
from policy.model import Operation, Verdict
from proxy import listeners
from proxy.inbound import PROTOCOL

POLICY = """\
default: allow
targets:
  runners:
    cidr: [10.1.0.0/24, "fd00:1::/64"]
    port: 8080
  everywhere: {}
rules:
  - name: anything-for-ops
    agent: ops
    decision: allow
  - name: runners-call-web
    agent: web
    target: runners
    operation: inbound
    decision: allow
"""


def inbound(policy, agent: str, peer: str, port: int):
    op = Operation(PROTOCOL, INBOUND, (f"{peer}:40000",))
    return policy.decide(agent, Destination(peer, port, (), PROTOCOL), op)


def test_only_rules_that_name_inbound_allow_it():
    pol = load("p.yaml", POLICY)
    d = inbound(pol, "web", "10.1.0.7", 8080)
    assert (d.verdict, d.rule) == (Verdict.ALLOW, "runners-call-web")
    assert inbound(pol, "web", "fd00:1::9", 8080).verdict is Verdict.ALLOW
    # a peer outside the target, or another port of the agent: no rule, and the default never allows
    for peer, port in (("10.2.0.7", 8080), ("10.1.0.7", 8081)):
        d = inbound(pol, "web", peer, port)
        assert (d.verdict, d.rule) == (Verdict.DENY, "default"), (peer, port)
    # a rule with no operation (any) matches outbound work but not inbound
    d = inbound(pol, "ops", "10.1.0.7", 8080)
    assert (d.verdict, d.rule) == (Verdict.DENY, "default")
    assert pol.decide("ops", Destination("10.1.0.7", 8080), Operation("tcp", "connect")).verdict is Verdict.ALLOW
    # approve holds the peer for a human; a glob that happens to match `inbound` is not enough
    held = load("p.yaml", POLICY + "  - name: hold-strangers\n    target: everywhere\n    operation: inbound\n"
                                   "    decision: approve\n  - name: globbed\n    operation: 'in*'\n    decision: allow\n")
    assert inbound(held, "web", "10.9.9.9", 22).rule == "hold-strangers"
    assert inbound(held, "web", "10.9.9.9", 22).verdict is Verdict.APPROVE


def test_the_embedded_default_policy_refuses_inbound():
    assert load_default().default is Verdict.ALLOW
    assert inbound(load_default(), "bot", "10.1.0.7", 8080).verdict is Verdict.DENY


def test_inbound_cannot_be_masked():
    with pytest.raises(PolicyError) as e:
        load("p.yaml", "rules:\n  - name: m\n    operation: inbound\n    decision: mask\n")
    assert "cannot be masked" in str(e.value)


def _diag_msg(family: int, addr: str, port: int, uid: int, inode: int, mark: int, cgroup: int, v6only: int | None) -> bytes:
    packed = socket.inet_pton(family, addr).ljust(16, b"\0")
    body = struct.pack("=BBBB", family, 10, 0, 0) + port.to_bytes(2, "big") + b"\0\0" + packed + b"\0" * 16
    body += struct.pack("=I8sIIIII", 0, b"\0" * 8, 0, 0, 0, uid, inode)
    attrs = struct.pack("=HHI", 8, listeners.INET_DIAG_MARK, mark) + struct.pack("=HHQ", 12, listeners.INET_DIAG_CGROUP_ID, cgroup)
    if v6only is not None:
        attrs += struct.pack("=HHB3x", 5, listeners.INET_DIAG_SKV6ONLY, v6only)
    body += attrs
    return struct.pack("=IHHII", 16 + len(body), listeners.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def test_sock_diag_dump_is_parsed():
    done = struct.pack("=IHHII", 20, listeners.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    data = _diag_msg(socket.AF_INET, "10.0.0.1", 8080, 65533, 77, 0x494C0001, 4242, None) + \
        _diag_msg(socket.AF_INET6, "::", 8080, 0, 78, 0, 1, 0) + done
    got, finished = listeners.parse_dump(data)
    assert finished
    assert got == [listeners.Listener(socket.AF_INET, "10.0.0.1", 8080, 65533, 77, 0x494C0001, 4242, False),
                   listeners.Listener(socket.AF_INET6, "::", 8080, 0, 78, 0, 1, False)]
    # a message cut short ends the parse, it is not read past its end
    assert listeners.parse_dump(data[:50]) == ([], True)


def L(family, addr, agent=True, v6only=False, inode=1):  # noqa: N802
    return listeners.Listener(family, addr, 8080, 0, inode, 1 if agent else 0, 0, v6only)


def test_the_listener_chosen_is_the_one_the_kernel_delivers_to():
    def is_agent(x):
        return x.mark == 1

    v4_any, v4_exact = L(socket.AF_INET, "0.0.0.0", inode=1), L(socket.AF_INET, "10.0.0.1", inode=2)
    dual, v6_exact = L(socket.AF_INET6, "::", inode=3), L(socket.AF_INET6, "fd00::1", inode=4)
    only6 = L(socket.AF_INET6, "::", v6only=True, inode=5)
    assert listeners.chosen([v4_any, v4_exact, dual], "10.0.0.1", is_agent) is v4_exact
    assert listeners.chosen([dual, v4_any], "10.0.0.1", is_agent) is v4_any
    assert listeners.chosen([dual], "10.0.0.1", is_agent) is dual  # v4 into a dual-stack socket
    assert listeners.chosen([only6], "10.0.0.1", is_agent) is None
    assert listeners.chosen([only6, v6_exact], "fd00::1", is_agent) is v6_exact
    assert listeners.chosen([v4_any], "fd00::1", is_agent) is None
    assert listeners.chosen([L(socket.AF_INET, "0.0.0.0", agent=False)], "10.0.0.1", is_agent) is None


def test_the_backstop_diverts_inbound_and_refuses_the_rest():
    b = Backstop("interlock-x", Path("/sys/fs/cgroup/interlock/agents"), 2, 0x494C0001, 15001, 15053, 15003)
    rules = b.ruleset()
    assert "type filter hook prerouting" in rules and 'iif "lo" accept' in rules
    assert 'socket cgroupv2 level 2 "interlock/agents" jump agent_in' in rules
    assert "socket mark 0x494c0001 jump agent_in" in rules
    assert "tproxy ip to 127.0.0.1:15003" in rules and "tproxy ip6 to [::1]:15003" in rules
    # what tproxy cannot hand over (no transparent listener: proxy down) is reset, the rest dropped
    chain = rules[rules.index("chain agent_in"):]
    assert chain.index("tproxy ip6") < chain.index("reject with tcp reset") < chain.index("drop")
    # agents answer connections opened to them over loopback only
    assert 'oif "lo" ct direction reply accept' in rules


def test_inbound_port_defaults_next_to_the_proxy_and_must_differ():
    assert finish(Config()).inbound_port == 15003
    assert finish(Config(proxy_port=15001, dns_port=15003)).inbound_port == 15004
    with pytest.raises(ConfigError):
        finish(Config(inbound_port=15001))
