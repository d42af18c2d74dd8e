"""The central-recorder part of the demo: `demo(say, show)` (lab.demo's helpers), or alone:
`sudo .venv/bin/python -m lab.demo_central`.

A recorder host (PostgreSQL 15 and `interlock recorder serve`, lab/central.py) and two agent hosts,
each a network namespace of its own with its own daemon and state dir (the second wired to the
recorder host by lab/fleet.py). Each host joins with a single-use token and ships its records; an
agent on each opens a session; `interlock sessions --server` shows both hosts' sessions in one
place; `interlock verify` recomputes both chains and passes, also against an export and with the
hosts' keys pinned; then a row is edited in PostgreSQL and verify names exactly that record.
Every step checks its outcome (lab/demo_checks.py) and a failed one fails the demo."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lab.central import Central
from lab.demo_checks import CHECKS
from lab.fleet import wire
from lab.instance import INTERLOCK, Instance
from lab.netns import Host, Lab
from lab.testing import ECHO_PORT, EchoServer, wait_until
from recorder import records

POLICY = """\
# central-recorder demo policy: the agents may use the echo service on the recorder's network
targets:
  echo: {{address: {addr}, port: {port}}}
rules:
  - name: echo-ok
    target: echo
    decision: allow
"""
HOSTS = ("web-1", "batch-1")


def _cmd(verb: str, *args: str) -> list[str]:
    return [*INTERLOCK, verb, *args]


def _shown(argv: list[str]) -> str:
    """The command as a person would type it: `interlock …` rather than python -m interceptor.cli."""
    n = len(INTERLOCK)
    return shlex.join(["interlock", *argv[n:]]) if argv[:n] == INTERLOCK else shlex.join(argv)


def demo(say: Callable[[str], None], show: Callable[..., subprocess.CompletedProcess]) -> None:
    """Run the central-recorder steps; every outcome goes to CHECKS. Everything started is stopped here."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="interlock-demo-central-")))
        lab = stack.enter_context(Lab("dc"))
        lab2 = stack.enter_context(Lab("dd"))
        wire(lab2.a, lab.b)
        _steps(stack, tmp, (lab.a, lab2.a), lab.b, say, show)


def _steps(stack: contextlib.ExitStack, tmp: Path, agent_hosts: tuple[Host, Host], hub: Host,
           say: Callable[[str], None], show: Callable[..., subprocess.CompletedProcess]) -> None:
    def run(host: Host, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return show(host, argv, _shown(argv), timeout=timeout)

    say("Central recorder: a recorder host (PostgreSQL + interlock recorder serve) and two agent hosts")
    rec = stack.enter_context(Central(hub, name="recorder.demo"))
    echo = EchoServer(hub, ECHO_PORT, tmp / "echo-seen.jsonl")
    stack.callback(echo.stop)
    ops = tmp / "operator"
    r = rec.cli("operator", "alice", "--state", str(rec.state), "--out", str(ops), check=False)
    CHECKS.succeeded("the recorder is up and issued operator credentials (interlock recorder operator alice --out DIR)", r)
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY.format(addr=hub.addr4, port=ECHO_PORT))

    say("Each agent host joins with a single-use token and ships its records to the recorder")
    insts: list[Instance] = []
    for i, (host, name) in enumerate(zip(agent_hosts, HOSTS, strict=True)):
        inst = Instance(host, f"dc{os.getpid() % 100000}{i}", proxy_port=15101 + i, dns_port=15153 + i,
                        policy=str(policy), recorder={"server": rec.url})
        stack.callback(inst.close)
        token = rec.token("10m")
        print(f"  (token from `interlock recorder token --expires 10m` on the recorder: {token[:24]}…)")
        r = run(host, _cmd("join", "--state-dir", str(inst.state_dir), "--server", rec.url, "--token", token, "--name", name))
        CHECKS.succeeded(f"host {name} joined the recorder", r, "joined the recorder")
        r = run(host, _cmd("join", "--state-dir", str(tmp / f"again-{name}"), "--server", rec.url, "--token", token))
        CHECKS.refused(f"the same token cannot join a second host ({name}'s token reused)", r, "already used")
        inst.start()
        insts.append(inst)

    say("An agent on each host opens a session to the echo service")
    opened: dict[str, str] = {}
    for inst, name in zip(insts, HOSTS, strict=True):
        r = run(inst.host, _cmd("run", "--state-dir", str(inst.state_dir), "--agent", f"{name}-agent", "--user", "65533",
                                "--", sys.executable, "-m", "lab.probe", "tcp", hub.addr4, str(ECHO_PORT)))
        try:
            ok = json.loads(r.stdout.strip().splitlines()[-1]).get("ok") is True
        except (IndexError, ValueError):
            ok = False
        CHECKS.expect(f"the agent on {name} reached the echo service through Interlock", ok and r.returncode == 0, r.stdout + r.stderr)
        local = inst.sessions(f"{name}-agent")
        CHECKS.expect(f"{name} recorded the session locally", len(local) == 1, json.dumps(local)[-300:])
        if local:
            opened[name] = local[0]["id"]

    fleet = ["--server", rec.url, "--credentials", str(ops)]

    def arrived() -> list[dict] | None:
        r = hub.run(_cmd("sessions", "--json", *fleet))
        try:
            rows = json.loads(r.stdout)
        except ValueError:
            return None
        got = {(x["host_name"], x["id"]) for x in rows if x.get("outcome") != "open"}
        return rows if all((n, s) in got for n, s in opened.items()) and len(opened) == len(HOSTS) else None

    rows = wait_until(arrived, 60, 0.5)
    CHECKS.expect("both hosts' sessions arrived at the recorder, closed", rows is not None)

    say("Both hosts' sessions in one place (the operator's certificate; agent text escaped)")
    r = run(hub, _cmd("sessions", *fleet))
    CHECKS.succeeded("interlock sessions --server shows both hosts", r, *HOSTS, *opened.values())
    first = opened.get(HOSTS[1], "")
    r = run(hub, _cmd("replay", first, *fleet))
    CHECKS.succeeded(f"interlock replay --server shows {HOSTS[1]}'s session from the recorder", r, f"host {HOSTS[1]}", first)

    say("interlock verify: every host's chain recomputed from the recorder's store")
    for inst in insts:  # the daemons stop: what they recorded last is chained, signed and shipped on the way out
        inst.down()

    def signed() -> bool:
        r = hub.run(_cmd("verify", "--json", *fleet))
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            return False
        # the hosts sign their chain head every second or so: wait until each head is covered
        return len(doc["hosts"]) == 2 and all(h["records"] and h["signed_to"] == h["last_seq"] for h in doc["hosts"])

    CHECKS.expect("both hosts' chains arrived whole and signed to their last record", bool(wait_until(signed, 30, 0.5)))
    pins = []
    for inst, name in zip(insts, HOSTS, strict=True):
        key = records.public_key_hex(records.load_signing_key(inst.state_dir / "recorder" / "signing.key"))
        pins += ["--host-key", f"{name}={key}"]
    print("  (each host's public key, read on the host from <state-dir>/recorder/signing.key, is pinned with --host-key)")
    r = run(hub, _cmd("verify", *fleet, *pins))
    CHECKS.succeeded("verify passes for both hosts, keys pinned", r, "verify: 2 of 2 host(s) intact", *HOSTS)
    export = tmp / "fleet.jsonl"
    r = run(hub, _cmd("export", *fleet, "--out", str(export)))
    CHECKS.succeeded("interlock export writes the fleet as JSON Lines", r, "exported 2 host(s)")
    r = run(hub, _cmd("verify", "--export", str(export), *pins))
    CHECKS.succeeded("verify passes against the export", r, "verify: 2 of 2 host(s) intact")

    say("Someone with the database edits a recorded session; verify names exactly that record")
    victim = HOSTS[0]
    hid = rec.psql(f"SELECT host_id FROM hosts WHERE name = '{victim}'")
    seq, session = (rec.psql(f"SELECT seq, session FROM records WHERE host_id = '{hid}' AND kind = 'session-close' "
                             f"AND session = '{opened.get(victim, '')}'") or "0|").split("|")
    sql = (f"UPDATE records SET body = replace(body, '\"uid\":65533', '\"uid\":0') "
           f"WHERE host_id = '{hid}' AND seq = {int(seq)}")
    r = show(hub, [str(rec.pg.bindir / "psql"), *rec.pg.client_args(), "-d", "postgres", "-X", "-c", sql],
             f"psql -c {shlex.quote(sql)}")
    CHECKS.succeeded(f"the session-close record of {victim} (seq {seq}) was rewritten in PostgreSQL", r, "UPDATE 1")
    r = run(hub, _cmd("verify", *fleet, *pins))
    CHECKS.refused("verify fails and names the edited record (host, seq, kind, session)", r,
                   f"FAIL     host {victim} ({hid}): CHANGED seq {seq} (session-close, session {session})",
                   f"OK       host {HOSTS[1]}", "verify: 1 of 2 host(s) intact")
    CHECKS.expect("the export taken before the edit still verifies (a copy kept off the store keeps the evidence)",
                  hub.run(_cmd("verify", "--export", str(export), *pins)).returncode == 0)


def main() -> int:
    if os.geteuid() != 0:
        print("the central-recorder demo must run as root (network namespaces, cgroup BPF)", file=sys.stderr)
        return 2

    from lab.demo import say, show  # the demo's own printing (lab.demo imports this module: not at the top)

    try:
        demo(say, show)
    except Exception as e:  # a step that could not even run: the checks so far, then the failure
        CHECKS.expect("the central-recorder demo ran to the end", False, f"{type(e).__name__}: {e}")
    return CHECKS.summary()


if __name__ == "__main__":
    sys.exit(main())
