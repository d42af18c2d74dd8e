"""Hole 11, resource exhaustion: held connections that push data, connections that trickle a
byte at a time, connections that sit idle, one agent opening more than its share, and TLS hellos
with server names no certificate can carry. The proxy's memory stays bounded, every such
connection ends (refused, reset or alerted, never hanging) and is on record, nothing of it reaches
the server, and another agent still gets through (the control).

Counts and times are kept small (40 held connections, a few seconds each) and all traffic stays
inside the lab's namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lab.instance import INTERLOCK, Instance
from lab.testing import ECHO_PORT, SLOWDOWN, instance_name, wait_until

pytestmark = pytest.mark.datapath

AS_AGENT = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]
FREE_PORT = 7200  # an echo server the policy allows
HELD = 40
CAP = 50
HEADER_TIMEOUT = 3.0 * SLOWDOWN
IDLE_TIMEOUT = 4.0 * SLOWDOWN

POLICY = """\
default: deny
targets:
  held: {{address: "{b4}", port: {held}}}
  free: {{address: "{b4}", port: {free}}}
rules:
  - name: held-for-a-human
    target: held
    decision: approve
    timeout: 2m
  - name: free-ok
    target: free
    decision: allow
"""


@pytest.fixture(scope="module")
def free(echo_at):
    return echo_at(FREE_PORT)


@pytest.fixture(scope="module")
def inst(lab, echo, free, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY.format(b4=lab.b.addr4, held=ECHO_PORT, free=FREE_PORT))
    i = Instance(lab.a, instance_name("ex"), proxy_port=16401, dns_port=16453, policy=str(policy),
                 header_timeout=HEADER_TIMEOUT, idle_timeout=IDLE_TIMEOUT, max_connections_per_agent=CAP)
    try:
        i.start()
        yield i
    finally:
        i.close()


def proxy_rss_kib(inst: Instance) -> int:
    """Resident memory of the instance's proxy process(es), found by their command line."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"proxy.server" in cmd and str(inst.state_dir).encode() in cmd:
                total += next(int(x.split()[1]) for x in open(f"/proc/{pid}/status") if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total


def slow(inst: Instance, *args: str, agent: str = "bot", timeout: float = 120) -> dict:
    r = inst.agent([*AS_AGENT, sys.executable, "-m", "lab.slow", *args], agent=agent, timeout=timeout)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"no result from lab.slow: {r.stdout[-2000:]} {r.stderr[-2000:]}") from None


def hoard(inst: Instance, agent: str, *args: str) -> subprocess.Popen:
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", agent, "--",
           *AS_AGENT, sys.executable, "-m", "lab.slow", "hoard", *args]
    return inst.host.popen(cmd, stdout=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=120 * SLOWDOWN)
    return json.loads(out.strip().splitlines()[-1])


def deny_all(inst: Instance) -> None:
    for a in json.loads(inst.cli("approvals", "--json").stdout):
        inst.cli("deny", a["id"], "--reason", "test over")


def sessions_of(inst: Instance, pid: int) -> list[dict]:
    return [s for s in inst.sessions() if s["tgid"] == pid]


def test_held_connections_stop_reading(inst, lab, echo, free):
    assert inst.probe("tcp", lab.b.addr4, str(FREE_PORT))["ok"]  # warm: the proxy's steady state
    before = proxy_rss_kib(inst)
    reached = len(echo.seen("tcp"))
    p = hoard(inst, "bot", lab.b.addr4, str(ECHO_PORT), str(HELD), "--push", "16384", "--hold", str(6 * SLOWDOWN))
    first = json.loads(p.stdout.readline())
    assert first["connected"] == HELD
    peak, pending = before, 0
    while p.poll() is None:  # sample while the agent pushes and holds
        peak = max(peak, proxy_rss_kib(inst))
        if pending < HELD:
            pending = len(json.loads(inst.cli("approvals", "--json").stdout))
        time.sleep(0.2)
    r = finish(p)
    assert pending == HELD, "every connection was held for a human"
    grew = peak - before
    print(f"proxy RSS {before} KiB -> {peak} KiB with {HELD} held connections, {r['pushed'] >> 20} MiB offered "
          f"({grew / HELD:.0f} KiB each)")
    assert grew < HELD * 1024, f"{HELD} held connections grew the proxy by {grew} KiB"
    assert len(echo.seen("tcp")) == reached, "a held connection reached the server"
    held = [e for e in inst.events("approval-requested")]
    assert len(held) >= HELD
    # control: while those were held, the other target kept working, and still does
    assert inst.probe("tcp", lab.b.addr4, str(FREE_PORT))["ok"]
    deny_all(inst)


def test_one_agent_cannot_starve_another(inst, lab, echo, free):
    mark = len(free.seen("tcp"))
    p = hoard(inst, "flood", lab.b.addr4, str(ECHO_PORT), str(CAP + 30), "--push", "1", "--hold", str(8 * SLOWDOWN))
    assert json.loads(p.stdout.readline())["connected"] == CAP + 30  # connect() succeeds: the proxy accepts
    assert wait_until(lambda: len(json.loads(inst.cli("approvals", "--json").stdout)) >= CAP, timeout=30)
    # the flooding agent is at its cap: its next connection is refused before anything goes out
    r = inst.probe("tcp", lab.b.addr4, str(FREE_PORT), agent="flood")
    assert not r["ok"], r
    # the control: another agent gets through meanwhile
    r2 = inst.probe("tcp", lab.b.addr4, str(FREE_PORT), agent="bot")
    assert r2["ok"], r2
    assert len(free.seen("tcp")) == mark + 1, "only the other agent's connection reached the server"
    out = finish(p)
    assert out["outcome"].get("ECONNRESET", 0) >= 30, out
    refused = [s for s in inst.sessions("flood") if s["outcome"] == "refused"]
    assert len(refused) >= 31 and all("max_connections_per_agent" in s["detail"] for s in refused)
    deny_all(inst)


def test_trickling_connections_end_at_header_timeout(inst, lab, echo):
    mark = len(echo.seen("tcp"))
    t0 = time.monotonic()
    out = slow(inst, "hoard", lab.b.addr4, str(ECHO_PORT), "30", "--trickle", "0.5", "--hold", str(HEADER_TIMEOUT + 8 * SLOWDOWN),
               agent="slowpoke")
    took = time.monotonic() - t0
    assert out["outcome"].get("ECONNRESET") == 30 and out["outcome"]["open"] == 0, out
    assert took < HEADER_TIMEOUT + 8 * SLOWDOWN + 20, "the connections did not end"
    assert len(echo.seen("tcp")) == mark, "a trickling connection reached the server"
    rows = wait_until(lambda: [s for s in inst.sessions("slowpoke") if s["rule"] == "unclassified"])
    assert len(rows) == 30 and all("header_timeout" in s["detail"] for s in rows)


def test_idle_connections_are_closed(inst, lab, free):
    script = ("import socket,sys,time,json; s=socket.create_connection((sys.argv[1], int(sys.argv[2]))); "
              "s.sendall(b'hello interlock\\n'); a=s.recv(100); t=time.monotonic(); s.settimeout(60)\n"
              "try: b=s.recv(100); end='eof' if not b else 'data'\n"
              "except OSError as e: end=type(e).__name__\n"
              "print(json.dumps({'echo': a.decode(), 'end': end, 'after': time.monotonic()-t}))")
    r = inst.agent([*AS_AGENT, sys.executable, "-c", script, lab.b.addr4, str(FREE_PORT)], agent="idler", timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["echo"] == "hello interlock\n", out  # control: the connection worked
    assert out["end"] in ("ConnectionResetError", "eof") and out["after"] >= IDLE_TIMEOUT - 0.5, out
    s = wait_until(lambda: [x for x in inst.sessions("idler") if x["ended"]])
    assert s and s[-1]["outcome"] == "idle" and "idle_timeout" in s[-1]["detail"]


BAD_SNIS = {
    "empty label": b"a..lab.test",
    "dot only": b".",
    "NUL": b"www.lab.test\x00.attacker.test",
    "CRLF": b"www.lab.test\r\nX-Injected: 1",
    "300-byte label": b"x" * 300 + b".test",
    "non-ASCII": "bücher.test".encode(),
    "space": b"www lab.test",
}


@pytest.mark.parametrize("kind", list(BAD_SNIS))
def test_odd_server_names_get_a_tls_alert(inst, lab, free, kind):
    mark = len(free.seen("tcp-data"))
    r = slow(inst, "hello", lab.b.addr4, str(FREE_PORT), BAD_SNIS[kind].hex(), "--wait", str(10 * SLOWDOWN))
    assert r["ok"] and r["alert"] == 112 and r["end"] in ("eof", "ECONNRESET"), r  # unrecognized_name
    s = wait_until(lambda: [x for x in sessions_of(inst, r["pid"]) if x["ended"]])
    assert s and s[0]["outcome"] == "tls-error" and "not a host name" in s[0]["detail"]
    assert any(e["session"] == s[0]["id"] for e in inst.events("tls-bad-sni"))
    assert len(free.seen("tcp-data")) == mark, "hello bytes reached the server"
    # control: the same hello with a proper name goes on to a ServerHello
    r = slow(inst, "hello", lab.b.addr4, str(FREE_PORT), b"www.lab.test".hex(), "--wait", str(3 * SLOWDOWN))
    assert r["received"].startswith("16"), r
    assert inst.status()["proxy_listening"]
