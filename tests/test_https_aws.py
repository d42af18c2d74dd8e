"""AWS through the full capture path: boto3 as the agent, holding placeholder keys only, against
moto's server with IAM authentication on (a wrongly signed request really fails there). Interlock
terminates the SDK's TLS, names each call (s3:CreateBucket, ec2:TerminateInstances), asks the
policy, and re-signs allowed calls with the real keys from the credential store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lab.https import AWS, AWS_POLICY, MOTO_PORT, LabDns, LabPKI, Moto
from lab.instance import INTERLOCK, Instance
from lab.testing import instance_name, wait_until

pytestmark = pytest.mark.datapath

PLACEHOLDER_ID = "AKIAPLACEHOLDER00001"
PLACEHOLDER_SECRET = "placeholder-secret-the-agent-holds"
ENDPOINT = f"https://{AWS}:{MOTO_PORT}"

POLICY = "default: deny\n" + AWS_POLICY

# The agent: a plain boto3 program. Its keys are placeholders; nothing tells it about Interlock.
AGENT = f"""
import json, os, sys, boto3
from botocore.config import Config
from botocore.exceptions import ClientError
cfg = Config(s3={{"addressing_style": "path"}}, retries={{"max_attempts": 1}})
s = boto3.session.Session(aws_access_key_id=os.environ.get("AGENT_KEY", "{PLACEHOLDER_ID}"),
                          aws_secret_access_key=os.environ.get("AGENT_SECRET", "{PLACEHOLDER_SECRET}"), region_name="us-east-1")
out = {{}}
def step(name, fn):
    try:
        out[name] = fn()
    except ClientError as e:
        out[name] = {{"error": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", ""),
                      "status": e.response["ResponseMetadata"].get("HTTPStatusCode")}}
endpoint = os.environ.get("AGENT_ENDPOINT", "{ENDPOINT}")
verify = False if os.environ.get("AGENT_VERIFY") == "0" else None  # None: AWS_CA_BUNDLE
s3 = s.client("s3", endpoint_url=endpoint, config=cfg, verify=verify)
ec2 = s.client("ec2", endpoint_url=endpoint, config=cfg, verify=verify)
what = sys.argv[1]
if what == "s3":
    step("create", lambda: s3.create_bucket(Bucket="agent-bkt")["ResponseMetadata"]["HTTPStatusCode"])
    step("put", lambda: s3.put_object(Bucket="agent-bkt", Key="notes/a.txt", Body=b"x" * 300000)["ResponseMetadata"]["HTTPStatusCode"])
    step("get", lambda: len(s3.get_object(Bucket="agent-bkt", Key="notes/a.txt")["Body"].read()))
    step("list", lambda: [o["Key"] for o in s3.list_objects_v2(Bucket="agent-bkt").get("Contents", [])])
    step("delete_bucket", lambda: s3.delete_bucket(Bucket="agent-bkt"))
elif what == "run":
    step("run", lambda: ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])
elif what == "terminate":
    step("terminate", lambda: ec2.terminate_instances(InstanceIds=[sys.argv[2]])["TerminatingInstances"][0]["CurrentState"]["Name"])
elif what == "whoami":
    step("whoami", lambda: s.client("sts", endpoint_url=endpoint, config=cfg, verify=verify).get_caller_identity()["Arn"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def aws(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("aws")
    pki = LabPKI(d / "pki")
    dns = LabDns(lab.b, lab.b)
    moto = Moto(lab.b, pki, d)
    policy = d / "policy.yaml"
    policy.write_text(POLICY)
    inst = Instance(lab.a, instance_name("aws"), proxy_port=16101, dns_port=16153, policy=str(policy),
                    dns_upstream=lab.b.addr4, tls_trust=str(pki.ca_file))
    try:
        inst.start()
        r = inst.cli("credentials", "set", "aws-lab", "--kind", "aws", "--field", f"access_key_id={moto.access_key}",
                     "--field", f"placeholder_access_key_id={PLACEHOLDER_ID}",
                     "--field", f"placeholder_secret_access_key={PLACEHOLDER_SECRET}", input=moto.secret_key + "\n")
        assert r.returncode == 0, r.stderr
        inst.pki, inst.moto = pki, moto
        yield inst
    finally:
        inst.close()
        moto.stop()
        dns.stop()


def run_agent(inst: Instance, *args: str, env: dict | None = None) -> dict:
    r = inst.agent([sys.executable, "-c", AGENT, *args], timeout=120, env={**os.environ, **(env or {})} if env else None)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_placeholder_keys_work_only_through_interlock(aws, lab):
    out = run_agent(aws, "s3")
    assert out["create"] == 200 and out["put"] == 200, out
    assert out["get"] == 300000 and out["list"] == ["notes/a.txt"], out
    # refused by the policy, in S3's own words: the SDK raises its usual AccessDenied
    assert out["delete_bucket"]["error"] == "AccessDenied" and out["delete_bucket"]["status"] == 403, out
    assert "buckets-stay" in out["delete_bucket"]["message"]
    # The same program, not enrolled, talks to moto directly: the placeholder is worthless there.
    r = lab.a.run([sys.executable, "-c", AGENT, "whoami"], timeout=60,
                  env={"PATH": "/usr/bin:/bin", "AGENT_ENDPOINT": f"https://{lab.b.addr4}:{MOTO_PORT}", "AGENT_VERIFY": "0"})
    assert json.loads(r.stdout.strip().splitlines()[-1])["whoami"]["error"] == "InvalidClientTokenId", r.stderr[-2000:]
    # through Interlock, the signature the service saw was made with the real key
    assert run_agent(aws, "whoami")["whoami"].endswith("user/agent-real")


def test_a_bad_signature_fails_at_the_service_and_a_foreign_key_at_interlock(aws):
    # The stored secret is wrong: Interlock re-signs, and the service really checks.
    def store(secret: str) -> None:
        r = aws.cli("credentials", "set", "aws-lab", "--kind", "aws", "--field", f"access_key_id={aws.moto.access_key}",
                    "--field", f"placeholder_access_key_id={PLACEHOLDER_ID}",
                    "--field", f"placeholder_secret_access_key={PLACEHOLDER_SECRET}", input=secret + "\n")
        assert r.returncode == 0, r.stderr
    store("not-the-real-secret")
    try:
        assert run_agent(aws, "whoami")["whoami"]["error"] == "SignatureDoesNotMatch"
    finally:
        store(aws.moto.secret_key)
    assert run_agent(aws, "whoami")["whoami"].endswith("user/agent-real")
    # An agent signing with keys of its own is not laundered into the real identity.
    out = run_agent(aws, "whoami", env={"AGENT_KEY": "AKIAAGENTOWNKEY00001", "AGENT_SECRET": "its-own"})["whoami"]
    assert out["error"] == "AccessDenied" and "cannot re-sign" in out["message"], out
    assert any(e["data"]["reason"].startswith("request is signed with an unexpected access key")
               for e in aws.events("aws-resign-refused"))


def test_calls_are_named_judged_and_recorded(aws):
    decisions = [e["data"] for e in aws.events("decision") if e["data"]["protocol"] == "aws"]
    actions = {d["action"]: d for d in decisions}
    assert {"s3:CreateBucket", "s3:PutObject", "s3:GetObject", "s3:ListObjectsV2", "s3:DeleteBucket"} <= set(actions)
    assert actions["s3:DeleteBucket"]["verdict"] == "deny" and actions["s3:DeleteBucket"]["rule"] == "buckets-stay"
    assert actions["s3:PutObject"]["objects"] == ["arn:aws:s3:::agent-bkt/notes/a.txt"]
    requests = [e["data"] for e in aws.events("http") if e["data"].get("action")]
    put = next(r for r in requests if r["action"] == "s3:PutObject")
    assert put["status"] == 200 and put["up"] >= 300000 and put["method"] == "PUT"
    # the real keys and the signatures never reach the recording
    db = (aws.state_dir / "recorder.db").read_bytes()
    assert aws.moto.secret_key.encode() not in db and aws.moto.access_key.encode() not in db
    assert b"Signature=" not in db


def test_termination_is_held_until_approved(aws, lab):
    instance_id = run_agent(aws, "run")["run"]
    assert instance_id.startswith("i-"), instance_id
    cmd = [*INTERLOCK, "run", "--state-dir", str(aws.state_dir), "--agent", "bot", "--",
           sys.executable, "-c", AGENT, "terminate", instance_id]
    p = aws.host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = wait_until(lambda: json.loads(aws.cli("approvals", "--json").stdout), timeout=30)
        assert held and held[0]["action"] == "ec2:TerminateInstances", held
        assert held[0]["rule"] == "terminations-need-a-human" and instance_id in held[0]["summary"]
        assert p.poll() is None, "the agent waits"
        assert aws.cli("approve", held[0]["id"]).returncode == 0
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert json.loads(out.strip().splitlines()[-1])["terminate"] in ("shutting-down", "terminated"), err[-2000:]
    # the request is recorded a moment after its answer reached the agent
    def replayed() -> str:
        text = aws.cli("replay", held[0]["session"]).stdout
        return text if "-> 200" in text else ""
    replay = wait_until(replayed, timeout=5)
    assert replay.index("approval-requested") < replay.index("approval-approved") < replay.index("-> 200")
    assert "ec2:TerminateInstances" in replay.splitlines()[-2], replay
