"""The approval page chapter of `make demo`: a held DELETE approved from the central recorder's page
by an approver signed in with OIDC; the demo drives a real headless Chromium itself and prints what it
clicked, then the replay on the page names the approver. Every step checks its outcome (lab.demo_checks).

    python -m lab.demo_approvals          # as root, alone; or demo(lab, say, show) from lab/demo.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from lab.browser import Browser
from lab.central import Central
from lab.demo_checks import CHECKS
from lab.instance import INTERLOCK, Instance
from lab.netns import Lab
from lab.oidc import MockProvider
from lab.postgres import Postgres

PORT = 5440
APPROVER = {"sub": "dana", "email": "dana@example.com", "name": "Dana (DBA on call)", "groups": ["dba"]}
POLICY = """\
rules:
  - name: hold-deletes
    risk: [delete-without-where]
    decision: approve
    reason: deleting every row needs a DBA
    timeout: 300s
    approvers: {groups: [dba]}
default: allow
"""


def clicked(what: str) -> None:
    print(f"  [browser] {what}", flush=True)


def demo(lab: Lab, say: Callable[[str], None], show: Callable[..., subprocess.CompletedProcess]) -> None:
    """On an existing lab; everything it starts is stopped before it returns."""
    from selenium.webdriver.common.by import By

    work = Path(tempfile.mkdtemp(prefix="interlock-demo-web-"))
    idp = rec = pg = inst = br = None
    try:
        say("Approvals 1. The central recorder serves the approval page; approvers sign in with OIDC")
        idp = MockProvider(lab.b, users=[APPROVER])
        cfg = work / "web.yaml"
        rec = Central(lab.b, web_config=cfg)
        cfg.write_text(yaml.safe_dump({"origin": rec.url, "oidc": {"issuer": idp.issuer, "client_id": "interlock-web",
                                                                   "client_secret": "demo-secret"},
                                       "approvers": {"groups": ["dba"], "four_eyes": True}}, sort_keys=False))
        print(cfg.read_text())
        rec.start()
        CHECKS.expect(f"the recorder and its page run at {rec.url}/ui/", rec.proc is not None and rec.proc.poll() is None)

        say("Approvals 2. The agent host joins the recorder (outbound only: no port opens on the agent host)")
        pg = Postgres(lab.b, port=PORT).start()
        pg.psql("CREATE TABLE audit_log (id int); INSERT INTO audit_log SELECT generate_series(1, 100);"
                " GRANT ALL ON audit_log TO PUBLIC;")
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        print(POLICY)
        inst = Instance(lab.a, "demoweb", proxy_port=15031, dns_port=15083, policy=str(policy), recorder={"server": rec.url})
        CHECKS.succeeded("the host joined the recorder", inst.cli("join", "--server", rec.url, "--token", rec.token()), "joined")
        inst.start()

        say("Approvals 3. Dana signs in at the provider, in a real (headless) Chromium")
        br = Browser(lab.b, trust=[rec.state / "server.crt"]).start()
        br.do(lambda d: d.get(rec.url + "/ui/"))
        clicked(f"opened {rec.url}/ui/ -> the provider's sign-in page {br.do(lambda d: d.current_url.split('?')[0])}")
        br.do(lambda d: d.find_element(By.NAME, "sub").send_keys("dana"))
        br.do(lambda d: d.find_element(By.CSS_SELECTOR, "form button[type=submit]").click())
        clicked("typed 'dana' and clicked 'Authorize'")
        who = br.do(lambda d: Browser.wait(d, By.ID, "who").text)
        CHECKS.expect("Dana is signed in on the approval page", who == APPROVER["email"], who)

        say("Approvals 4. The agent runs DELETE without WHERE: held; the page shows it")
        argv = [*INTERLOCK, "run", "--state-dir", str(inst.state_dir), "--agent", "report-bot", "--", "setpriv", "--reuid",
                "65533", "--regid", "65533", "--clear-groups", "psql", f"host={lab.b.addr4} port={PORT} user=postgres dbname=postgres",
                "-X", "-c", "delete from audit_log"]
        print(f"$ interlock run --agent report-bot -- psql 'host={lab.b.addr4} port={PORT} ...' -c 'delete from audit_log' &")
        agent = lab.a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        held = inst.wait_for(lambda: json.loads(inst.cli("approvals", "--json").stdout), timeout=30)
        if not CHECKS.expect("the DELETE is held on the agent host", bool(held)):
            agent.kill()
            raise RuntimeError("the DELETE was not held")
        a = held[0]
        card = br.do(lambda d: Browser.wait(d, By.ID, f"approval-{a['id']}", timeout=30).text)
        print("\n".join("  | " + line for line in card.splitlines()))
        CHECKS.expect("the page shows the held DELETE with its rule", "delete from audit_log" in card and "hold-deletes" in card, card)
        rows = pg.psql("SELECT count(*) FROM audit_log")
        CHECKS.expect("while held, the server deleted nothing", rows == "100", rows)

        say("Approvals 5. Dana clicks 'Approve once'; the answer reaches the host over its outbound channel")
        t0 = time.time()
        br.do(lambda d: d.find_element(By.CSS_SELECTOR, f"#approval-{a['id']} button.approve").click())
        clicked(f"clicked 'Approve once' on approval {a['id']}")
        notice = br.do(lambda d: Browser.wait(d, By.ID, "notice").text)
        print(f"  page says: {notice}")
        out, _ = agent.communicate(timeout=60)
        print(f"  agent: {out.strip()}  ({(time.time() - t0) * 1000:.0f} ms after the click)")
        CHECKS.expect("the approved DELETE ran", agent.returncode == 0 and "DELETE 100" in out, out)
        rows = pg.psql("SELECT count(*) FROM audit_log")
        CHECKS.expect("the server deleted the rows after the approval (asked on the server)", rows == "0", rows)

        say("Approvals 6. The session's replay on the page names the approver")
        host_id = json.loads((inst.state_dir / "recorder" / "host.json").read_text())["host_id"]
        url = f"{rec.url}/ui/sessions/{host_id}/{a['session']}"

        def timeline(d) -> list[str]:
            d.get(url)
            return [e.text for e in d.find_elements(By.CSS_SELECTOR, "#timeline li")]

        lines = inst.wait_for(lambda: (t := br.do(timeline)) and any("dana@example.com" in x for x in t) and t, timeout=30) or br.do(timeline)
        clicked(f"opened {url}")
        print("\n".join("  | " + line for line in lines))
        CHECKS.expect("the replay names Dana as the approver", any("approved" in x and "dana@example.com" in x for x in lines))
    finally:
        for part in (br, inst, pg, rec):
            if part is not None:
                try:
                    part.close()
                except Exception as e:  # noqa: BLE001 -- the rest still gets closed
                    print(f"closing {type(part).__name__}: {e}", file=sys.stderr)
        if idp is not None:
            idp.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if os.geteuid() != 0:
        print("the demo must run as root (it loads BPF programs into a throwaway cgroup)", file=sys.stderr)
        return 2
    from lab.demo import say, show

    with Lab("demoweb") as lab:
        demo(lab, say, show)
    return CHECKS.summary()


if __name__ == "__main__":
    sys.exit(main())
