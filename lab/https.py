"""HTTPS services on the lab's server host, for the tests, the demo and the benchmarks.

A test PKI of its own (never Interlock's CA, never added to the system store): the proxy is told
to trust it through the instance's `tls_trust`, as an operator would for a private CA. On host b:

    LabDns     lab.dns answering the lab hostnames; point an instance's dns_upstream at it
    Nginx      Debian's nginx: static files, WebDAV PUT for uploads, an endpoint that echoes the
               credentials it received; HTTP on 80 and HTTPS on 443, and on 8443 a certificate
               from a CA nobody trusts (for verification failures)
    Moto       moto's server over HTTPS with IAM authentication on, and an IAM user whose real keys
               only the credential store will hold
    WsEcho     lab.wsecho, a WebSocket echo on plain HTTP

Every process is started through Host.popen (so Lab.close() kills it too) and stopped by PID."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from lab.netns import Host
from lab.testing import stop_process, wait_listening
from proxy.tls.ca import CertificateAuthority, LeafMinter

REPO = Path(__file__).resolve().parent.parent
WWW = "www.lab.test"
AWS = "aws.lab.test"
BAD = "bad.lab.test"  # served with a certificate from an untrusted CA
PINNED = "pinned.lab.test"  # a target with `tls: passthrough`
NAMES = (WWW, AWS, BAD, PINNED)
MOTO_PORT = 4443
WS_PORT = 8088
BAD_PORT = 8443
# What the AWS test and demo run under: deletions of buckets refused, terminations held, the rest
# of the lab's AWS allowed and re-signed with the stored credential "aws-lab".
AWS_POLICY = f"""\
targets:
  aws: {{hostname: "{AWS}", port: {MOTO_PORT}, credentials: aws-lab}}
rules:
  - name: buckets-stay
    target: aws
    operation: "s3:DeleteBucket"
    decision: deny
    reason: agents never delete buckets
  - name: terminations-need-a-human
    target: aws
    operation: "ec2:Terminate*"
    decision: approve
    timeout: 2m
  - name: aws-work
    target: aws
    decision: allow
"""
PEOPLE = [{"name": "Ada", "email": "ada@example.com", "password": "hunter2", "card": "4111 1111 1111 1111"},
          {"name": "Bob", "email": "bob@example.org", "password": "s3cret", "card": "none"}]


class LabPKI:
    """A throwaway CA and one leaf (certificate + key files) per lab hostname."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.create("Interlock Lab Test CA")
        self.ca_file = directory / "test-ca.pem"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self._minter = LeafMinter(self.ca, validity=dt.timedelta(days=2))

    def leaf(self, host: str, minter: LeafMinter | None = None) -> tuple[Path, Path]:
        leaf = (minter if minter is not None else self._minter).leaf(host)
        cert, key = self.dir / f"{host}.pem", self.dir / f"{host}.key"
        cert.write_bytes(leaf.chain_pem)
        key.write_bytes(leaf.key_pem)
        os.chmod(key, 0o600)
        return cert, key

    def rogue_leaf(self, host: str) -> tuple[Path, Path]:
        """A certificate for host from a CA that nothing trusts."""
        return self.leaf(host, LeafMinter(CertificateAuthority.create("Rogue CA")))


class LabDns:
    """lab.dns on port 53 of host: names -> the addresses of `answers` (or `addresses`); with log,
    every datagram it receives is written there (see `seen()`); silent names are never answered."""

    def __init__(self, host: Host, answers: Host, names: tuple[str, ...] = NAMES, addresses: tuple[str, ...] = (),
                 log: Path | None = None, silent: tuple[str, ...] = ()):
        addrs = ",".join(addresses or (answers.addr4, answers.addr6))
        zone = [f"{n}={addrs}" for n in names]
        self.log = log
        opts = ([f"--log={log}"] if log else []) + [f"--silent={n}" for n in silent]
        self.proc = host.popen([sys.executable, "-m", "lab.dns", "53", *opts, *zone], stdout=subprocess.PIPE, text=True,
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if "ready" not in (self.proc.stdout.readline() if self.proc.stdout else ""):
            raise RuntimeError("lab DNS did not start")

    def seen(self) -> list[dict]:
        """Every datagram that reached the server: {"peer", "hex", "names"}."""
        if self.log is None or not self.log.exists():
            return []
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]

    def stop(self) -> None:
        stop_process(self.proc)


NGINX_CONF = """\
daemon off;
master_process off;
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ text/html html; application/json json; text/plain txt; }}
    default_type application/octet-stream;
    keepalive_requests 100000;
    server {{
        listen 80; listen [::]:80;
        listen 443 ssl; listen [::]:443 ssl;
        server_name {www};
        ssl_certificate {cert}; ssl_certificate_key {key};
        root {dir}/www;
        location /upload/ {{ dav_methods PUT DELETE; create_full_put_path on; client_max_body_size 512m; }}
        location = /whoami {{ default_type text/plain; return 200 "auth=$http_authorization\\n"; }}
        location = /small {{ default_type text/plain; return 200 "ok\\n"; }}
        location = /drop {{ return 444; }}
    }}
    server {{
        listen 443 ssl; listen [::]:443 ssl;
        server_name {pinned};
        ssl_certificate {pinned_cert}; ssl_certificate_key {pinned_key};
        root {dir}/www;
    }}
    server {{
        listen {bad_port} ssl; listen [::]:{bad_port} ssl;
        server_name {bad};
        ssl_certificate {bad_cert}; ssl_certificate_key {bad_key};
        root {dir}/www;
    }}
}}
"""


class Nginx:
    def __init__(self, host: Host, pki: LabPKI, directory: Path, name: str = WWW):
        """name: what the main server's certificate is for (a host name, or an address)."""
        self.dir = directory
        www = directory / "www"
        (www / "upload").mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_text("hello over https\n")
        (www / "people.json").write_text(json.dumps({"people": PEOPLE}))
        cert, key = pki.leaf(name)
        pinned_cert, pinned_key = pki.leaf(PINNED)
        bad_cert, bad_key = pki.rogue_leaf(BAD)
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, www=WWW, pinned=PINNED, bad=BAD, bad_port=BAD_PORT,
                                          cert=cert, key=key, pinned_cert=pinned_cert, pinned_key=pinned_key,
                                          bad_cert=bad_cert, bad_key=bad_key))
        self.proc = host.popen(["nginx", "-c", str(conf), "-p", str(directory)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in (80, 443, BAD_PORT):
            wait_listening(host, port, self.proc, directory / "error.log")

    def stop(self) -> None:
        stop_process(self.proc)


class Moto:
    """moto_server on https://aws.lab.test:4443 with IAM auth on from the first request."""

    def __init__(self, host: Host, pki: LabPKI, directory: Path):
        self.host = host
        cert, key = pki.leaf(AWS)
        self.log = directory / "moto.log"
        # Path-style buckets: moto would read the first label of aws.lab.test as a bucket name.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0", "AWS_DEFAULT_REGION": "us-east-1",
               "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(k, None)
        log = open(self.log, "ab")
        self.proc = host.popen([sys.executable, "-m", "moto.server", "-H", "::", "-p", str(MOTO_PORT),
                                "-c", str(cert), "-k", str(key)], env=env, stdout=log, stderr=log,
                               stdin=subprocess.DEVNULL)
        log.close()
        wait_listening(host, MOTO_PORT, self.proc, self.log, timeout=30)
        self.access_key, self.secret_key = self._user()

    def _user(self) -> tuple[str, str]:
        """An IAM user with an allow-all policy, made while auth is relaxed for three calls."""
        script = f"""
import json, urllib.request, ssl, boto3, warnings
warnings.filterwarnings("ignore")
url = "https://127.0.0.1:{MOTO_PORT}"
ctx = ssl._create_unverified_context()
urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset-auth", data=b"3", method="POST",
                       headers={{"Content-Type": "text/plain"}}), context=ctx, timeout=10).read()
iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", verify=False,
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="agent-real")
k = iam.create_access_key(UserName="agent-real")["AccessKey"]
iam.put_user_policy(UserName="agent-real", PolicyName="all", PolicyDocument=json.dumps(
    {{"Version": "2012-10-17", "Statement": [{{"Effect": "Allow", "Action": "*", "Resource": "*"}}]}}))
print(json.dumps([k["AccessKeyId"], k["SecretAccessKey"]]))
"""
        r = self.host.run([sys.executable, "-c", script], timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"moto bootstrap failed: {r.stderr[-2000:]}")
        key, secret = json.loads(r.stdout.strip().splitlines()[-1])
        return key, secret

    def stop(self) -> None:
        stop_process(self.proc)


class WsEcho:
    def __init__(self, host: Host, port: int = WS_PORT):
        self.proc = host.popen([sys.executable, "-m", "lab.wsecho", "serve", str(port)], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if "ready" not in (self.proc.stdout.readline() if self.proc.stdout else ""):
            raise RuntimeError("websocket echo did not start")

    def stop(self) -> None:
        stop_process(self.proc)
