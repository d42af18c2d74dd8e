"""`make demo`: Interlock's main job end to end, unattended, in throwaway namespaces.

An agent host and a server host are built from network namespaces; a real daemon captures an
agent's connections with no endpoint change; the policy allows one service, denies another and
holds a third until a human approves (the demo approves itself and shows the command); then the
replay, fail-closed and a clean `interlock down`. Then PostgreSQL (lab.demo_postgres: injected
credentials, masking, a refused DROP, a held DELETE) and HTTPS/AWS (lab.demo_https: re-signed
calls, a refused DeleteBucket, a held TerminateInstances)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import demo_https, demo_postgres
from lab.instance import INTERLOCK, Instance
from lab.netns import Lab

BOLD, DIM, END = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{END}", flush=True)


def show(host, argv: list[str], shown: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run on the agent host and print it like a terminal session."""
    print(f"{DIM}$ {shown or shlex.join(argv)}{END}", flush=True)
    r = host.run(argv, timeout=timeout)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print(out, flush=True)
    return r


def cli(inst: Instance, *args: str) -> list[str]:
    return [*INTERLOCK, args[0], "--state-dir", str(inst.state_dir), *args[1:]]


def shown(inst: Instance, *args: str) -> str:
    return shlex.join(["interlock", args[0], "--state-dir", str(inst.state_dir), *args[1:]])


POLICY = """\
# demo policy: default deny; one service allowed, one refused, one held for a human
targets:
  web:      {{address: {b4}, port: 8080}}
  admin:    {{address: {b4}, port: 9090}}
  payments: {{address: "{b6}", port: 8080}}
rules:
  - name: web-ok
    target: web
    decision: allow
  - name: admin-off-limits
    target: admin
    decision: deny
    reason: the admin service is not for agents
  - name: payments-needs-a-human
    target: payments
    decision: approve
    timeout: 2m
"""


def main() -> int:
    if os.geteuid() != 0:
        print("make demo must run as root (it loads BPF programs into a throwaway cgroup)", file=sys.stderr)
        return 2
    say("1. Is this host able to run Interlock?")
    with Lab("demo") as lab:
        show(lab.a, [*INTERLOCK, "doctor"], "interlock doctor")
        say(f"2. Two hosts: agent host {lab.a.addr4} and server host {lab.b.addr4} / {lab.b.addr6}")
        web = tempfile.mkdtemp(prefix="interlock-demo-web-")
        Path(web, "index.html").write_text("hello from the server host\n")
        for port in (8080, 9090):
            lab.b.popen([sys.executable, "-m", "http.server", "--bind", "::", "--directory", web, str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        policy = Path(tempfile.mkdtemp(prefix="interlock-demo-policy-")) / "policy.yaml"
        policy.write_text(POLICY.format(b4=lab.b.addr4, b6=lab.b.addr6))
        print(policy.read_text())
        inst = Instance(lab.a, "demo", proxy_port=15001, dns_port=15053, policy=str(policy))
        try:
            say("3. Start the daemon: BPF hooks on the agents' cgroup, nft backstop, proxy")
            print(f"{DIM}$ interlock daemon --state-dir {inst.state_dir} --config {inst.config_file}{END}")
            inst.start()
            print(inst.log.read_text().strip().splitlines()[-1])
            show(lab.a, cli(inst, "status"), shown(inst, "status"))
            time.sleep(0.5)

            say("4. An agent runs curl with no proxy settings: its connections are taken by the kernel")
            url = f"http://{lab.b.addr4}:8080/index.html"
            show(lab.a, cli(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", "--max-time", "5", url),
                 shown(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", url))
            say("5. The same agent tries the admin service: the policy refuses it")
            show(lab.a, cli(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", "--max-time", "5",
                            f"http://{lab.b.addr4}:9090/"),
                 shown(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", f"http://{lab.b.addr4}:9090/"))
            say("6. Payments needs a human: the agent waits, nothing reaches the server")
            pay_url = f"http://[{lab.b.addr6}]:8080/index.html"
            print(f"{DIM}$ {shown(inst, 'run', '--agent', 'demo-bot', '--', 'curl', '-sS', pay_url)} &{END}")
            held = lab.a.popen(cli(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", "--max-time", "60", pay_url),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            pending = inst.wait_for(lambda: json.loads(inst.cli("approvals", "--json").stdout), timeout=15)
            show(lab.a, cli(inst, "approvals"), shown(inst, "approvals"))
            print("(a human would decide now; the demo approves it itself)")
            show(lab.a, cli(inst, "approve", pending[0]["id"]), shown(inst, "approve", pending[0]["id"]))
            out, _ = held.communicate(timeout=60)
            print(out.rstrip())

            say("7. Every connection is on record")
            show(lab.a, cli(inst, "sessions"), shown(inst, "sessions"))
            session = pending[0]["session"]
            say("8. The held session, replayed for a reviewer")
            show(lab.a, cli(inst, "replay", session), shown(inst, "replay", session))

            say("9. Fail closed: kill the proxy; the agent's next connection is refused, never sent direct")
            proxy_pid = inst.status()["proxy_pid"]
            print(f"{DIM}$ kill -9 {proxy_pid}{END}")
            os.kill(proxy_pid, 9)
            time.sleep(0.3)
            show(lab.a, cli(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", "--max-time", "5", url),
                 shown(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", url))
            print("(the daemon restarts the proxy; the agent is served again)")
            inst.wait_for(lambda: inst.status().get("proxy_listening"), timeout=15)
            time.sleep(0.3)
            show(lab.a, cli(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", "--max-time", "5", url),
                 shown(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", url))

            say("10. interlock down: nothing of Interlock is left on the host")
            show(lab.a, cli(inst, "down"), shown(inst, "down"))
        finally:
            inst.close()
            shutil.rmtree(web, ignore_errors=True)
            shutil.rmtree(policy.parent, ignore_errors=True)
        # The protocol-aware parts, each with its own daemon on the same two hosts.
        demo_postgres.demo(lab, say, show)
        demo_https.demo(lab, say, show)
    print(f"\n{BOLD}demo finished{END}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
