"""`make demo`: Interlock's main job end to end, unattended, in throwaway namespaces.

An agent host and a server host are built from network namespaces; a real daemon captures an
agent's connections with no endpoint change; the policy allows one service, denies another and
holds a third until a human approves (the demo approves itself and shows the command); then the
replay, fail-closed and a clean `interlock down`. Then PostgreSQL (lab.demo_postgres: injected
credentials, masking, a refused DROP, a held DELETE) and HTTPS/AWS (lab.demo_https: re-signed
calls, a refused DeleteBucket, a held TerminateInstances). Then the fleet (lab.demo_central: two
agent hosts shipping to one central recorder, `interlock verify` passing, a row edited in
PostgreSQL and verify naming it) and the approval page (lab.demo_approvals: a held DELETE approved
in a headless Chromium by an approver signed in with OIDC, and the replay naming that approver)."""

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

from lab import demo_approvals, demo_central, demo_https, demo_postgres
from lab.demo_checks import CHECKS
from lab.instance import INTERLOCK, Instance, leftovers
from lab.netns import Lab
from lab.testing import wait_listening

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
    try:
        return _demo()
    except Exception as e:  # a step that could not even run: the checks so far, then the failure
        CHECKS.expect("the demo ran to its end", False, f"{type(e).__name__}: {e}")
        return CHECKS.summary()


def _demo() -> int:
    say("1. Is this host able to run Interlock?")
    with Lab("demo") as lab:
        CHECKS.succeeded("the host can run Interlock", show(lab.a, [*INTERLOCK, "doctor"], "interlock doctor"))
        say(f"2. Two hosts: agent host {lab.a.addr4} and server host {lab.b.addr4} / {lab.b.addr6}")
        web = tempfile.mkdtemp(prefix="interlock-demo-web-")
        Path(web, "index.html").write_text("hello from the server host\n")
        # Each server's request log is the server-side evidence of what reached it.
        served = {port: Path(web).parent / f"{Path(web).name}-{port}.log" for port in (8080, 9090)}
        for port, log in served.items():
            with open(log, "w") as err:
                srv = lab.b.popen([sys.executable, "-m", "http.server", "--bind", "::", "--directory", web, str(port)],
                                  stdout=subprocess.DEVNULL, stderr=err)
            wait_listening(lab.b, port, srv, log)

        def requests_at(port: int) -> int:
            return served[port].read_text().count('"GET ')
        policy = Path(tempfile.mkdtemp(prefix="interlock-demo-policy-")) / "policy.yaml"
        policy.write_text(POLICY.format(b4=lab.b.addr4, b6=lab.b.addr6))
        print(policy.read_text())
        inst = Instance(lab.a, "demo", proxy_port=15001, dns_port=15053, policy=str(policy))
        try:
            say("3. Start the daemon: BPF hooks on the agents' cgroup, nft backstop, proxy")
            print(f"{DIM}$ interlock daemon --state-dir {inst.state_dir} --config {inst.config_file}{END}")
            inst.start()
            print(inst.log.read_text().strip().splitlines()[-1])
            CHECKS.succeeded("the daemon is up", show(lab.a, cli(inst, "status"), shown(inst, "status")), "demo")
            time.sleep(0.5)

            def curl(url: str, max_time: int = 5) -> tuple[list[str], str]:
                return (cli(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", "--max-time", str(max_time), url),
                        shown(inst, "run", "--agent", "demo-bot", "--", "curl", "-sS", url))

            say("4. An agent runs curl with no proxy settings: its connections are taken by the kernel")
            url = f"http://{lab.b.addr4}:8080/index.html"
            CHECKS.succeeded("the allowed service answered the agent", show(lab.a, *curl(url)), "hello from the server host")
            say("5. The same agent tries the admin service: the policy refuses it")
            CHECKS.succeeded("the admin service was refused with a 403 that names the rule and its reason",
                             show(lab.a, *curl(f"http://{lab.b.addr4}:9090/")), "blocked_by_policy", "admin-off-limits",
                             "not for agents")
            CHECKS.expect("the admin server received nothing (its own log)", requests_at(9090) == 0,
                          served[9090].read_text())
            say("6. Payments needs a human: the agent waits, nothing reaches the server")
            pay_url = f"http://[{lab.b.addr6}]:8080/index.html"
            before = requests_at(8080)
            print(f"{DIM}$ {curl(pay_url)[1]} &{END}")
            held = lab.a.popen(curl(pay_url, 60)[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            pending = inst.wait_for(lambda: json.loads(inst.cli("approvals", "--json").stdout), timeout=15)
            if not CHECKS.expect("the payments call is held for a human", bool(pending)):
                held.kill()
                raise RuntimeError("nothing was held for approval")
            show(lab.a, cli(inst, "approvals"), shown(inst, "approvals"))
            CHECKS.expect("while held, nothing reached the server", requests_at(8080) == before)
            print("(a human would decide now; the demo approves it itself)")
            CHECKS.succeeded("the approval was taken", show(lab.a, cli(inst, "approve", pending[0]["id"]),
                                                             shown(inst, "approve", pending[0]["id"])))
            out, _ = held.communicate(timeout=90)
            print(out.rstrip())
            CHECKS.expect("once approved, the held call completed (one approval, one hold)",
                          held.returncode == 0 and "hello from the server host" in out, out)
            CHECKS.expect("no second hold for the same call", not json.loads(inst.cli("approvals", "--json").stdout))

            say("7. Every connection is on record")
            r = show(lab.a, cli(inst, "sessions"), shown(inst, "sessions"))
            CHECKS.succeeded("the sessions are listed", r, "demo-bot", "admin-off-limits")
            session = pending[0]["session"]
            say("8. The held session, replayed for a reviewer")
            CHECKS.succeeded("the replay shows the approval", show(lab.a, cli(inst, "replay", session),
                                                                    shown(inst, "replay", session)), "approval-approved")

            say("9. Fail closed: kill the proxy; the agent's next connection is refused, never sent direct")
            proxy_pids = inst.status()["proxy_pids"]  # every proxy worker
            print(f"{DIM}$ kill -9 {' '.join(map(str, proxy_pids))}{END}")
            for pid in proxy_pids:
                os.kill(pid, 9)
            time.sleep(0.3)
            before = requests_at(8080)
            CHECKS.refused("with the proxy dead, the agent is refused", show(lab.a, *curl(url)))
            CHECKS.expect("with the proxy dead, nothing reached the server", requests_at(8080) == before)
            print("(the daemon restarts the proxy; the agent is served again)")
            inst.wait_for(lambda: inst.status().get("proxy_listening"), timeout=15)
            time.sleep(0.3)
            CHECKS.succeeded("the restarted proxy serves the agent again", show(lab.a, *curl(url)),
                             "hello from the server host")

            say("10. interlock down: nothing of Interlock is left on the host")
            CHECKS.succeeded("interlock down", show(lab.a, cli(inst, "down"), shown(inst, "down")))
            if inst.daemon is not None:
                inst.daemon.wait(timeout=30)
            CHECKS.expect("nothing of the instance is left", not leftovers(inst), ", ".join(leftovers(inst)))
        finally:
            inst.close()
            shutil.rmtree(web, ignore_errors=True)
            for log in served.values():
                log.unlink(missing_ok=True)
            shutil.rmtree(policy.parent, ignore_errors=True)
        # The protocol-aware parts, each with its own daemon on the same two hosts.
        demo_postgres.demo(lab, say, show)
        demo_https.demo(lab, say, show)
        demo_approvals.demo(lab, say, show)
    demo_central.demo(say, show)  # builds its own labs: two agent hosts and a recorder host
    return CHECKS.summary()


if __name__ == "__main__":
    sys.exit(main())
