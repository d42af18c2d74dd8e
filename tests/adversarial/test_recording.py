"""Hole 9: recording is a precondition of the data path.

An unprivileged agent (uid 65533, dropped by setpriv inside `interlock run`) talks to the lab
echo server (and asks DNS) while the instance's state dir is a real, small tmpfs that the test
fills: nothing reaches the server or the nameserver, the agent is refused, `interlock status` says why; once space is freed the
same connection works again and the failure, the refused attempts and the recovery are on record.
And a proxy killed (SIGKILL) in the middle of a bulk transfer leaves a session that the next
proxy closes out, with the byte counts flushed while it ran."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.instance import INTERLOCK, Instance
from lab.testing import ECHO_PORT, SLOWDOWN, default_policy_plus_opaque, instance_name, wait_until
from recorder.store import worker_of

pytestmark = pytest.mark.datapath
AGENT_UID = 65533
AS_AGENT = ["setpriv", "--reuid", str(AGENT_UID), "--regid", str(AGENT_UID), "--clear-groups"]
DISK = "4m"
METRICS_PORT = 16190


def policy_text(b4: str) -> str:
    return f"""\
targets:
  echo: {{address: {b4}, port: {ECHO_PORT}}}
rules:
  - name: echo-ok
    target: echo
    decision: allow
  - name: lab-names
    protocol: dns
    object: "*.example.test"
    decision: allow
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs over a directory of the test's own; unmounted afterwards, also on failure."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], check=False)


@pytest.fixture
def full_disk_instance(lab, small_disk, tmp_path, dns_echo):
    """An instance whose state dir (recorder database, run files, CA) is the small tmpfs; its
    config and log live elsewhere, as /etc and the journal would."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(lab.b.addr4))
    inst = Instance(lab.a, instance_name("rf"), proxy_port=16101, dns_port=16153, policy=str(policy),
                    metrics_address=f"127.0.0.1:{METRICS_PORT}", dns_upstream=lab.b.addr4)
    os.rmdir(inst.state_dir)
    inst.state_dir = small_disk
    inst.config_file, inst.log = tmp_path / "config.yaml", tmp_path / "daemon.log"
    try:
        yield inst.start()
    finally:
        inst.close()


def fill(directory: Path) -> Path:
    """Write a file until the file system has no block left (ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def recorder_metrics(inst: Instance) -> dict[str, float]:
    """The proxy's interlock_recorder_* gauges (Prometheus text, scraped in the agent host's namespace)."""
    fetch = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())"
    r = inst.host.run([sys.executable, "-c", fetch])
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = (line.split(" ") for line in r.stdout.splitlines() if line.startswith("interlock_recorder_"))
    return {k: float(v) for k, v in pairs}


def agent_probe(inst: Instance, host: str, *how: str) -> dict:
    """lab.probe as the unprivileged agent: `tcp HOST 7000` by default, or `udp HOST 53 --dns NAME`."""
    args = how or ("tcp", host, str(ECHO_PORT))
    r = inst.agent([*AS_AGENT, sys.executable, "-m", "lab.probe", *args], agent="bot")
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": "no result", "stdout": r.stdout, "stderr": r.stderr}


def test_a_full_disk_refuses_agent_traffic_until_it_can_record_again(full_disk_instance, lab, echo, dns_echo):
    inst = full_disk_instance
    # control before: the lab works and the agent is allowed
    first = agent_probe(inst, lab.b.addr4)
    assert first["ok"], (first, inst.log.read_text()[-3000:])
    assert inst.status()["recorder"]["state"] == "ok"

    # an agent enrolled before the disk fills (a long-running one), and one enrolled after
    probe = f"{sys.executable} -m lab.probe tcp {lab.b.addr4} {ECHO_PORT}"
    running = inst.host.popen([*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bot", "--",
                               *AS_AGENT, "sh", "-c", f"read go; {probe}; {probe}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert wait_until(lambda: running.pid in inst.status()["enrolled"]["bot"] or running.poll() is not None)
    filler = fill(inst.state_dir)
    before = len(echo.seen("tcp"))
    out, _ = running.communicate("go\n", timeout=60 * SLOWDOWN)
    refused = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    refused.append(agent_probe(inst, lab.b.addr4))
    time.sleep(0.5)
    assert len(refused) == 3 and not any(r["ok"] for r in refused), refused
    assert len(echo.seen("tcp")) == before, "the server saw a connection the recorder could not record"
    dns_before = len(dns_echo.seen("udp"))
    agent_probe(inst, lab.b.addr4, "udp", lab.b.addr4, "53", "--dns", "full.example.test")  # answered SERVFAIL
    time.sleep(0.3)
    assert len(dns_echo.seen("udp")) == dns_before, "a DNS query reached the nameserver unrecorded"
    # the proxy reports its state when it fails and then once a second
    st = wait_until(lambda: (s := inst.status())["recorder"]["proxy"] and
                    s["recorder"]["proxy"]["state"] == "failed" and s["recorder"]["proxy"]["refused"] >= 3 and s)
    assert st, inst.status()
    assert "SQLITE_FULL" in st["recorder"]["failed"]
    text = inst.cli("status").stdout
    assert "recorder: FAILED" in text and "disk is full" in text and "refused" in text, text
    m = recorder_metrics(inst)
    assert m["interlock_recorder_failed"] == 1 and m["interlock_recorder_refused"] >= 3, m

    filler.unlink()
    assert wait_until(lambda: inst.status()["recorder"]["state"] == "ok", timeout=15), inst.status()
    # control after: the same agent, the same connection, works again
    again = agent_probe(inst, lab.b.addr4)
    assert again["ok"], again
    assert len(echo.seen("tcp")) == before + 1
    agent_probe(inst, lab.b.addr4, "udp", lab.b.addr4, "53", "--dns", "free.example.test")
    assert wait_until(lambda: len(dns_echo.seen("udp")) > dns_before), "control: DNS goes upstream again"

    rows = [s for s in inst.sessions("bot") if s["uid"] == AGENT_UID]
    by_pid = {s["tgid"]: s for s in rows}
    for r in refused:  # the refused attempts are on record, written once the disk had room
        s = by_pid[r["pid"]]
        assert s["outcome"] == "recorder-error" and "SQLITE_FULL" in s["detail"], s
        assert s["dst_port"] == ECHO_PORT  # bytes_up: what the agent sent the proxy, held and dropped
    assert by_pid[again["pid"]]["outcome"] == "closed" and by_pid[again["pid"]]["verdict"] == "allow"
    failed = [e for e in inst.events("recorder-failed") if e["data"]["by"] == "proxy"]
    recovered = [e for e in inst.events("recorder-recovered") if e["data"]["by"] == "proxy"]
    assert failed and recovered and failed[-1]["id"] < recovered[-1]["id"]
    # each proxy worker that failed (`workers:`) says how many it refused when it recovers
    assert sum(e["data"]["refused"] for e in recovered) >= 3 and all(e["data"]["dropped"] == 0 for e in recovered)
    m = recorder_metrics(inst)
    assert m["interlock_recorder_failed"] == 0 and m["interlock_recorder_failures"] == 1, m


STREAM = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sent = received = 0
chunk = b"x" * 65536
try:
    while time.monotonic() < float(sys.argv[3]):
        s.sendall(chunk)
        sent += len(chunk)
        while received < sent:
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            received += len(data)
        time.sleep(0.002)
    error = None
except OSError as e:
    error = repr(e)
print(json.dumps({"sent": sent, "received": received, "error": error, "pid": __import__("os").getpid()}))
"""


def test_a_killed_proxy_leaves_a_closed_out_session_with_its_bytes(make_instance, lab, echo, tmp_path):
    # the agent streams bytes no protocol reader knows: the default policy refuses those unless
    # a rule lets that server's traffic through unread (docs/POLICY.md)
    policy = tmp_path / "policy.yaml"
    policy.write_text(default_policy_plus_opaque([lab.b.addr4], [ECHO_PORT]))
    inst = make_instance("rk", proxy_port=16201, dns_port=16253, policy=str(policy))
    before = len(echo.seen("tcp"))
    deadline = time.monotonic() + 60 * SLOWDOWN
    cmd = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "bulk", "--",
           *AS_AGENT, sys.executable, "-c", STREAM, lab.b.addr4, str(ECHO_PORT), str(deadline)]
    agent = inst.host.popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        # while it streams, its byte counts reach the disk (past 1 MiB the splice threads move them)
        live = wait_until(lambda: next((s for s in inst.sessions("bulk") if s["outcome"] == "open"
                                        and s["bytes_up"] > 4 << 20), None), timeout=30)
        assert live, (inst.sessions("bulk"), inst.log.read_text()[-3000:])
        assert any(e["session"] == live["id"] for e in inst.events("splice"))
        # the proxy worker relaying it (its session id names it; `workers:` may run several)
        worker = str(worker_of(live["id"]))
        proxy_pid = inst.status()["proxy_workers"][worker]
        os.kill(proxy_pid, signal.SIGKILL)
        out, _ = agent.communicate(timeout=60 * SLOWDOWN)
    finally:
        if agent.poll() is None:
            agent.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["error"], "the agent's connection broke with the proxy"
    assert len(echo.seen("tcp")) == before + 1 and result["received"] > 4 << 20  # the server echoed it
    assert wait_until(lambda: (s := inst.status())["proxy_listening"]
                      and s["proxy_workers"].get(worker, proxy_pid) != proxy_pid, timeout=20)
    row = wait_until(lambda: next((s for s in inst.sessions("bulk") if s["id"] == live["id"]
                                   and s["outcome"] != "open"), None), timeout=10)
    assert row, inst.sessions("bulk")
    assert row["outcome"] == "proxy-died" and row["ended"] and "last flushed" in row["detail"]
    assert row["uid"] == AGENT_UID and live["bytes_up"] <= row["bytes_up"] <= result["sent"]
    assert 0 < row["bytes_down"] <= result["received"]
    # control: the restarted proxy relays and records a connection of the same agent in full
    r = agent_probe(inst, lab.b.addr4)
    assert r["ok"], r
    s = wait_until(lambda: next((x for x in inst.sessions("bot") if x["tgid"] == r["pid"]
                                 and x["outcome"] == "closed"), None))
    assert s and s["bytes_up"] == s["bytes_down"] == len("hello interlock\n")

