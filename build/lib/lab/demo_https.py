"""The HTTPS and AWS part of the demo: `demo(lab, say, show)` (lab.demo's helpers), or alone:
`sudo .venv/bin/python -m lab.demo_https`.

On the lab's server host: nginx with a certificate from a private CA, and moto (AWS's APIs, IAM
authentication on) over HTTPS. An agent holds placeholder AWS keys only; Interlock terminates its
TLS, names each AWS call, refuses s3:DeleteBucket in S3's own words, holds
ec2:TerminateInstances for a human, and re-signs what it lets through with the real keys from its
credential store. curl over HTTPS works unchanged. `python -m lab.demo_https agent …` is the
agent program itself: plain boto3, nothing in it knows about Interlock."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lab.demo_checks import CHECKS
from lab.https import AWS, AWS_POLICY, MOTO_PORT, WWW, LabDns, LabPKI, Moto, Nginx
from lab.instance import INTERLOCK, Instance
from lab.netns import Lab

PLACEHOLDER = ("AKIADEMOPLACEHOLDER1", "demo-placeholder-secret")
ENDPOINT = f"https://{AWS}:{MOTO_PORT}"

# default allow: curl to the web server goes through (and is recorded) with no rule of its own
POLICY = "# HTTPS demo policy: AWS calls in IAM words\ndefault: allow\n" + AWS_POLICY


def agent(argv: list[str]) -> int:
    """The agent: boto3 with placeholder keys and the service's real endpoint."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    session = boto3.session.Session(aws_access_key_id=PLACEHOLDER[0], aws_secret_access_key=PLACEHOLDER[1],
                                    region_name="us-east-1")
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    s3 = session.client("s3", endpoint_url=ENDPOINT, config=cfg)
    ec2 = session.client("ec2", endpoint_url=ENDPOINT, config=cfg)
    try:
        if argv[0] == "work":
            s3.create_bucket(Bucket="reports")
            s3.put_object(Bucket="reports", Key="q3.txt", Body=b"revenue up\n")
            print("get_object ->", s3.get_object(Bucket="reports", Key="q3.txt")["Body"].read().decode().strip())
            print("whoami     ->", session.client("sts", endpoint_url=ENDPOINT, config=cfg).get_caller_identity()["Arn"])
        elif argv[0] == "buckets":
            print("buckets    ->", " ".join(b["Name"] for b in s3.list_buckets()["Buckets"]))
        elif argv[0] == "delete-bucket":
            s3.delete_bucket(Bucket="reports")
            print("bucket deleted")
        elif argv[0] == "run":
            print(ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])
        elif argv[0] == "terminate":
            state = ec2.terminate_instances(InstanceIds=[argv[1]])["TerminatingInstances"][0]["CurrentState"]["Name"]
            print(f"{argv[1]} -> {state}")
    except ClientError as e:
        print(f"{type(e).__name__}: {e.response['Error']['Code']}: {e.response['Error'].get('Message', '')}")
        return 1
    return 0


def demo(lab: Lab, say: Callable[[str], None], show: Callable[..., subprocess.CompletedProcess]) -> None:
    """The HTTPS/AWS chapter, on an existing lab; everything it starts is stopped before it returns."""
    work = Path(tempfile.mkdtemp(prefix="interlock-demo-https-"))
    started: list = []
    inst: Instance | None = None
    try:
        say(f"HTTPS 1. On the server host: nginx as https://{WWW} and AWS's APIs (moto) as {ENDPOINT}")
        pki = LabPKI(work / "pki")
        started.append(LabDns(lab.b, lab.b))
        started.append(Nginx(lab.b, pki, work / "nginx"))
        moto = Moto(lab.b, pki, work)
        started.append(moto)
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        print(policy.read_text())
        inst = Instance(lab.a, "demohttps", proxy_port=15011, dns_port=15063, policy=str(policy),
                        dns_upstream=lab.b.addr4, tls_trust=str(pki.ca_file))
        inst.start()

        def cli(*args: str) -> list[str]:
            return [*INTERLOCK, args[0], "--state-dir", str(inst.state_dir), *args[1:]]

        def shown(*args: str) -> str:
            return shlex.join(["interlock", args[0], "--state-dir", str(inst.state_dir), *args[1:]])

        def as_agent(*argv: str) -> list[str]:
            return cli("run", "--agent", "demo-bot", "--", *argv)

        say("HTTPS 2. The real AWS keys go into Interlock's credential store; the agent gets placeholders")
        store = ["credentials", "set", "aws-lab", "--kind", "aws", "--field", f"access_key_id={moto.access_key}",
                 "--field", f"placeholder_access_key_id={PLACEHOLDER[0]}",
                 "--field", f"placeholder_secret_access_key={PLACEHOLDER[1]}"]
        print(f"\033[2m$ printf '%s\\n' \"$REAL_SECRET\" | {shown(*store)}\033[0m", flush=True)
        r = inst.cli(*store, input=moto.secret_key + "\n")
        print((r.stdout + r.stderr).strip())
        CHECKS.succeeded("the real AWS keys are in the credential store", r)

        say("HTTPS 3. curl over HTTPS, unchanged: Interlock decrypts, judges and records each request")
        r = show(lab.a, as_agent("curl", "-sS", "--max-time", "10", f"https://{WWW}/index.html"),
                 shown("run", "--agent", "demo-bot", "--", "curl", "-sS", f"https://{WWW}/index.html"))
        CHECKS.succeeded("curl over HTTPS works unchanged", r)

        agent_cmd = [sys.executable, "-m", "lab.demo_https", "agent"]
        say("HTTPS 4. The agent's boto3 calls, signed with placeholder keys, are re-signed with the real ones")
        r = show(lab.a, as_agent(*agent_cmd, "work"), shown("run", "--agent", "demo-bot", "--", "python3", "agent.py", "work"),
                 timeout=120)
        CHECKS.succeeded("boto3 with placeholder keys works, re-signed", r, "revenue up")
        say("HTTPS 5. s3:DeleteBucket: refused by the policy, as an AccessDenied the SDK understands")
        r = show(lab.a, as_agent(*agent_cmd, "delete-bucket"),
                 shown("run", "--agent", "demo-bot", "--", "python3", "agent.py", "delete-bucket"), timeout=120)
        CHECKS.refused("s3:DeleteBucket is refused as AccessDenied", r, "AccessDenied")
        r = inst.agent([*agent_cmd, "buckets"], agent="demo-bot", timeout=120)
        CHECKS.succeeded("the bucket is still there (listed by the service)", r, "reports")

        say("HTTPS 6. ec2:TerminateInstances waits for a human")
        r = inst.agent([*agent_cmd, "run"], agent="demo-bot", timeout=120)
        instance_id = r.stdout.strip()
        if not CHECKS.succeeded("an instance runs", r, "i-"):
            raise RuntimeError("RunInstances failed")
        print(f"\033[2m$ {shown('run', '--agent', 'demo-bot', '--', 'python3', 'agent.py', 'terminate', instance_id)} &\033[0m")
        held = lab.a.popen(as_agent(*agent_cmd, "terminate", instance_id), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        pending = inst.wait_for(lambda: json.loads(inst.cli("approvals", "--json").stdout), timeout=30)
        if not CHECKS.expect("TerminateInstances is held for a human", bool(pending)):
            held.kill()
            raise RuntimeError("the TerminateInstances call was not held")
        show(lab.a, cli("approvals"), shown("approvals"))
        print("(a human would decide now; the demo approves it itself)")
        CHECKS.succeeded("the approval was taken", show(lab.a, cli("approve", pending[0]["id"]),
                                                         shown("approve", pending[0]["id"])))
        out, _ = held.communicate(timeout=120)
        print(out.rstrip())
        CHECKS.expect("once approved, the instance is terminating", held.returncode == 0 and "shutting-down" in out, out)

        say("HTTPS 7. The held call, replayed: every request with its decision, status and size")
        CHECKS.succeeded("the replay shows the approval", show(lab.a, cli("replay", pending[0]["session"]),
                                                                shown("replay", pending[0]["session"])),
                         "approval-approved")
    finally:
        if inst is not None:
            inst.close()
        for s in reversed(started):
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "agent":
        return agent(sys.argv[2:])
    if os.geteuid() != 0:
        print("the demo must run as root (it loads BPF programs into a throwaway cgroup)", file=sys.stderr)
        return 2
    from lab.demo import say, show

    with Lab("demohttps") as lab:
        demo(lab, say, show)
    return CHECKS.summary()


if __name__ == "__main__":
    sys.exit(main())
