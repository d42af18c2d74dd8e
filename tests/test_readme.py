"""The README's walkthrough, run as written: its commands are read out of README.md and run in
order in a lab, and what each prints must have the shape the README shows.

Only what cannot be the same on another host is substituted: the addresses of the lab's server
host for the README's, this test's config file for /etc/interlock/config.yaml, the instance's
state dir (`--state-dir`, which every verb takes), and the approval and session ids the earlier
commands printed. Outputs are compared line by line after numbers and ids are folded, so a
changed verb, column, message or step breaks the test."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lab.demo import POLICY
from lab.instance import INTERLOCK, Instance
from lab.testing import SLOWDOWN, instance_name, stop_process, wait_listening, wait_until

pytestmark = pytest.mark.datapath
README = Path(__file__).resolve().parent.parent / "README.md"
README_B4, README_B6 = "10.231.180.2", "fd00:231:b4::2"
APPROVAL_ID, SESSION_ID = "9fd52d90", "66126251b265e255bf5c6"


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def walkthrough(text: str) -> list[Step]:
    """The `$ command` lines of the Walkthrough section's code blocks, each with the lines it prints."""
    section = text.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    steps: list[Step] = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append(Step(line[2:].split("  #", 1)[0].strip()))
            elif steps and line.strip():
                steps[-1].expected.append(line)
    return steps


def fold(line: str) -> str:
    """A line with what differs between runs folded: ids, numbers, times, runs of spaces."""
    line = re.sub(r"\b[0-9a-f]{8,}\b", "ID", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return " ".join(line.split())


def shaped_like(expected: list[str], actual: str) -> bool:
    """Every expected line, folded, appears among the actual lines, in order."""
    got = [fold(x) for x in actual.splitlines() if x.strip()]
    i = 0
    for want in map(fold, expected):
        while i < len(got) and got[i] != want:
            i += 1
        if i == len(got):
            return False
        i += 1
    return True


def check(step: Step, expected: list[str], out: str) -> None:
    if os.environ.get("INTERLOCK_README_RECORD"):  # print what the README should show
        print(f"$ {step.command}\n{out.rstrip()}", file=sys.stderr)
        return
    assert shaped_like(expected, out), f"{step.command}\nREADME shows:\n" + "\n".join(expected) + f"\nbut it printed:\n{out}"


@pytest.fixture
def servers(lab):
    web = Path(tempfile.mkdtemp(prefix="interlock-readme-web-"))
    (web / "index.html").write_text("hello from the server host\n")
    procs = []
    for port in (8080, 9090):
        log = web.parent / f"{web.name}-{port}.log"
        with open(log, "w") as err:
            p = lab.b.popen([sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(web), str(port)],
                            stdout=subprocess.DEVNULL, stderr=err)
        wait_listening(lab.b, port, p, log)
        procs.append((p, log))
    yield
    for p, log in procs:
        stop_process(p)
        log.unlink(missing_ok=True)


def test_the_readme_walkthrough_runs_as_written(lab, servers, tmp_path):
    steps = walkthrough(README.read_text())
    assert len(steps) >= 8, "the walkthrough lost its commands"
    name = instance_name("readme")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(b4=lab.b.addr4, b6=lab.b.addr6))
    inst = Instance(lab.a, name, policy=str(policy))  # only for its state dir and teardown
    inst.config_file.write_text(yaml.safe_dump(inst.config))
    ids = {}
    background: list[subprocess.Popen] = []
    try:
        for step in steps:
            words = shlex.split(step.command.replace(README_B4, lab.b.addr4).replace(README_B6, lab.b.addr6))
            in_background = words[-1] == "&"
            words = [w for w in words if w not in ("sudo", "&")]
            if words == ["wait"]:
                out, _ = background.pop().communicate(timeout=60 * SLOWDOWN)
                check(step, step.expected, out)  # the background job's output
                continue
            assert words[0] == "interlock", f"a walkthrough step that is not an interlock command: {step.command}"
            words = [ids.get(w, w) for w in words]
            argv = [*INTERLOCK, words[1], "--state-dir", str(inst.state_dir),
                    *[str(inst.config_file) if w == "/etc/interlock/config.yaml" else w for w in words[2:]]]
            expected = [x.replace("instance default", f"instance {name}").replace(README_B4, lab.b.addr4)
                        .replace(README_B6, lab.b.addr6) for x in step.expected]
            if in_background and words[1] == "daemon":
                with open(inst.log, "w") as log:
                    inst.daemon = lab.a.popen(argv, stdout=log, stderr=subprocess.STDOUT)
                assert wait_until(lambda: "ready" in inst.log.read_text() or inst.daemon.poll() is not None,
                                  timeout=120), "the daemon did not come up"
                check(step, expected, inst.log.read_text())
                continue
            if in_background:
                background.append(lab.a.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                wait_until(lambda: json.loads(inst.cli("approvals", "--json").stdout or "[]"), timeout=30)
                continue
            r = lab.a.run(argv, timeout=120 * SLOWDOWN)
            out = r.stdout + r.stderr
            assert r.returncode == 0, (step.command, out)
            check(step, expected, out)
            if words[1] == "approvals":
                pending = json.loads(inst.cli("approvals", "--json").stdout)
                ids[APPROVAL_ID] = pending[0]["id"]
                ids[SESSION_ID] = pending[0]["session"]
    finally:
        for p in background:
            p.kill()
        inst.close()
